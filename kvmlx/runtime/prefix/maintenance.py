"""The prefix cache without a model: what `kvmlx store stats`, `store gc` and `store purge --cached` do
to every model's records of a store (under the cache lock, as writers take it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ...artifact.blockfile import read_record
from ...errors import KvmlxError
from ..store.lock import StoreLock
from .index import CacheIndex, Row


def _files(cache: Path):
    for d in ("records", "tmp"):
        yield from (p for p in (cache / d).rglob("*") if p.is_file())


def purge(root: str | os.PathLike) -> dict:
    """Remove every cached record of a store (all models). Published artifacts stay; the directories
    stay too (a running server keeps writing into them)."""
    cache = Path(root) / "cache"
    if not (cache / "index.sqlite").exists():
        return {"records": 0, "bytes": 0}
    with StoreLock(cache / "lock"):
        index = CacheIndex(cache / "index.sqlite")
        try:
            totals = index.totals()
            index.drop(index.keys())  # rows first: a reader sees misses, never a row without its file
        finally:
            index.close()
        for p in _files(cache):
            p.unlink(missing_ok=True)
    return {"records": totals["records"], "bytes": totals["bytes"]}


def evict_to(root: str | os.PathLike, max_bytes: int, *, stale_seconds: float = 3600.0) -> dict:
    """`store gc` for the prefix cache (every model): least recently used leaves out until the records
    total at most `max_bytes`; rows whose parent is gone and writers' temp files older than
    `stale_seconds` removed. Returns what it freed."""
    cache = Path(root) / "cache"
    out = {"evicted": 0, "freed_bytes": 0, "temp_removed": 0}
    if not (cache / "index.sqlite").exists():
        return out
    with StoreLock(cache / "lock"):
        index = CacheIndex(cache / "index.sqlite")
        try:
            def drop(row: Row) -> None:
                index.drop([row.key])
                (cache / "records" / row.key[:2] / f"{row.key}.kvblk").unlink(missing_ok=True)
                out["evicted"] += 1
                out["freed_bytes"] += row.file_bytes

            for key in index.orphans():
                row = index.get(key)
                if row is not None:
                    drop(row)
            total = index.total_bytes()
            while total > max_bytes:
                leaves = index.leaves(64)
                if not leaves:
                    break
                for row in leaves:
                    drop(row)
                    total -= row.file_bytes
                    if total <= max_bytes:
                        break
        finally:
            index.close()
        now = time.time()
        for p in (cache / "tmp").glob(".record.*"):
            try:
                if now - p.stat().st_mtime > stale_seconds:
                    p.unlink()
                    out["temp_removed"] += 1
            except OSError:
                pass
    return out


def summary(root: str | os.PathLike) -> dict:
    """What a store's prefix cache holds on disk (every model), without loading any model."""
    path = Path(root) / "cache" / "index.sqlite"
    if not path.exists():
        return {"records": 0, "bytes": 0, "segments": 0, "snapshots": 0, "tokens": 0}
    index = CacheIndex(path)
    try:
        return index.totals()
    finally:
        index.close()


def verify(root: str | os.PathLike) -> dict:
    """`store verify --cached`: re-hash every cached record; one that fails (or whose header names
    another key) loses its row and moves to quarantine/ with a reason, as a failed read does."""
    cache = Path(root) / "cache"
    out = {"ok": 0, "bad": []}
    if not (cache / "index.sqlite").exists():
        return out
    index = CacheIndex(cache / "index.sqlite")
    try:
        for key in index.keys():
            path = cache / "records" / key[:2] / f"{key}.kvblk"
            try:
                if read_record(path).header["key"] != key:
                    raise KvmlxError(f"{path.name}: its header names another record")
                out["ok"] += 1
            except FileNotFoundError:
                continue  # evicted meanwhile
            except (KvmlxError, OSError) as e:
                reason = f"verify failed: {e}"
                with StoreLock(cache / "lock"):
                    index.drop([key])
                    quarantine = Path(root) / "quarantine"
                    quarantine.mkdir(mode=0o700, exist_ok=True)
                    dest = quarantine / f"cache-{key}.kvblk"
                    try:
                        os.replace(path, dest)
                        (quarantine / f"cache-{key}.reason.txt").write_text(reason + "\n")
                    except OSError:
                        path.unlink(missing_ok=True)
                out["bad"].append({"key": key, "reason": reason, "quarantined": str(dest)})
    finally:
        index.close()
    return out
