"""Quantized mlx-lm `QuantizedKVCache` (`--kv-bits`): keys and values as MLX group-wise affine
quantisation, each three tensors `keys.q` (packed uint32 words), `keys.scales`, `keys.biases`
[1, kv_heads, offset, ...] (the same for `values`), plus `bits` and `group_size`.

`KVQuantization` is mlx-lm's quantized pipeline (`mlx_lm.generate`'s `kv_bits`, `kv_group_size`,
`quantized_kv_start`): after every model call, each cache that can be quantized and holds at least
`start` tokens is replaced by its `to_quantized` form. Publishing and continuing with the same
settings therefore give the same caches as a from-scratch run with them; quantizing a full-precision
artifact at load would not (the tokens after `start` were computed against unquantized keys), so
kvmlx refuses any difference in these settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache

FAMILY = "quantized"
CLASS = QuantizedKVCache
PARTS = ("q", "scales", "biases")
BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64  # mlx_lm.generate's --kv-group-size default
DEFAULT_START = 5000  # mlx_lm.generate's DEFAULT_QUANTIZED_KV_START


@dataclass(frozen=True)
class KVQuantization:
    """mlx-lm's KV quantization settings; `apply` is its `maybe_quantize_kv_cache`."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    start: int = DEFAULT_START

    def apply(self, caches: list) -> None:
        for i, c in enumerate(caches):
            if hasattr(c, "to_quantized") and c.offset >= self.start:
                caches[i] = c.to_quantized(group_size=self.group_size, bits=self.bits)

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "start": self.start}

    @classmethod
    def from_json(cls, d: Mapping | None) -> "KVQuantization | None":
        return None if d is None else cls(d["bits"], d["group_size"], d["start"])

    def describe(self) -> str:
        return f"--kv-bits {self.bits} --kv-group-size {self.group_size} --quantized-kv-start {self.start}"


def apply(quant: "KVQuantization | None", caches: list) -> None:
    """Quantize `caches` in place as mlx-lm's pipeline would after a model call (no-op without settings)."""
    if quant is not None:
        quant.apply(caches)


def spec(cache: QuantizedKVCache) -> dict:
    return {"family": FAMILY, "bits": int(cache.bits), "group_size": int(cache.group_size)}


def save(cache: QuantizedKVCache) -> tuple[dict, dict[str, mx.array]]:
    n = cache.offset
    out = {f"{kind}.{part}": mx.contiguous(x[..., :n, :])
           for kind, parts in (("keys", cache.keys), ("values", cache.values)) for part, x in zip(PARTS, parts)}
    return {**spec(cache), "offset": int(n)}, out


def load(meta: Mapping, arrays: Mapping[str, mx.array]) -> QuantizedKVCache:
    cache = QuantizedKVCache(group_size=meta["group_size"], bits=meta["bits"])
    cache.keys = tuple(arrays[f"keys.{p}"] for p in PARTS)
    cache.values = tuple(arrays[f"values.{p}"] for p in PARTS)
    cache.offset = meta["offset"]
    return cache


def trimmable_to(meta: Mapping, n: int) -> bool:
    return 0 <= n <= meta["offset"]
