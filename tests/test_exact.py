"""Token-exactness: reuse of a published KV equals prefilling from scratch, tokens and logits."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from kvmlx.runtime.generate import compare, continue_from, from_scratch, verify
from kvmlx.runtime.load import load_artifact, split_prompt
from kvmlx.runtime.publish import publish

CHUNK = 16
MAX_TOKENS = 24


def doc_tokens(lm, document, n):
    tokens = lm.tokenizer.encode(document)
    assert len(tokens) >= n
    return tokens[:n]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize(
    "length, suffix_len",
    [(CHUNK - 1, 0), (CHUNK, 1), (CHUNK + 1, 5), (2 * CHUNK + 3, CHUNK + 2), (1, 1)],
)
def test_reuse_equals_prefill(tmp_path, models, document, dtype, length, suffix_len):
    lm = models(dtype)
    tokens = lm.tokenizer.encode(document)
    doc, suffix = tokens[:length], tokens[length + 7 : length + 7 + suffix_len]
    path = tmp_path / "doc.kvmlx"
    publish(lm, doc, path, chunk_size=CHUNK)

    loaded = load_artifact(path, lm)
    assert split_prompt(loaded, doc + suffix) == suffix
    reuse = continue_from(lm, loaded, suffix, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    scratch = from_scratch(lm, doc, suffix, chunk_size=CHUNK, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    result = compare(reuse, scratch)

    assert result["tokens_compared"] == MAX_TOKENS
    assert result["token_exact"], (reuse.tokens, scratch.tokens)
    assert result["max_abs_logit_diff"] == 0.0  # CPU backend: bit-identical with the same chunking
    # the comparison is not vacuous: the model's greedy output varies and logits rows differ per step
    assert len(set(reuse.tokens)) >= 6
    assert not np.array_equal(reuse.logits[0], reuse.logits[1])


@pytest.mark.parametrize("load_path", ["copy", "overlap"])
def test_every_load_path_is_exact(tmp_path, tiny, document, load_path):
    doc = doc_tokens(tiny, document, 70)
    suffix = doc[5:25]
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=CHUNK)
    loaded = load_artifact(path, tiny, load_path=load_path)
    assert loaded.load_path == load_path
    reuse = continue_from(tiny, loaded, suffix, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    scratch = from_scratch(tiny, doc, suffix, chunk_size=CHUNK, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    result = compare(reuse, scratch)
    assert result["token_exact"] and result["max_abs_logit_diff"] == 0.0


def test_the_comparison_can_fail(tmp_path, tiny, document):
    """A perturbed KV must be caught by the same comparison the exactness tests rely on."""
    doc = doc_tokens(tiny, document, 40)
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=CHUNK)
    loaded = load_artifact(path, tiny)
    for c in loaded.caches:
        c.keys[..., :40, :] = c.keys[..., :40, :] * 1.5
    reuse = continue_from(tiny, loaded, doc[:3], max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    scratch = from_scratch(tiny, doc, doc[:3], chunk_size=CHUNK, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    result = compare(reuse, scratch)
    assert result["max_abs_logit_diff"] > 0.01
    assert not result["logits_identical"]


def test_verify_reports_single_pass_and_timings(tmp_path, tiny, document):
    path = tmp_path / "doc.kvmlx"
    publish(tiny, document, path, chunk_size=64)
    report = verify(path, tiny, "\nQuestion: what is reused?\nAnswer:", max_tokens=MAX_TOKENS, single_pass=True)
    out = report.to_json()
    assert out["token_exact"] and out["tokens_compared"] == MAX_TOKENS
    assert out["reused_tokens"] == len(tiny.tokenizer.encode(document))
    assert out["prefilled_tokens"] > 0
    assert out["single_pass"]["tokens_compared"] == MAX_TOKENS
    assert out["single_pass"]["token_exact"]
    assert out["load_seconds"] > 0 and out["prefill_seconds"] > 0 and out["reuse_first_token_seconds"] > 0


def test_empty_suffix_uses_stored_logits(tmp_path, tiny, document):
    doc = doc_tokens(tiny, document, 30)
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=CHUNK)
    loaded = load_artifact(path, tiny)
    scratch = from_scratch(tiny, doc, [], chunk_size=CHUNK, max_tokens=1, stop_at_eos=False, keep_logits=True)
    assert np.array_equal(np.array(loaded.logits.astype(mx.float32)), scratch.logits[0])
    gen = continue_from(tiny, loaded, [], max_tokens=1)
    assert gen.prefilled_tokens == 0 and gen.tokens == scratch.tokens


def test_loaded_caches_work_in_mlx_lm_generate(tmp_path, tiny, document):
    """`LoadedKV.caches` is a drop-in `prompt_cache=` for mlx-lm, with the same greedy tokens."""
    doc = doc_tokens(tiny, document, 50)
    suffix = tiny.tokenizer.encode(" Question: why?", add_special_tokens=False)
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=CHUNK)

    ours = continue_from(tiny, load_artifact(path, tiny), suffix, max_tokens=MAX_TOKENS)
    theirs = [r.token for r in mlx_lm.stream_generate(
        tiny.model, tiny.tokenizer, prompt=suffix, prompt_cache=load_artifact(path, tiny).caches, max_tokens=MAX_TOKENS)]
    assert theirs == ours.tokens
    text = mlx_lm.generate(tiny.model, tiny.tokenizer, prompt=suffix,
                           prompt_cache=load_artifact(path, tiny).caches, max_tokens=MAX_TOKENS)
    assert text.strip() == tiny.tokenizer.decode(ours.tokens).strip()  # detokenizers differ on a leading space


def test_first_append_does_not_reallocate(tmp_path, tiny, document):
    """The loaded cache has spare capacity (`spare_slots`: 16 to 256, at most 1/8 of the document beyond
    16): a suffix and first decode steps that fit write in place; one that does not grows it as mlx-lm does."""
    from kvmlx.runtime.load import spare_slots

    assert [spare_slots(n) for n in (1, 40, 255, 945, 2048, 3774)] == [16, 16, 31, 118, 256, 256]
    doc = doc_tokens(tiny, document, 200)
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=CHUNK)
    loaded = load_artifact(path, tiny)
    capacity = loaded.caches[0].keys.shape[2]
    assert capacity == 256  # 200 + 25, rounded up to whole 4 KiB rows (tiny's head_dim 32 x bf16: 64 slots)
    continue_from(tiny, loaded, doc[:17], max_tokens=8, stop_at_eos=False)
    assert all(c.keys.shape[2] == capacity and c.offset == 200 + 17 + 7 for c in loaded.caches)
    again = load_artifact(path, tiny)
    continue_from(tiny, again, doc[:60], max_tokens=2, stop_at_eos=False)
    assert all(c.keys.shape[2] > capacity and c.offset == 200 + 60 + 1 for c in again.caches)


def test_generate_loads_with_room_for_exactly_what_it_appends(tmp_path, tiny, document):
    """`generate` knows what it will append (the prompt's tokens, then max_tokens): it loads with that
    much room, so no append ever re-allocates (one copy of the document's KV in memory, never two)."""
    from kvmlx.runtime.generate import encode_continuation, generate
    from kvmlx.runtime.load import zero_copy_available

    if zero_copy_available():
        pytest.skip("Metal adopts the file's pages: the first append grows the cache there")
    doc = doc_tokens(tiny, document, 300)
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=CHUNK)
    prompt = " Question: what next?"
    appended = len(encode_continuation(tiny, prompt)) + 40
    gen, loaded = generate(path, tiny, prompt, max_tokens=40)
    assert loaded.load_path == "copy" and len(gen.tokens) <= 40
    capacity = {c.keys.shape[2] for c in loaded.caches}
    assert len(capacity) == 1 and 300 + appended <= capacity.pop() < 300 + appended + 64  # rounded to whole pages
    again, _ = generate(path, tiny, prompt, max_tokens=40)
    assert again.tokens == gen.tokens == continue_from(tiny, load_artifact(path, tiny, load_path="copy"),
                                                       encode_continuation(tiny, prompt), max_tokens=40).tokens


def test_mx_load_is_chosen_where_it_pays():
    """`_native_pays`: mx.load for more than SMALL_READ bytes, or for more than FEW_TENSORS tensors
    whose destinations need an mx.eval (more than HOST_BUILT bytes, spare slots counted); the
    calling thread's reads otherwise."""
    from types import SimpleNamespace

    from kvmlx.runtime import buffers, load

    def art(count, each):
        return SimpleNamespace(tensors={f"t{i}": SimpleNamespace(nbytes=each) for i in range(count)})

    pays = lambda a, dest=None: load._native_pays(a, list(a.tensors), dest)  # noqa: E731
    many = load.FEW_TENSORS + 8
    assert pays(art(2, load.SMALL_READ))  # a few large tensors
    assert not pays(art(load.FEW_TENSORS, 1024))  # a handful of small ones
    assert not pays(art(many, buffers.HOST_BUILT // (2 * many)))  # many, but no eval: builtin:tiny --kv-bits 8
    assert pays(art(many, buffers.HOST_BUILT // many + 1))  # many, and their destinations need an eval
    assert pays(art(many, 1024), dest=buffers.HOST_BUILT + 1)  # ... counting the copy path's spare slots


def test_the_copy_path_tells_the_os_it_reads_in_order(tmp_path, tiny, document, monkeypatch):
    """A copy-path load advises sequential reads on its descriptor (POSIX_FADV_SEQUENTIAL: read-ahead
    for a cold file); an `mx.load` load leaves that to MLX."""
    from kvmlx.artifact.format import Artifact

    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc_tokens(tiny, document, 100), path, chunk_size=CHUNK)
    with Artifact(path) as art:
        art.reading_in_order()  # a real call: no error where the system has posix_fadvise, nothing where not
    calls = []
    real = Artifact.reading_in_order
    monkeypatch.setattr(Artifact, "reading_in_order", lambda self: calls.append(self.path) or real(self))
    copied = load_artifact(path, tiny, load_path="copy")
    assert copied.load_path == "copy" and calls == [path]
    calls.clear()
    native = load_artifact(path, tiny, load_path="native", verify_digests=False)
    assert native.load_path == "native" and calls == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_uninitialized_buffers_are_writable_mlx_memory(dtype, monkeypatch):
    """The load path's destinations: evaluated MLX arrays of the asked shapes, written through memoryview.

    Large buffers come from `mx.load` (no fill), smaller ones and any `mx.load` failure from zeros:
    evaluated by MLX, or under HOST_BUILT bytes in all built from host zeros (no eval).
    """
    from kvmlx.runtime import buffers

    calls, evals = [], []
    real_load, real_eval = buffers.mx.load, buffers.mx.eval
    monkeypatch.setattr(buffers.mx, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    monkeypatch.setattr(buffers.mx, "eval", lambda *a, **k: evals.append(1) or real_eval(*a, **k))
    large = [(1, 8, 2048, 128), (1, 4, 4096, 128)]  # >= SMALL_BUFFER (4 MiB) on average
    medium, small = [(1, 8, 512, 128)] * 2, [(1, 2, 256, 8), (1, 3, 512, 4)]  # over and under HOST_BUILT (1 MiB)
    for shapes, via_load, via_eval in ((large, True, False), (medium, False, True), (small, False, False)):
        calls.clear()
        evals.clear()
        _check_buffers(buffers.uninitialized(shapes, dtype), shapes, buffers.DTYPES[dtype])
        assert (bool(calls), bool(evals)) == (via_load, via_eval)

    def broken(*args, **kwargs):
        raise RuntimeError("no load here")

    monkeypatch.setattr(buffers.mx, "load", broken)
    arrays = buffers.uninitialized(large, dtype)
    assert all(not np.array(a.view(mx.uint8)).any() for a in arrays)  # the fallback: zeros
    _check_buffers(arrays, large, buffers.DTYPES[dtype])


@pytest.mark.parametrize("scale", [1, 64, 4096])
def test_destinations_of_several_dtypes_in_one_call(scale):
    """`read_tensors` allocates every dtype's destinations in one call (one `mx.eval` at most):
    each buffer has its own dtype and shape, at every size path."""
    from kvmlx.runtime import buffers

    shapes = [(1, 2, scale, 8), (1, 4, 32, 32), (1, 3, 256), (2, scale, 16)]
    dtypes = ["bfloat16", "float32", "float16", "uint32"]
    arrays, zeroed = buffers.destinations(shapes, dtypes)
    assert [a.dtype for a in arrays] == [buffers.DTYPES[d] for d in dtypes]
    for a, shape, dtype in zip(arrays, shapes, dtypes):
        _check_buffers([a], [shape], buffers.DTYPES[dtype])
    total = sum(int(np.prod(s)) * buffers.TENSOR_DTYPES[d] for s, d in zip(shapes, dtypes))
    assert zeroed == (total < len(shapes) * buffers.SMALL_BUFFER)  # mx.load's buffers are not filled


def _check_buffers(arrays, shapes, dtype):
    assert [a.shape for a in arrays] == shapes and {a.dtype for a in arrays} == {dtype}
    for i, a in enumerate(arrays):
        raw = np.frombuffer(memoryview(a), dtype=np.uint8)
        raw[:] = i + 1  # writable, and the array sees what was written
        assert np.array_equal(np.array(a.view(mx.uint8)).ravel(), raw)


def test_spare_slots_are_zero_even_in_recycled_memory(tmp_path, tiny, document, monkeypatch):
    """Destinations come from MLX's buffer cache uninitialised; what the document does not fill is
    zeroed, so `save_prompt_cache` (which writes the whole buffer) never leaks earlier memory."""
    from kvmlx.runtime import buffers

    monkeypatch.setattr(buffers, "SMALL_BUFFER", 0)  # the uninitialised path, whatever the buffers' size
    doc = doc_tokens(tiny, document, 40)
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=CHUNK)
    first = load_artifact(path, tiny)
    shapes = [(c.keys.shape, c.keys.dtype) for c in first.caches]
    bits = lambda a: np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)  # noqa: E731 - numpy has no bfloat16
    expected = [(bits(c.keys)[..., :40, :], bits(c.values)[..., :40, :]) for c in first.caches]
    del first
    junk = [mx.full(shape, 7.0, dtype) for shape, dtype in shapes for _ in range(2)]
    mx.eval(junk)
    del junk  # MLX's buffer cache now holds non-zero buffers of exactly the destinations' size
    loaded = load_artifact(path, tiny)
    for cache, (keys, values) in zip(loaded.caches, expected):
        k, v = bits(cache.keys), bits(cache.values)
        assert np.array_equal(k[..., :40, :], keys) and np.array_equal(v[..., :40, :], values)
        assert not k[..., 40:, :].any() and not v[..., 40:, :].any()


@pytest.mark.parametrize("publish_chunk, reference_chunk", [(16, 100), (100, 16), (16, None)])
def test_other_chunkings(tmp_path, tiny, document, publish_chunk, reference_chunk):
    """Across chunkings (None: one single pass) tokens agree; logits are bit-identical on the CPU backend."""
    tokens = tiny.tokenizer.encode(document)
    doc, suffix = tokens[:150], tokens[150:170]
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=publish_chunk)
    reuse = continue_from(tiny, load_artifact(path, tiny), suffix, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    if reference_chunk is None:
        ref = from_scratch(tiny, doc + suffix, [], chunk_size=len(doc) + len(suffix), max_tokens=MAX_TOKENS,
                           stop_at_eos=False, keep_logits=True)
    else:
        ref = from_scratch(tiny, doc, suffix, chunk_size=reference_chunk, max_tokens=MAX_TOKENS, stop_at_eos=False,
                           keep_logits=True)
    result = compare(reuse, ref)
    assert result["token_exact"]
    if mx.default_device() == mx.cpu:
        assert result["max_abs_logit_diff"] == 0.0


@pytest.mark.parametrize("encoding", ["bytesplit-zstd", "expsplit-zstd"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_lossless_encodings_are_bit_exact(tmp_path, models, document, encoding, dtype):
    lm = models(dtype)
    tokens = lm.tokenizer.encode(document)
    doc, suffix = tokens[:90], tokens[90:100]
    raw, packed = tmp_path / "raw.kvmlx", tmp_path / "packed.kvmlx"
    publish(lm, doc, raw, chunk_size=CHUNK)
    result = publish(lm, doc, packed, chunk_size=CHUNK, encoding=encoding)
    assert result.header["kv"]["lossless"] is True
    a, b = load_artifact(raw, lm), load_artifact(packed, lm, require_exact=True)
    for ca, cb in zip(a.caches, b.caches):
        assert mx.array_equal(ca.keys[..., :90, :], cb.keys[..., :90, :]).item()
        assert mx.array_equal(ca.values[..., :90, :], cb.values[..., :90, :]).item()
    ra = continue_from(lm, a, suffix, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    rb = continue_from(lm, b, suffix, max_tokens=MAX_TOKENS, stop_at_eos=False, keep_logits=True)
    assert compare(ra, rb)["logits_identical"]


@pytest.mark.parametrize("encoding", ["int8-tensor", "q8", "q4"])
def test_lossy_encodings_are_marked_and_refused_by_exact_loads(tmp_path, tiny, document, encoding):
    from kvmlx.errors import LossyArtifactError

    path = tmp_path / "lossy.kvmlx"
    result = publish(tiny, tiny.tokenizer.encode(document)[:64], path, chunk_size=CHUNK, encoding=encoding)
    assert result.header["kv"] == {**result.header["kv"], "encoding": encoding, "lossless": False}
    stored = lambda header: sum(t["nbytes"] for t in header["tensors"] if t["name"] != "logits")  # noqa: E731
    raw = publish(tiny, tiny.tokenizer.encode(document)[:64], tmp_path / "r.kvmlx")
    assert stored(result.header) <= 0.6 * stored(raw.header)
    with pytest.raises(LossyArtifactError, match="lossy"):
        load_artifact(path, tiny, require_exact=True)
    loaded = load_artifact(path, tiny)  # allowed when exactness is not required
    gen = continue_from(tiny, loaded, [5, 6], max_tokens=4)
    assert len(gen.tokens) >= 1
