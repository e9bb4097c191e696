"""Plain mlx-lm `KVCache`: each layer's keys and values as two BHLD tensors `layers.{i}.keys` /
`layers.{i}.values` of shape [1, kv_heads, tokens, head_dim], and back into `KVCache` objects
(including `StreamedKVCache`, whose layers are still arriving from a loader thread). The version-1
layout, and the `kv` family of version 2 (caches/families.py).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..artifact.format import kv_tensor_names

FAMILY = "kv"
CLASS = KVCache


def all_plain(model: Any) -> bool:
    """Whether every cache the model makes is a plain `KVCache` (the version-1 artifact layout)."""
    caches = make_prompt_cache(model)
    return bool(caches) and all(type(c) is KVCache for c in caches)


def spec(cache: KVCache) -> dict:
    return {"family": FAMILY}


def save(cache: KVCache) -> tuple[dict, dict[str, mx.array]]:
    n = cache.offset
    return {**spec(cache), "offset": int(n)}, {"keys": mx.contiguous(cache.keys[..., :n, :]),
                                               "values": mx.contiguous(cache.values[..., :n, :])}


def load(meta, arrays) -> KVCache:
    return from_arrays([arrays["keys"], arrays["values"]], meta["offset"])[0]


def trimmable_to(meta, n: int) -> bool:
    return 0 <= n <= meta["offset"]


def kv_arrays(caches: Sequence[KVCache], n: int) -> list[tuple[str, mx.array]]:
    """The first `n` positions of every layer's keys and values, named as the artifact stores them."""
    arrays = [mx.contiguous(buf[..., :n, :]) for c in caches for buf in (c.keys, c.values)]
    return list(zip(kv_tensor_names(len(caches)), arrays))


def from_arrays(arrays: Sequence[mx.array], n: int) -> list[KVCache]:
    """`KVCache`s over [keys0, values0, keys1, ...] buffers holding `n` valid positions (spare slots after)."""
    caches = []
    for keys, values in zip(arrays[::2], arrays[1::2]):
        cache = KVCache()
        cache.keys, cache.values, cache.offset = keys, values, n
        caches.append(cache)
    return caches


class StreamedKVCache(KVCache):
    """A `KVCache` whose prefix is still being read in by a worker thread.

    Every access waits for this layer's read (and its digest check) to finish; the wait first starts
    MLX on the layers before it, so loading and computing overlap. Once ready, it is a plain KVCache.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: int, loading: Future):
        super().__init__()
        self.keys, self.values, self.offset = keys, values, offset
        self._loading = loading

    def wait(self, *pending: mx.array) -> None:
        """Block until this layer is loaded; raise the loader's error (e.g. a bad digest) if it failed."""
        if pending and not self._loading.done():
            mx.async_eval(*pending)
        self._loading.result()

    def update_and_fetch(self, keys, values):
        self.wait(keys, values)
        return super().update_and_fetch(keys, values)

    @property
    def state(self):
        self.wait()
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v
