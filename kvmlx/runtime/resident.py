"""Resident published KV: one loaded document (its caches and state checkpoints, compacted: no load
headroom) kept in memory and shared, read-only, by many requests, and `request_caches(resident, reuse)`,
the one function a server calls to give a request its own mlx-lm caches holding the document's first
`reuse` tokens. It delegates to `kvmlx.runtime.restore.caches_at`, where each cache family says how a
prefix is restored (slices of trimmable caches, a state checkpoint for the others), so the serving
layer (kvmlx.serving.engine) never touches cache internals.

The request's caches are new cache objects over new array objects: mlx-lm's in-place
`cache.keys[...] = x` rebinds the request's own array, and its first append concatenates into a
buffer of its own, so the shared arrays are never written (tests/test_server.py checks their bits).
"""

from __future__ import annotations

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
