"""Every mlx-lm cache family through kvmlx's tensors and back, against mlx-lm's own classes.

For each family (plain KVCache, RotatingKVCache past its window, ArraysCache recurrent state of a
hybrid model, QuantizedKVCache at 8 and 4 bits, CacheList) a prefilled cache goes through
`save_layer` -> raw bytes -> `load_layer`; the result must be the same mlx-lm class with bit-identical
state, and decoding from it must give the same logits as decoding from mlx-lm's own
save_prompt_cache / load_prompt_cache round trip.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    ChunkedKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)

from kvmlx.caches import KVQuantization, check_supported, load_layer, save_layer, spec
from kvmlx.errors import UnsupportedModelError
from kvmlx.runtime.publish import prefill

TOKENS = [(7 * i + 3) % 1000 + 3 for i in range(80)]


def _through_bytes(cache):
    """save_layer, each tensor to bytes and back (as a file would hold it), load_layer."""
    meta, tensors = save_layer(cache)
    mx.eval(list(tensors.values()))
    stored = {}
    for name, x in tensors.items():
        raw = bytes(memoryview(mx.contiguous(x)).cast("B")) if x.size else b""
        stored[name] = (raw, x.dtype, x.shape)

    def get(name):
        raw, dtype, shape = stored[name]
        return mx.array(np.frombuffer(raw, np.uint8)).view(dtype).reshape(shape)
    return load_layer(meta, get)


def _leaves(state):
    if isinstance(state, mx.array):
        return [state]
    if isinstance(state, (list, tuple)):
        return [x for s in state for x in _leaves(s)]
    return [state]


def _same_state(a, b):
    """Same class, same metadata, bit-identical arrays: the whole `state` for rotating and recurrent
    caches; the first `offset` positions for KVCache / QuantizedKVCache (the rest is spare capacity)."""
    assert type(a) is type(b)
    if isinstance(a, (KVCache, QuantizedKVCache)):
        a_state, b_state = save_layer(a), save_layer(b)
        assert a_state[0] == b_state[0]
        pairs = [(a_state[1][k], b_state[1][k]) for k in a_state[1]]
    else:
        pairs = list(zip(_leaves(a.state), _leaves(b.state), strict=True))
    for x, y in pairs:
        if isinstance(x, mx.array):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert np.array_equal(np.array(x.view(mx.uint8) if x.dtype != mx.bool_ else x),
                                  np.array(y.view(mx.uint8) if y.dtype != mx.bool_ else y))
        else:
            assert x == y


def _decode(model, caches, first, steps=8):
    rows, token = [], first
    for _ in range(steps):
        logits = model(mx.array([[token]]), cache=caches)[0, -1]
        rows.append(np.array(logits.astype(mx.float32)))
        token = int(mx.argmax(logits).item())
    return rows


def _check_family(model, caches, tmp_path, first=5):
    ours = [_through_bytes(c) for c in caches]
    for a, b in zip(caches, ours):
        _same_state(a, b)
    save_prompt_cache(str(tmp_path / "mlx.safetensors"), caches)
    theirs = load_prompt_cache(str(tmp_path / "mlx.safetensors"))
    for x, y in zip(_decode(model, ours, first), _decode(model, theirs, first), strict=True):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("name,families", [("hybrid", {"ArraysCache", "KVCache"}),
                                           ("sliding", {"RotatingKVCache", "KVCache"}),
                                           ("gpt-oss", {"RotatingKVCache", "KVCache"})])
def test_preset_caches_round_trip_bit_exactly(preset, tmp_path, name, families):
    lm = preset(name)
    caches = make_prompt_cache(lm.model)
    prefill(lm.model, TOKENS, caches, 16)
    assert {type(c).__name__ for c in caches} == families
    rotating = [c for c in caches if isinstance(c, RotatingKVCache)]
    assert all(c.offset > c.max_size for c in rotating)  # past the window: rotated, not trimmable
    _check_family(lm.model, caches, tmp_path)


def test_qwen3_5_hybrid_round_trips(tmp_path):
    from mlx_lm.models import qwen3_5

    text = dict(model_type="qwen3_5_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=1024, linear_num_value_heads=2,
                linear_num_key_heads=1, linear_key_head_dim=32, linear_value_head_dim=32, full_attention_interval=2,
                rope_parameters={"type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1]})
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict({"model_type": "qwen3_5", "text_config": text}))
    model.set_dtype(mx.bfloat16)
    caches = make_prompt_cache(model)
    prefill(model, TOKENS, caches, 16)
    assert [type(c).__name__ for c in caches] == ["ArraysCache", "KVCache"] * 2
    _check_family(model, caches, tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_round_trips(preset, tmp_path, bits):
    lm = preset("tiny")
    caches = make_prompt_cache(lm.model)
    prefill(lm.model, TOKENS, caches, 16, quant=KVQuantization(bits, 32, 0))
    assert all(isinstance(c, QuantizedKVCache) and c.bits == bits for c in caches)
    _check_family(lm.model, caches, tmp_path)


def test_cache_list_round_trips():
    keys = mx.random.normal((1, 2, 40, 32)).astype(mx.bfloat16)
    a, b = KVCache(), RotatingKVCache(max_size=16, keep=2)
    for s in range(0, 40, 8):
        a.update_and_fetch(keys[..., s : s + 8, :], keys[..., s : s + 8, :] * 2)
        b.update_and_fetch(keys[..., s : s + 8, :], keys[..., s : s + 8, :] * 3)
    mx.eval(a.state, b.state)
    arrays = ArraysCache(2)
    arrays[1] = keys[0, 0]
    both = CacheList(a, b, arrays)
    back = _through_bytes(both)
    assert spec(back) == {"family": "list", "caches": [{"family": "kv"}, {"family": "rotating", "max_size": 16, "keep": 2},
                                                       {"family": "arrays", "size": 2}]}
    for x, y in zip(both.caches, back.caches):
        _same_state(x, y)


def test_unknown_cache_types_are_refused_by_name():
    class Chunked:
        layers = [0]

        def make_cache(self):
            return [ChunkedKVCache(16)]

    with pytest.raises(UnsupportedModelError, match="ChunkedKVCache"):
        check_supported(Chunked())
