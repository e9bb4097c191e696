"""Recurrent-state mlx-lm `ArraysCache` (Qwen3.5 / Qwen3-Next Gated DeltaNet, Mamba-style layers): each
state slot as one tensor `state.{j}` of whatever shape and dtype the layer keeps (a convolution window
in the model's dtype, a float32 recurrent state), and which slots are set.

A recurrent state summarises every token before it and cannot be trimmed: reuse below the end of a
document starts from a state checkpoint stored at a prefill-chunk boundary (runtime/publish.py).
Only single-sequence prompt caches are stored (no batch padding or lengths).
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from ..errors import UnsupportedModelError

FAMILY = "arrays"
CLASS = ArraysCache


def spec(cache: ArraysCache) -> dict:
    return {"family": FAMILY, "size": len(cache.cache)}


def save(cache: ArraysCache) -> tuple[dict, dict[str, mx.array]]:
    if cache.left_padding is not None or cache.lengths is not None:
        raise UnsupportedModelError("cannot store a batched ArraysCache (left padding or lengths set)")
    present = [c is not None for c in cache.cache]
    return {**spec(cache), "present": present}, {f"state.{j}": c for j, c in enumerate(cache.cache) if c is not None}


def load(meta: Mapping, arrays: Mapping[str, mx.array]) -> ArraysCache:
    cache = ArraysCache(meta["size"])
    cache.cache = [arrays[f"state.{j}"] if p else None for j, p in enumerate(meta["present"])]
    return cache


def trimmable_to(meta: Mapping, n: int) -> bool:
    return False
