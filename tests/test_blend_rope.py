"""Re-rotation of stored keys with the model's own RoPE, the per-model gate, and the refusals by name."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.rope_utils import (
    DynamicNTKScalingRoPE,
    Llama3RoPE,
    ProportionalRoPE,
    SuScaledRoPE,
    YarnRoPE,
)

from kvmlx.caches import KVQuantization
from kvmlx.caches.rope import (
    MOVE_BOUND,
    Rope,
    check_blend_support,
    check_module,
    describe,
    gate,
    model_ropes,
    move_keys,
    rotate_at,
)
from kvmlx.errors import BlendUnsupportedError, KvmlxError
from kvmlx.models import builtin_path, load_model

HEAD = 64
MODULES = {
    "default": nn.RoPE(HEAD, base=10000.0),
    "linear": nn.RoPE(HEAD, base=10000.0, scale=0.25),
    "traditional": nn.RoPE(HEAD, traditional=True, base=500000.0),
    "partial": nn.RoPE(HEAD // 4, base=10000.0),  # partial rotary: the first quarter of each head rotates
    "llama3": Llama3RoPE(HEAD, 8192, False, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}),
    "yarn": YarnRoPE(HEAD, max_position_embeddings=131072, base=10000, scaling_factor=4.0,
                     original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.0),
    "longrope": SuScaledRoPE(HEAD, base=10000.0, max_position_embeddings=131072, original_max_position_embeddings=4096,
                             short_factor=[1.0] * (HEAD // 2), long_factor=[1.0 + i / 8 for i in range(HEAD // 2)]),
    "proportional": ProportionalRoPE(HEAD, HEAD // 2, base=10000.0, factor=2.0),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_moved_keys_match_the_models_rotation(name):
    module = MODULES[name]
    rope = describe(module)
    assert check_module(module, rope, HEAD) < MOVE_BOUND
    # per-token deltas agree with one delta per call
    keys = module(mx.random.normal((1, 2, 5, HEAD), key=mx.random.key(1)), offset=3)
    deltas = mx.array([7, 7, 7, 7, 7])
    assert mx.allclose(move_keys(keys, deltas, rope), move_keys(keys, 7, rope), atol=1e-6).item()


def test_scaled_ropes_are_not_scaled_twice():
    for name in ("yarn", "longrope"):
        rope = describe(MODULES[name])
        assert rope.input_scale != 1.0, name  # the mscale is real here, so applying it again would show
        twice = Rope(rope.kind, rope.dims, rope.traditional, rope.base, rope.scale, rope.freqs * 1.0)
        x = mx.random.normal((1, 1, 3, HEAD), key=mx.random.key(2))
        at0 = MODULES[name](x, offset=0)
        wrong = move_keys(at0 * rope.input_scale, 50, twice)  # what multiplying the scale again would give
        right = move_keys(at0, 50, rope)
        target = MODULES[name](x, offset=50)
        assert mx.abs(right - target).max().item() < 1e-3
        assert mx.abs(wrong - target).max().item() > 1e-2


def test_a_wrong_description_fails_the_module_check():
    module = MODULES["llama3"]
    wrong = Rope("RoPE", HEAD, False, 500000.0, 1.0)  # llama3 without its custom frequencies
    assert check_module(module, wrong, HEAD) > MOVE_BOUND


def test_rotate_at_scattered_positions_matches_contiguous():
    module = MODULES["default"]
    x = mx.random.normal((1, 2, 6, HEAD), key=mx.random.key(3)).astype(mx.bfloat16)
    assert mx.array_equal(rotate_at(x, mx.arange(10, 16), module), module(x, offset=10)).item()


def test_dynamic_ntk_module_is_refused():
    with pytest.raises(BlendUnsupportedError, match="dynamic NTK"):
        describe(DynamicNTKScalingRoPE(HEAD, 2048, False, 10000.0, 2.0))
    with pytest.raises(BlendUnsupportedError, match="not known"):
        describe(nn.Linear(2, 2))


def _variant(tmp_path, name, **changes):
    path = tmp_path / name
    shutil.copytree(builtin_path("tiny"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return load_model(str(path))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    {"type": "linear", "factor": 2.0},
])
def test_scaled_rope_models_pass_the_gate(tmp_path, scaling):
    lm = _variant(tmp_path, "scaled", rope_scaling=scaling)
    ropes = check_blend_support(lm)
    keys = lm.model.layers[0].self_attn.rope(mx.random.normal((1, 2, 16, 32), key=mx.random.key(4)).astype(mx.bfloat16),
                                              offset=100)
    report = gate(lm, ropes, keys)
    assert report["identity_exact"] and report["round_trip_error"] <= report["round_trip_bound"]


def test_builtin_qwen3_passes_the_gate(tiny):
    ropes = check_blend_support(tiny)
    assert len(ropes) == len(tiny.model.layers) and ropes[0].kind == "RoPE" and ropes[0].base == 1000000.0
    assert gate(tiny, ropes)["module_error"] < MOVE_BOUND


def test_dynamic_ntk_model_is_refused(tmp_path):
    lm = _variant(tmp_path, "dynamic", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(BlendUnsupportedError, match="dynamic NTK"):
        check_blend_support(lm)


def test_alibi_model_is_refused(tmp_path):
    lm = _variant(tmp_path, "alibi", position_embedding_type="alibi")
    with pytest.raises(BlendUnsupportedError, match="ALiBi"):
        check_blend_support(lm)


def test_model_without_rope_is_refused(tmp_path):
    lm = _variant(tmp_path, "norope")
    lm.model.layers[1].self_attn.rope = None
    with pytest.raises(BlendUnsupportedError, match="layer 1 .* no RoPE"):
        model_ropes(lm)


@pytest.mark.parametrize("name,match", [("hybrid", "recurrent"), ("sliding", "sliding-window")])
def test_other_cache_families_are_refused(preset, name, match):
    with pytest.raises(BlendUnsupportedError, match=match):
        check_blend_support(preset(name))


def test_kv_bits_is_refused(tiny):
    with pytest.raises(BlendUnsupportedError, match="--kv-bits"):
        check_blend_support(tiny, kv_quant=KVQuantization(bits=8, group_size=64, start=0))


def test_refusals_are_one_line_kvmlx_errors(tmp_path):
    lm = _variant(tmp_path, "dynamic2", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(KvmlxError) as e:
        check_blend_support(lm)
    assert "\n" not in str(e.value)


def test_gate_refuses_a_block_that_does_not_come_back(tiny, monkeypatch):
    import kvmlx.caches.rope as rope_mod

    ropes = check_blend_support(tiny)
    keys = mx.random.normal((1, 2, 16, 32), key=mx.random.key(5)).astype(mx.bfloat16)
    monkeypatch.setattr(rope_mod, "ROUND_TRIP_BOUND", {"bfloat16": 0.0})
    with pytest.raises(BlendUnsupportedError, match="moved and back"):
        gate(tiny, ropes, keys)
