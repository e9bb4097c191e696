"""Every cache family through a saved file: publish -> load -> continue is token-exact (a header with
`caches`: version 3, or version 2 in kvmlx's own container).

For each built-in family preset (hybrid Qwen3-Next: ArraysCache + KVCache; Gemma-3-style sliding
window shorter than the document; gpt-oss-style sliding window in float32) and for mlx-lm's
`--kv-bits` pipeline: greedy tokens and full logit rows equal a from-scratch prefill with the same
chunking, reuse from a state checkpoint below the document's end is exact, and mismatched or
hostile version-2 headers are refused with one-line typed errors.
"""

import mlx.core as mx
import pytest

from kvmlx.artifact import format as fmt
from kvmlx.artifact.format import Artifact, TensorData, read_header, write_artifact
from kvmlx.caches import KVQuantization, restore_info
from kvmlx.errors import ArtifactError, CacheMismatchError, KVQuantizationMismatchError, UnsupportedVersionError
from kvmlx.runtime.generate import compare, decode_timed, from_scratch, verify
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import prefill, publish
from kvmlx.runtime.restore import caches_at

CHUNK = 32
EVERY = 64
MAX_TOKENS = 24
FAMILY_PRESETS = ["hybrid", "sliding", "gpt-oss"]


@pytest.fixture(scope="module")
def published(preset, document, tmp_path_factory):
    """name -> (model, artifact path, document tokens) for each family preset (250 tokens, window 32)."""
    out = {}
    d = tmp_path_factory.mktemp("families")

    def get(name):
        if name not in out:
            lm = preset(name)
            tokens = lm.tokenizer.encode(document)[:250]
            path = d / f"{name}.kvmlx"
            publish(lm, tokens, path, chunk_size=CHUNK, checkpoint_every=EVERY)
            out[name] = (lm, path, tokens)
        return out[name]
    return get


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_publish_then_generate_verify_is_token_exact(published, name):
    lm, path, tokens = published(name)
    h = read_header(path)
    assert h["version"] == 3 and h["caches"] and [c["tokens"] for c in h["checkpoints"]] == [64, 128, 192]
    report = verify(path, lm, " And then the", max_tokens=MAX_TOKENS)
    assert report.token_exact and report.tokens_compared == MAX_TOKENS
    assert report.max_abs_logit_diff == 0.0
    assert len(set(report.reuse.tokens)) > 4  # the model's greedy output varies: the comparison means something


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_reuse_from_a_checkpoint_below_the_end_is_exact(published, name):
    """A prompt sharing only 150 of the 250 stored tokens: restore at the deepest checkpoint (128), prefill the rest."""
    lm, path, tokens = published(name)
    info = restore_info(read_header(path))
    assert info.any_from is None and info.deepest(150) == 128  # caches past their window cannot be trimmed
    prompt = tokens[:150] + lm.tokenizer.encode(" Something else entirely, then more.")
    loaded = load_artifact(path, lm, at=128)
    caches = caches_at(loaded, 128)
    logits = prefill(lm.model, prompt[128:], caches, CHUNK, split_last=True)  # a request's suffix
    reuse = decode_timed(lm, caches, logits, MAX_TOKENS, started=0, reused=128, prefilled=len(prompt) - 128,
                         stop_at_eos=False, keep_logits=True)
    scratch = from_scratch(lm, prompt[:128], prompt[128:], chunk_size=CHUNK, max_tokens=MAX_TOKENS, stop_at_eos=False,
                           keep_logits=True)
    result = compare(reuse, scratch)
    assert result["token_exact"] and result["max_abs_logit_diff"] == 0.0
    # the copies handed out never touch the loaded state: a second request at the same point is exact too
    again = caches_at(loaded, 128)
    logits = prefill(lm.model, prompt[128:], again, CHUNK, split_last=True)
    second = decode_timed(lm, again, logits, MAX_TOKENS, started=0, reused=128, prefilled=0, stop_at_eos=False,
                          keep_logits=True)
    assert compare(second, scratch)["max_abs_logit_diff"] == 0.0


def test_a_position_without_a_checkpoint_is_refused(published):
    """A wrapped sliding window cannot be cut back to 130 tokens, and no checkpoint sits there."""
    lm, path, tokens = published("sliding")
    with pytest.raises(Exception, match="cannot be restored at 130"):
        caches_at(load_artifact(path, lm), 130)


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_bits_artifacts_are_exact_against_the_same_settings(tmp_path, tiny, document, bits):
    quant = KVQuantization(bits, 32, 100)
    tokens = tiny.tokenizer.encode(document)[:200]
    path = tmp_path / "q.kvmlx"
    full = tmp_path / "full.kvmlx"
    result = publish(tiny, tokens, path, chunk_size=CHUNK, kv_quant=quant)
    publish(tiny, tokens, full, chunk_size=CHUNK)
    full_kv = 4 * 2 * 2 * 200 * 32 * 2  # layers x (keys, values) x heads x tokens x head_dim x bfloat16
    assert result.kv_bytes == full_kv * (32 * bits // 8 + 4) // 64  # packed words + bf16 scale and bias per 32
    report = verify(path, tiny, " And then the", max_tokens=MAX_TOKENS)
    assert report.token_exact and report.max_abs_logit_diff == 0.0
    h = read_header(path)
    assert h["kv"]["quantization"] == {"bits": bits, "group_size": 32, "start": 100}
    assert {c["family"] for c in h["caches"]} == {"quantized"}


def test_kv_bits_pipeline_matches_mlx_lm_generate(tmp_path, tiny, document):
    """The stored quantized caches continue as mlx_lm.stream_generate does with the same --kv-bits settings."""
    from mlx_lm import stream_generate

    tokens = tiny.tokenizer.encode(document)[:130]
    suffix = tiny.tokenizer.encode(" And then the", add_special_tokens=False)
    quant = KVQuantization(8, 32, 0)
    path = tmp_path / "q8.kvmlx"
    publish(tiny, tokens, path, chunk_size=CHUNK, kv_quant=quant)
    ours = verify(path, tiny, " And then the", max_tokens=12).reuse.tokens
    theirs = [r.token for r in stream_generate(tiny.model, tiny.tokenizer, mx.array(tokens + suffix), max_tokens=12,
                                               kv_bits=8, kv_group_size=32, quantized_kv_start=0, prefill_step_size=CHUNK)]
    assert ours == theirs


def test_quantizing_a_full_precision_artifact_is_refused_and_would_not_be_exact(tmp_path, tiny, document):
    tokens = tiny.tokenizer.encode(document)[:130]
    path = tmp_path / "full.kvmlx"
    publish(tiny, tokens, path, chunk_size=CHUNK)
    quant = KVQuantization(8, 32, 0)
    with pytest.raises(KVQuantizationMismatchError, match="full-precision KV .* this run uses --kv-bits 8"):
        load_artifact(path, tiny, kv_quant=quant)
    # what the refusal prevents: quantizing the loaded caches is not what a quantized from-scratch run holds
    loaded = load_artifact(path, tiny)
    caches = [c.to_quantized(group_size=32, bits=8) for c in loaded.caches]
    suffix = tiny.tokenizer.encode(" And then the", add_special_tokens=False)
    logits = prefill(tiny.model, suffix, caches, CHUNK, quant=quant, split_last=True)
    approx = decode_timed(tiny, caches, logits, 8, started=0, reused=0, prefilled=0, stop_at_eos=False,
                          keep_logits=True, quant=quant)
    scratch = from_scratch(tiny, tokens, suffix, chunk_size=CHUNK, max_tokens=8, stop_at_eos=False, keep_logits=True,
                           quant=quant)
    assert compare(approx, scratch)["max_abs_logit_diff"] > 0


def test_mismatched_kv_settings_are_refused_by_name(tmp_path, tiny, document):
    path = tmp_path / "q.kvmlx"
    publish(tiny, tiny.tokenizer.encode(document)[:70], path, chunk_size=CHUNK, kv_quant=KVQuantization(8, 32, 0))
    with pytest.raises(KVQuantizationMismatchError, match="--kv-group-size 32 .* --kv-group-size 64"):
        load_artifact(path, tiny, kv_quant=KVQuantization(8, 64, 0))
    with pytest.raises(KVQuantizationMismatchError, match="this run uses full-precision KV"):
        load_artifact(path, tiny, kv_quant=None)


def _rewrite(src, dst, edit, version=fmt.VERSION):
    """Re-write an artifact with an edited header (valid digests: what a hostile publisher can do), as
    format `version` (1 or 2: kvmlx's own container)."""
    with Artifact(src) as art:
        header = {k: v for k, v in art.header.items() if k not in ("tensors", "file_bytes", "format", "version", "digest")}
        tensors = [TensorData(e.name, e.dtype, e.shape, memoryview(bytes(art.tensor_bytes(e.name))), e.encoding, e.params)
                   for e in sorted(art.tensors.values(), key=lambda e: e.offset)]
    edit(header)
    if not header.get("checkpoints"):
        tensors = [t for t in tensors if not t.name.startswith("checkpoints.")]
    write_artifact(dst, header, tensors, version=version)
    return dst


def test_a_window_that_differs_from_the_models_is_refused(published, tmp_path):
    lm, path, _ = published("sliding")
    bad = _rewrite(path, tmp_path / "w.kvmlx", lambda h: [c.update(max_size=64) for c in h["caches"] if c["family"] == "rotating"]
                   and [c.update(max_size=64) for cp in h["checkpoints"] for c in cp["caches"].values()])
    with pytest.raises(CacheMismatchError, match="layer 0: artifact sliding window is 64, this model's is 32"):
        load_artifact(bad, lm)


def test_a_family_that_differs_from_the_models_is_refused(published, tiny, tmp_path):
    lm, path, _ = published("hybrid")
    def as_kv(h):  # same model, a structurally valid file: only layer 3's family differs from the model's
        h["caches"][3] = {"family": "rotating", "max_size": 300, "keep": 0, "offset": 250, "idx": 250}
        h["checkpoints"] = []
    bad = _rewrite(path, tmp_path / "f.kvmlx", as_kv)
    with pytest.raises(CacheMismatchError, match="layer 3: artifact holds a rotating cache, this model makes a kv cache"):
        load_artifact(bad, lm)


def test_a_checkpoint_off_a_chunk_boundary_is_refused(published, tmp_path):
    lm, path, _ = published("hybrid")
    bad = _rewrite(path, tmp_path / "c.kvmlx", lambda h: h["checkpoints"][0].update(tokens=70))
    with pytest.raises(ArtifactError, match="checkpoint at token 70 is not on a prefill-chunk boundary \\(chunk size 32\\)"):
        load_artifact(bad, lm)


def test_an_older_reader_refuses_version_2_naming_both(published, tmp_path, monkeypatch):
    _, path, _ = published("hybrid")
    legacy = _rewrite(path, tmp_path / "v2.kvmlx", lambda h: None, version=2)
    assert read_header(legacy)["version"] == 2 and read_header(legacy)["caches"] == read_header(path)["caches"]
    monkeypatch.setattr(fmt, "VERSION", 1)
    with pytest.raises(UnsupportedVersionError, match="format version 2 is newer than this kvmlx reads \\(1\\)"):
        read_header(legacy)
    from kvmlx.artifact import envelope

    monkeypatch.setattr(envelope, "VERSION", 2)  # a reader of safetensors containers up to version 2
    with pytest.raises(UnsupportedVersionError, match="format version 3 is newer than this kvmlx reads \\(2\\)"):
        read_header(path)


def test_plain_kv_artifacts_have_no_caches_and_can_still_be_version_1(tmp_path, tiny, document):
    """Plain KV (every layer a KVCache, no --kv-bits) says nothing of cache families, so a version-3
    header is plain KV without `caches`; `format_version=1` still writes a file older readers read,
    which loads token-exactly."""
    tokens = tiny.tokenizer.encode(document)[:40]
    path, old = tmp_path / "plain.kvmlx", tmp_path / "plain-v1.kvmlx"
    publish(tiny, tokens, path, chunk_size=CHUNK)
    h = read_header(path)
    assert h["version"] == 3 and "caches" not in h and "checkpoints" not in h
    assert restore_info(h).deepest(17) == 17
    publish(tiny, tokens, old, chunk_size=CHUNK, format_version=1)
    assert old.read_bytes()[:8] == fmt.MAGIC
    h1 = read_header(old)
    def same(header):
        return {k: v for k, v in header.items() if k not in ("version", "created_by", "tensors", "file_bytes")}

    assert h1["version"] == 1 and same(h1) == same(h)
    assert [(t["name"], t["digest"]) for t in h1["tensors"]] == [(t["name"], t["digest"]) for t in h["tensors"]]
    report = verify(old, tiny, " And then the", max_tokens=8)
    assert report.token_exact and report.tokens_compared == 8 and report.max_abs_logit_diff == 0.0


@pytest.mark.parametrize("name", ["sliding", "gpt-oss"])
def test_a_document_in_one_chunk_longer_than_the_window(preset, document, tmp_path, name):
    """A document prefilled in one chunk longer than the sliding window leaves the rotating cache's state
    as a strided view; it is written contiguous and continues exactly (it used to fail with a TypeError)."""
    lm = preset(name)
    tokens = lm.tokenizer.encode(document)[:80]
    path = tmp_path / "one-chunk.kvmlx"
    publish(lm, tokens, path, chunk_size=len(tokens))
    result = verify(path, lm, " and then", max_tokens=8)
    assert result.token_exact and result.max_abs_logit_diff == 0.0
