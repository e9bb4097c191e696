"""Moving stored keys to new positions with the model's own RoPE (position-independent reuse).

A stored key at position p is `R(p) · (s · W_k h)`: the model's rotation R at p of the projected key,
times whatever magnitude scale s its RoPE multiplies in first (YaRN's and su-scaled/longrope's
mscale). Rotations compose, R(p + d) = R(d) · R(p), so a key moves from p to p + d by rotating it by d
alone, with the model's exact frequencies and position scale and *without* s: s is already inside
the stored key, and multiplying it again would scale the key twice.

Every RoPE in mlx-lm goes through `mx.fast.rope(x, dims, traditional, base, scale, offset, freqs)`;
the variants differ only in those arguments (`mlx_lm/models/rope_utils.py`):

    nn.RoPE (default, linear)     dims (partial rotary: dims < head_dim), traditional, base, scale
    Llama3RoPE, YarnRoPE,         dims, traditional, base=None, scale=1, freqs=_freqs
    ProportionalRoPE, SuScaledRoPE    (Yarn's mscale and SuScaled's _scale multiply the input: not moved)

`move_keys(keys, delta, rope)` applies R(delta) to every token of a [B, H, L, D] block (one position
per call: the block is reshaped so that MLX's sequence axis has length 1 and `offset` is delta).

Refused by name (`BlendUnsupportedError`, one line): dynamic NTK (its base depends on the sequence
length, so R(p + d) != R(d) · R(p)), attention without RoPE, ALiBi, rope modules this file does not
know, recurrent or sliding-window caches, and `--kv-bits` KV (stored quantized: cannot be rotated).

The gate (`gate`) runs per model before any reuse at a new offset: (1) the module check: for random
keys, the model's own rope module at p + d against `move_keys` of the module's output at p, within
MOVE_BOUND (this is what catches a scale multiplied twice or wrong frequencies); (2) on a stored
block: moving it by 0 gives its keys back bit-exactly; moving it by d and back stays within
ROUND_TRIP_BOUND of its keys (relative L2 per token). Otherwise the model is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..errors import BlendUnsupportedError
from .families import model_specs

# relative L2 error per token of a moved key against the model's rope at the new position (float32 inputs):
# float32 cos/sin of angles up to |p + d| * max frequency differ by ~|p + d| * 2^-24 rad
MOVE_BOUND = 1e-3
# relative L2 error per token of a stored block moved by d and back: two roundings to the KV dtype
# (bfloat16: 2^-8 relative each) plus the float32 angle error above
ROUND_TRIP_BOUND = {"bfloat16": 2.0 ** -6, "float16": 2.0 ** -9, "float32": 1e-4}
GATE_DELTAS = (1, 37, 1024)
GATE_OFFSETS = (0, 5, 300)


@dataclass(frozen=True)
class Rope:
    """One layer's rotation as `mx.fast.rope` arguments (no input scale: see the module docstring)."""

    kind: str  # the mlx-lm class name: RoPE, Llama3RoPE, YarnRoPE, SuScaledRoPE, ProportionalRoPE
    dims: int
    traditional: bool
    base: float | None
    scale: float
    freqs: Any = None  # mx.array of the rotated pairs' periods, or None (then base)
    input_scale: float = 1.0  # multiplied into keys before rotating by the model (already in stored keys)

    def to_json(self) -> dict:
        return {"kind": self.kind, "dims": self.dims, "traditional": self.traditional, "base": self.base,
                "scale": self.scale, "custom_freqs": self.freqs is not None, "input_scale": self.input_scale}


def describe(module: Any) -> Rope:
    """The `Rope` of an mlx-lm rope module, or BlendUnsupportedError naming what cannot be moved."""
    name = type(module).__name__
    if name == "DynamicNTKScalingRoPE":
        raise BlendUnsupportedError("dynamic NTK RoPE cannot be re-rotated (its base depends on the sequence length)")
    if isinstance(module, nn.RoPE):
        return Rope(name, int(module.dims), bool(module.traditional), float(module.base), float(module.scale))
    if name in ("Llama3RoPE", "ProportionalRoPE"):
        return Rope(name, int(module.dims), bool(module.traditional), None, 1.0, module._freqs)
    if name == "YarnRoPE":
        return Rope(name, int(module.dims), bool(module.traditional), None, 1.0, module._freqs, float(module.mscale))
    if name == "SuScaledRoPE":
        return Rope(name, int(module.dim), False, None, 1.0, module._freqs, float(module._scale))
    raise BlendUnsupportedError(f"RoPE {name} is not known to kvmlx's re-rotation")


def model_ropes(lm) -> list[Rope]:
    """Each layer's `Rope`; refuses models whose KV cannot be moved to new positions (module docstring)."""
    cfg = lm.config
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind == "dynamic":
        raise BlendUnsupportedError("dynamic NTK RoPE cannot be re-rotated (its base depends on the sequence length)")
    if cfg.get("alibi") or str(cfg.get("position_embedding_type", "")).lower() == "alibi" \
            or cfg.get("model_type") in ("bloom", "mpt"):
        raise BlendUnsupportedError(f"{cfg.get('model_type')} uses ALiBi position biases, not RoPE: no keys to re-rotate")
    ropes = []
    for i, layer in enumerate(lm.model.layers):
        attn = getattr(layer, "self_attn", None)
        rope = getattr(attn, "rope", None)
        if rope is None:
            raise BlendUnsupportedError(f"layer {i} of {cfg.get('model_type')} has no RoPE attention: nothing to re-rotate")
        ropes.append(describe(rope))
    return ropes


def move_keys(keys: mx.array, delta: int | mx.array, rope: Rope) -> mx.array:
    """`keys` [..., L, D] rotated by `delta` positions (an int, or an array of one delta per token, L)."""
    shape = keys.shape
    if isinstance(delta, int):
        if delta == 0:
            return keys
        flat = keys.reshape(-1, 1, shape[-1])  # every token one sequence of length 1 at offset delta
        out = mx.fast.rope(flat, rope.dims, traditional=rope.traditional, base=rope.base, scale=rope.scale,
                           offset=delta, freqs=rope.freqs)
        return out.reshape(shape)
    # per-token deltas: tokens on the batch axis, each at its own offset
    x = keys.reshape(-1, shape[-2], shape[-1]).transpose(1, 0, 2)[:, :, None, :]  # [L, B*H, 1, D]
    out = mx.fast.rope(x, rope.dims, traditional=rope.traditional, base=rope.base, scale=rope.scale,
                       offset=delta.astype(mx.int32), freqs=rope.freqs)
    return out[:, :, 0, :].transpose(1, 0, 2).reshape(shape)


def rotate_at(x: mx.array, positions: mx.array, module: Any) -> mx.array:
    """`x` [B, H, L, D] (unrotated) rotated by the model's own `module` with token j at `positions[j]`:
    through the module itself (its input scale included) with tokens on the batch axis."""
    B, H, L, D = x.shape
    y = x.transpose(2, 0, 1, 3).reshape(L, B * H, 1, D)
    out = module(y, offset=positions.astype(mx.int32))
    return out.reshape(L, B, H, D).transpose(1, 2, 0, 3)


def _rel_err(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    num = mx.sqrt(mx.sum((a - b) ** 2, axis=-1))
    den = mx.maximum(mx.sqrt(mx.sum(b * b, axis=-1)), 1e-30)
    return float(mx.max(num / den).item())


def check_module(module: Any, rope: Rope, head_dim: int, deltas: Sequence[int] = GATE_DELTAS) -> float:
    """The largest relative error of `move_keys` against the model's module at the new position."""
    x = mx.random.normal((1, 2, 4, head_dim), key=mx.random.key(22))
    worst = 0.0
    for p in GATE_OFFSETS:
        at_p = module(x, offset=p)
        for d in deltas:
            worst = max(worst, _rel_err(move_keys(at_p, d, rope), module(x, offset=p + d)))
    return worst


def gate(lm, ropes: Sequence[Rope] | None = None, keys: mx.array | None = None) -> dict:
    """The per-model gate (module docstring); returns what it measured, raises BlendUnsupportedError."""
    ropes = list(ropes) if ropes is not None else model_ropes(lm)
    layers = lm.model.layers
    head_dim = int(keys.shape[-1]) if keys is not None else int(lm.config.get("head_dim") or
                                                               lm.config["hidden_size"] // lm.config["num_attention_heads"])
    seen: dict[int, float] = {}
    for i, rope in enumerate(ropes):
        module = layers[i].self_attn.rope
        if id(module) not in seen:
            seen[id(module)] = check_module(module, rope, head_dim)
            if seen[id(module)] > MOVE_BOUND:
                raise BlendUnsupportedError(
                    f"{rope.kind} at layer {i}: moved keys differ from the model's rotation by {seen[id(module)]:.2e} "
                    f"(bound {MOVE_BOUND:.0e}): refusing to re-rotate")
    report = {"module_error": max(seen.values()) if seen else 0.0, "move_bound": MOVE_BOUND}
    if keys is not None:
        if not mx.array_equal(_move_zero(keys, ropes[0]), keys).item():
            raise BlendUnsupportedError("re-rotating a stored block to its own position changed its keys: refusing")
        bound = ROUND_TRIP_BOUND.get(str(keys.dtype).split(".")[-1], 1e-4)
        worst = max(_rel_err(move_keys(move_keys(keys, d, ropes[0]), -d, ropes[0]), keys) for d in GATE_DELTAS)
        if worst > bound:
            raise BlendUnsupportedError(f"a stored block moved and back differs by {worst:.2e} (bound {bound:.1e}): refusing")
        report.update(round_trip_error=worst, round_trip_bound=bound, identity_exact=True)
    return report


def _move_zero(keys: mx.array, rope: Rope) -> mx.array:
    """Rotation by zero through `mx.fast.rope` itself (not the shortcut in `move_keys`)."""
    shape = keys.shape
    out = mx.fast.rope(keys.reshape(-1, 1, shape[-1]), rope.dims, traditional=rope.traditional, base=rope.base,
                       scale=rope.scale, offset=0, freqs=rope.freqs)
    return out.reshape(shape)


def check_blend_support(lm, *, kv_quant=None, specs: Sequence[dict] | None = None) -> list[Rope]:
    """Refuse by name what position-independent reuse cannot serve; return each layer's `Rope`."""
    if kv_quant is not None:
        raise BlendUnsupportedError("--kv-bits KV is stored quantized and cannot be re-rotated: blend needs plain KV")
    if lm.group is not None:
        raise BlendUnsupportedError("blend runs in one process only (not under mlx.launch)")
    for i, s in enumerate(specs if specs is not None else model_specs(lm.model)):
        if s["family"] == "rotating":
            raise BlendUnsupportedError(f"layer {i} keeps a sliding-window cache: its stored window cannot be moved")
        if s["family"] != "kv":
            raise BlendUnsupportedError(f"layer {i} keeps a {s['family']} cache (recurrent state): it cannot be moved")
    return model_ropes(lm)
