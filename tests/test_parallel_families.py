"""Where distributed runs (tensor/pipeline parallel under mlx.launch) meet cache families and --kv-bits.

Parallel artifacts hold plain KV (format version 1). A model whose caches are not all plain KVCache,
or --kv-bits settings, under a launcher are refused on every rank before any collective, with one
typed line naming both (UnsupportedParallelError); a header that combines a `parallel` object with
version-2 fields is invalid. Store keys name both the layout and the KV-quantization variant. The
launcher itself (2 ranks) is exercised in tests/test_distributed.py; here a stand-in group makes a
LoadedModel look sharded, which is all the refusal reads (it runs before any collective).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvmlx.artifact.format import PREAMBLE, Artifact, canonical_json
from kvmlx.artifact.layout import tensor_layout
from kvmlx.caches import KVQuantization
from kvmlx.errors import ArtifactError, UnsupportedModelError, UnsupportedParallelError
from kvmlx.runtime.agent import Agent
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import publish
from kvmlx.runtime.store import Store, artifact_key, bucket_id
from kvmlx.runtime.store.keys import kv_variant

CHUNK = 32
QUANT = KVQuantization(8, 32, 0)  # tiny's head_dim is 32


class _Group:
    """Stands in for an mx.distributed group of 2 (rank 0): no collective may be reached."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


def _sharded(lm, mode: str = "tensor"):
    return dataclasses.replace(lm, group=_Group(), parallel=mode)


def _one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and "supports plain KV only" in msg, msg
    for w in words:
        assert w in msg, msg


def test_kv_bits_under_a_launcher_is_refused_naming_both(tiny, document, tmp_path):
    tokens = tiny.tokenizer.encode(document)[:64]
    for mode, words in [("tensor", "tensor-parallel over 2 ranks"), ("pipeline", "pipeline-parallel over 2 ranks")]:
        lm = _sharded(tiny, mode)
        with pytest.raises(UnsupportedParallelError) as e:
            publish(lm, tokens, tmp_path / "q.kvmlx", chunk_size=CHUNK, kv_quant=QUANT)
        _one_line(e, words, "quantized KV (--kv-bits 8 --kv-group-size 32")
        assert isinstance(e.value, UnsupportedModelError)  # a kind of unsupported model setup
        with pytest.raises(UnsupportedParallelError) as e:
            Agent(lm, Store(tmp_path / "store"), kv_quant=QUANT, cache=False)
        _one_line(e, words, "--kv-bits 8")
        with pytest.raises(UnsupportedParallelError):
            Store(tmp_path / "store").publish(lm, tokens, chunk_size=CHUNK, kv_quant=QUANT)
        with pytest.raises(UnsupportedParallelError):  # before the file is even opened
            load_artifact(tmp_path / "absent.kvmlx", lm, kv_quant=QUANT)
    assert not (tmp_path / "q.kvmlx").exists() and not list(tmp_path.glob("q.kvmlx.*"))


@pytest.mark.parametrize("name, family", [("hybrid", "arrays"), ("sliding", "rotating")])
def test_other_cache_families_under_a_launcher_are_refused_naming_both(preset, document, tmp_path, name, family):
    lm = _sharded(preset(name))
    tokens = lm.tokenizer.encode(document)[:64]
    with pytest.raises(UnsupportedParallelError) as e:
        publish(lm, tokens, tmp_path / "f.kvmlx", chunk_size=CHUNK)
    _one_line(e, "tensor-parallel over 2 ranks", f"{family} caches")
    with pytest.raises(UnsupportedParallelError) as e:
        Agent(lm, Store(tmp_path / "store"), cache=False)
    _one_line(e, f"{family} caches")
    with pytest.raises(UnsupportedParallelError):
        load_artifact(tmp_path / "absent.kvmlx", lm)
    assert not (tmp_path / "f.kvmlx").exists()


def test_one_process_is_unaffected(tiny, document, tmp_path):
    """Without a launcher the same calls work: the refusal is about the layout, not the features."""
    tokens = tiny.tokenizer.encode(document)[:64]
    res = publish(tiny, tokens, tmp_path / "q.kvmlx", chunk_size=CHUNK, kv_quant=QUANT)
    assert res.header["version"] == 3 and res.header["caches"]
    assert load_artifact(res.path, tiny, kv_quant=QUANT).kv_quant == QUANT


def test_a_version_2_header_with_a_parallel_object_is_invalid(tiny, document, tmp_path):
    """A (re-digested) --kv-bits header claiming to be rank 0's part of a tensor-parallel artifact (in
    kvmlx's own container, version 2; test_format_v3.py has the same lie in a version-3 file)."""
    import blake3

    path = tmp_path / "v2.kvmlx"
    publish(tiny, tiny.tokenizer.encode(document)[:64], path, chunk_size=CHUNK, kv_quant=QUANT, format_version=2)
    raw = bytearray(path.read_bytes())
    magic, version, flags, hlen, data_offset, _ = PREAMBLE.unpack_from(raw, 0)
    header = json.loads(raw[64 : 64 + hlen])
    m = header["model"]
    header["parallel"] = {**tensor_layout(2, m["num_layers"], m["num_kv_heads"]).to_json(), "part": 0}
    body = canonical_json(header)
    raw[64:data_offset] = body + bytes(data_offset - 64 - len(body))
    PREAMBLE.pack_into(raw, 0, magic, version, flags, len(body), data_offset, blake3.blake3(body).digest())
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"parallel artifacts hold plain KV: cache families and --kv-bits are single-process only") as e:
        Artifact(path)
    assert "\n" not in str(e.value)


def test_store_keys_name_the_layout_and_the_kv_variant():
    fp, tok, tokens = "fp2:blake3:" + "0" * 64, "blake3:" + "1" * 64, list(range(40))
    layout = tensor_layout(2, 4, 2)
    plain, quant = kv_variant("bfloat16"), kv_variant("bfloat16", QUANT.to_json())
    keys = {artifact_key(fp, tok, v, tokens, layout=lay) for v in (plain, quant) for lay in (None, layout)}
    buckets = {bucket_id(fp, tok, v, layout=lay) for v in (plain, quant) for lay in (None, layout)}
    assert len(keys) == 4 and len(buckets) == 4
