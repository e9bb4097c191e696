"""Sliding-window mlx-lm `RotatingKVCache` (Gemma 3, gpt-oss): the whole window buffer as two tensors
`keys` / `values` [1, kv_heads, buffer, head_dim], stored as it is (rotated, with its spare slots), and
the four integers that make it exact: `offset` (tokens seen), `max_size` (the window), `keep` (leading
tokens never evicted) and `idx` (the rotation index, mlx-lm's `_idx`).

A rotating cache past its window cannot be trimmed back (the evicted tokens are gone), so prefix reuse
below the end of a document uses a window checkpoint (runtime/publish.py stores them).
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache

FAMILY = "rotating"
CLASS = RotatingKVCache


def spec(cache: RotatingKVCache) -> dict:
    """What the model fixes: the window and how many leading tokens it keeps."""
    return {"family": FAMILY, "max_size": int(cache.max_size), "keep": int(cache.keep)}


def save(cache: RotatingKVCache) -> tuple[dict, dict[str, mx.array]]:
    meta = {**spec(cache), "offset": int(cache.offset), "idx": int(cache._idx)}
    return meta, {"keys": cache.keys, "values": cache.values}


def load(meta: Mapping, arrays: Mapping[str, mx.array]) -> RotatingKVCache:
    cache = RotatingKVCache(max_size=meta["max_size"], keep=meta["keep"])
    cache.keys, cache.values = arrays["keys"], arrays["values"]
    cache.offset, cache._idx = meta["offset"], meta["idx"]
    return cache


def trimmable_to(meta: Mapping, n: int) -> bool:
    """mlx-lm trims a rotating cache only while it has not wrapped (offset < window)."""
    return meta["offset"] < meta["max_size"] and 0 <= n <= meta["offset"]
