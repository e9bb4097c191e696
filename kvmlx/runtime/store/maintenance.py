"""Keeping a `Store` tidy and its index true to its files: `reconcile` the index with objects/,
`quarantine` an object that failed a load, and `gc` (dead writers' staging directories, quarantined
files, and least recently used entries over a size budget). Functions of a store's root directory
and its index; each changes files and index rows together, so each runs under the store-wide lock.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from ...artifact.format import Artifact, fsync_dir
from ...errors import KvmlxError
from .index import Index
from .keys import _KEY_RE, OBJECT_SUFFIX, GcResult, ReindexResult, header_key
from .lock import dead_staging

PART_GRACE_SECONDS = 3600.0  # gc leaves unlisted parts younger than this (their publish may still be running)
_PART_RE = re.compile(r"\.rank\d+of\d+$")  # a parallel artifact's part file (runtime/distributed.py names them)


def object_path(root: Path, key: str) -> Path:
    """Where `key`'s artifact lives in the store at `root`."""
    return root / "objects" / f"{key}{OBJECT_SUFFIX}"


def part_files(root: Path, key: str) -> list[Path]:
    """The part files a stored parallel artifact's manifest lists (artifact/layout.py), where present."""
    try:
        with Artifact(object_path(root, key)) as art:
            parts = art.header.get("parallel", {}).get("parts", [])
    except (KvmlxError, OSError):
        return []
    return [p for p in (root / "objects" / e["file"] for e in parts) if p.exists()]


def remove_object(root: Path, key: str) -> None:
    """Unlink `key`'s object and the parts it lists (the caller holds the store lock)."""
    parts = part_files(root, key)
    object_path(root, key).unlink(missing_ok=True)
    for p in parts:
        p.unlink(missing_ok=True)


def reconcile(root: Path, index: Index) -> ReindexResult:
    """Index the files of objects/ that the index lacks, drop rows whose file is gone (lock held)."""
    res = ReindexResult()
    names = {}
    with os.scandir(root / "objects") as it:
        for e in it:
            stem = e.name[: -len(OBJECT_SUFFIX)] if e.name.endswith(OBJECT_SUFFIX) else ""
            if _KEY_RE.match(stem) and e.is_file(follow_symlinks=False):
                names[stem] = e
            elif not e.name.startswith(".") and not _PART_RE.search(e.name):  # parts belong to their manifests
                res.skipped.append(e.name)
    indexed = index.keys()
    gone = sorted(indexed - names.keys())
    index.drop(gone)
    res.dropped = len(gone)
    for key in sorted(names.keys() - indexed):
        path = object_path(root, key)
        try:
            with Artifact(path) as art:
                header, signed = art.header, art.signature is not None
        except (KvmlxError, OSError):
            res.skipped.append(path.name)
            continue
        if header_key(header) != key:
            res.skipped.append(path.name)
            continue
        st = path.stat()
        index.insert(key, header, signed, st.st_mtime, st.st_mtime)
        res.indexed += 1
    return res


def quarantine(root: Path, index: Index, key: str, reason: str = "") -> Path | None:
    """Drop `key`'s row and move its file to quarantine/, with `reason` in a file beside that copy
    (`<key>.<time_ns>.kvmlx` and `<key>.<time_ns>.kvmlx.reason.txt`: each quarantined copy keeps its
    own reason). Returns the quarantined copy's path, None when the file was already gone."""
    with index.lock:
        index.drop([key])
        src = object_path(root, key)
        for part in part_files(root, key):  # a bad part takes its manifest out of service; the parts go too
            part.unlink(missing_ok=True)
        if not src.exists():
            return None
        (root / "quarantine").mkdir(exist_ok=True)
        dst = root / "quarantine" / f"{key}.{time.time_ns()}{OBJECT_SUFFIX}"
        while dst.exists():  # two quarantines within one clock tick
            dst = dst.with_name(f"{key}.{time.time_ns() + 1}{OBJECT_SUFFIX}")
        os.replace(src, dst)
        dst.with_name(dst.name + ".reason.txt").write_text((reason or "no reason given") + "\n", encoding="utf-8")
        return dst


def _orphan_parts(root: Path, grace: float = PART_GRACE_SECONDS) -> int:
    """Remove part files in objects/ that no stored manifest lists (a publish whose ranks did not all
    finish), once older than `grace` seconds: a running publish moves its parts in before its manifest."""
    listed: set[str] = set()
    parts = []
    with os.scandir(root / "objects") as it:
        for e in it:
            if _PART_RE.search(e.name):
                parts.append(e)
            elif e.name.endswith(OBJECT_SUFFIX) and _KEY_RE.match(e.name[: -len(OBJECT_SUFFIX)]):
                listed.update(p.name for p in part_files(root, e.name[: -len(OBJECT_SUFFIX)]))
    removed = 0
    for e in parts:
        if e.name not in listed and time.time() - e.stat(follow_symlinks=False).st_mtime > grace:
            Path(e.path).unlink(missing_ok=True)
            removed += 1
    return removed


def gc(root: Path, index: Index, max_bytes: int | None = None) -> GcResult:
    """Remove dead writers' staging directories, quarantined files and parts no manifest lists, sync,
    then evict least recently used entries until the artifacts total at most `max_bytes` (none evicted without it)."""
    out = GcResult()
    with index.lock:
        tmp, quarantined = root / "tmp", root / "quarantine"
        for d in sorted(tmp.iterdir()) if tmp.exists() else []:
            if dead_staging(d):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                out.temp_removed += 1
        if quarantined.exists():
            for f in quarantined.iterdir():
                f.unlink(missing_ok=True)
                out.quarantine_removed += 1
        reconcile(root, index)
        out.parts_removed = _orphan_parts(root)
        rows = index.lru()
        total = sum(b for _, b in rows)
        victims = []
        if max_bytes is not None:
            for key, nbytes in rows:
                if total <= max_bytes:
                    break
                victims.append(key)
                total -= nbytes
                out.freed_bytes += nbytes
        index.drop(victims)
        for key in victims:
            remove_object(root, key)
        if victims:
            fsync_dir(root / "objects")
        out.evicted = victims
        out.kept, out.kept_bytes = len(rows) - len(victims), total
    return out
