"""Resident published KV: one loaded document kept in memory and shared, read-only, by many requests,
and `request_caches(resident, reuse)`, the one function that gives a request its own mlx-lm caches
holding the document's first `reuse` tokens. A server (kvmlx.serving.engine) keeps these in a pool and
never touches cache internals itself: a new cache family (sliding window, recurrent state, quantized
KV) adds its entry to `_PREFIX` here, so the serving layer stays unchanged.

Plain `KVCache`: the request's caches hold new *slice* arrays of the shared keys/values, exactly
`reuse` long. MLX arrays are values: mlx-lm's in-place `cache.keys[...] = x` rebinds the request's own
array, and the first append (the slice has no spare room) concatenates into a buffer of the
request's own, so the shared arrays are never written (tests/test_server.py checks their bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..errors import KvmlxError
from .load import LoadedKV


@dataclass
class ResidentKV:
    """One published document's KV, loaded once and shared (read-only) by every request using it."""

    key: str
    tokens: list[int]
    caches: list  # the loaded mlx-lm caches, exactly the document (no headroom), evaluated; never written
    logits: mx.array  # the stored logits row after the document's last token
    chunk_size: int
    nbytes: int
    load_seconds: float

    def request_caches(self, reuse: int) -> list:
        return request_caches(self, reuse)


def _kv_resident(c: KVCache, n: int) -> KVCache:
    out = KVCache()
    out.keys, out.values, out.offset = mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :]), n
    return out


def _kv_prefix(c: KVCache, reuse: int) -> KVCache:
    out = KVCache()
    out.keys, out.values, out.offset = c.keys[..., :reuse, :], c.values[..., :reuse, :], reuse
    return out


# cache type -> (make the shared copy of a loaded cache holding n tokens, a request's copy of its first r)
_PREFIX: dict[type, tuple[Callable, Callable]] = {KVCache: (_kv_resident, _kv_prefix)}


def _family(c) -> tuple[Callable, Callable]:
    for kind in type(c).__mro__:
        if kind in _PREFIX:
            return _PREFIX[kind]
    raise KvmlxError(f"{type(c).__name__} caches cannot be shared between requests yet")


def resident_from_loaded(key: str, loaded: LoadedKV, chunk_size: int) -> ResidentKV:
    """The shared copy of a loaded artifact: trimmed to the document (no load headroom) and evaluated."""
    loaded.wait()
    n = len(loaded.tokens)
    caches = [_family(c)[0](c, n) for c in loaded.caches]
    mx.eval([c.state for c in caches], loaded.logits)
    nbytes = sum(c.nbytes for c in caches) + loaded.logits.nbytes
    return ResidentKV(key, list(loaded.tokens), caches, loaded.logits, chunk_size, nbytes, loaded.load_seconds)


def request_caches(resident: ResidentKV, reuse: int) -> list:
    """Fresh mlx-lm caches for one request holding the document's first `reuse` tokens; the shared
    caches are never modified by anything the request does with them."""
    if not 0 < reuse <= len(resident.tokens):
        raise ValueError(f"reuse must be in [1, {len(resident.tokens)}], got {reuse}")
    return [_family(c)[1](c, reuse) for c in resident.caches]
