"""Resident published KV: one loaded document (its caches and state checkpoints, compacted: no load
headroom) kept in memory and shared, read-only, by many requests, and `request_caches(resident, reuse)`,
the one function a server calls to give a request its own mlx-lm caches holding the document's first
`reuse` tokens (and `KVPool`, the least-recently-used set of them a server keeps within its budget).
It delegates to `kvmlx.runtime.restore.caches_at`, where each cache family says how a prefix is restored (slices of trimmable caches, a state checkpoint for the others), so the serving
layer (kvmlx.serving.engine) never touches cache internals.

The request's caches are new cache objects over new array objects: mlx-lm's in-place
`cache.keys[...] = x` rebinds the request's own array, and its first append concatenates into a
buffer of its own, so the shared arrays are never written (tests/test_server.py checks their bits).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from .load import LoadedKV
from .restore import caches_at, compact, loaded_nbytes


@dataclass
class ResidentKV:
    """One published document's caches (and state checkpoints), loaded once and shared (read-only) by
    every request using it."""

    key: str
    tokens: list[int]
    loaded: LoadedKV | None  # compacted: exactly the document, no load headroom
    logits: mx.array  # the stored logits row after the document's last token
    chunk_size: int
    nbytes: int
    load_seconds: float

    def request_caches(self, reuse: int) -> list:
        return request_caches(self, reuse)


def resident_from_loaded(key: str, loaded: LoadedKV, chunk_size: int) -> ResidentKV:
    """The shared copy of a loaded artifact: every cache cut to the document and evaluated."""
    loaded = compact(loaded)
    return ResidentKV(key, list(loaded.tokens), loaded, loaded.logits, chunk_size, loaded_nbytes(loaded),
                      loaded.load_seconds)


def request_caches(resident: ResidentKV, reuse: int) -> list:
    """Fresh mlx-lm caches for one request holding the document's first `reuse` tokens (a restorable
    length: see `kvmlx.runtime.restore.caches_at`); the shared caches are never modified by anything
    the request does with them."""
    return caches_at(resident.loaded, reuse)


class KVPool:
    """Loaded documents by store key, least recently used first out once over `max_bytes` (None: no limit)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, ResidentKV] = OrderedDict()
        self.evictions: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.items.values())

    def get(self, key: str) -> ResidentKV | None:
        r = self.items.get(key)
        if r is not None:
            self.items.move_to_end(key)
        return r

    def put(self, r: ResidentKV) -> None:
        """Keep `r` (most recent) and evict older entries over budget; a document larger than the whole
        budget is not kept (the request holding it still uses it)."""
        self.items[r.key] = r
        self.items.move_to_end(r.key)
        while self.max_bytes is not None and self.nbytes > self.max_bytes and self.items:
            old, _ = self.items.popitem(last=False)
            self.evictions[old] = self.evictions.get(old, 0) + 1

    def discard(self, key: str) -> None:
        self.items.pop(key, None)
