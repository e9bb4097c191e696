"""The `Store`: a directory of artifacts addressed by content, found by a prompt through its prefix index.

    store = Store()                                  # $KVMLX_HOME/store, or Store("/some/dir")
    key = store.add("paper.kvmlx")                   # verified, copied in atomically
    pub = store.publish(lm, text)                    # prefill straight into the store
    hit = store.lookup(model_fp, tokenizer_fp, dtype, prompt_tokens)   # (Entry, matched) | None

This module owns the directory and what happens to its files: adding, publishing, loading, removing,
quarantining, gc, and keeping the index (`index.py`) in step with objects/ (the last three in
`maintenance.py`). Keys are in `keys.py`, the locks in `lock.py`. Layout (docs/STORE.md has the full story):

    <root>/objects/<key>.kvmlx    the artifacts: complete, verified, never modified in place
    <root>/index.sqlite           the prefix index (SQLite, WAL): a cache of the artifacts' headers
    <root>/lock                   flock'ed while files and index rows change together
    <root>/tmp/<id>/              one staging directory per writer, flock'ed by it while it works
    <root>/quarantine/            objects that failed a load (kept for inspection; gc empties it)
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ...artifact.format import ENCODINGS, Artifact, VerifiedIdentity, fsync_dir
from ...errors import ArtifactError, KvmlxError
from . import maintenance
from .index import INDEX_NAME, Index
from .keys import (
    OBJECT_SUFFIX, Entry, GcResult, ReindexResult, StoreError, StorePublish, artifact_key, default_root, header_key,
    kv_variant,
)
from .lock import StoreLock, lock_staging

if TYPE_CHECKING:
    from ...models import LoadedModel

TOUCH_EVERY = 600.0  # seconds: a use sets the file's mtime (LRU order across a reindex) at most this often


@dataclass
class VerifyResult:
    """One entry's scrub (`Store.verify`): every digest re-hashed; a bad entry is quarantined."""

    key: str
    ok: bool
    file_bytes: int
    seconds: float
    reason: str | None = None
    quarantined: str | None = None  # where the bad file went

    def to_json(self) -> dict:
        return {"key": self.key, "ok": self.ok, "file_bytes": self.file_bytes, "seconds": self.seconds,
                "reason": self.reason, "quarantined": self.quarantined}


def _same_file(recorded: VerifiedIdentity, st: os.stat_result) -> bool:
    return (recorded.device, recorded.inode, recorded.size, recorded.mtime_ns, recorded.ctime_ns) == \
        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _copy(src: Path, dst: Path) -> None:
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        raise ArtifactError(f"{src}: cannot copy into the store ({e.strerror or e})") from e


class Store:
    """A directory of artifacts addressed by content, plus a SQLite prefix index over their tokens.

    Safe for several processes at once: artifacts appear by atomic rename of complete, verified files;
    index changes are SQLite transactions (WAL); a change that touches both files and rows holds an
    exclusive `flock` on `<root>/lock`. Readers take no lock. `sync` (default) reconciles the index
    with the files on open: it lists `objects/` (no file is opened unless it is missing from the index).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, sync: bool = True):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.index_path = self.root / INDEX_NAME
        try:
            for d in (self.objects, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as a store: {e.strerror or e}") from None
        self._lock = StoreLock(self.root / "lock")
        self.index = Index(self.index_path, self._lock, object_path=self._object, rebuild=self._sync_locked)
        self._last_sync = ReindexResult()
        self.lookup = self.index.lookup  # the prefix index answers prompts (Index.lookup)
        if sync:
            self.sync()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def close(self) -> None:
        self.index.close()

    # ---- paths ----------------------------------------------------------------------------------

    def _object(self, key: str) -> Path:
        return maintenance.object_path(self.root, key)

    def path(self, key: str) -> Path:
        """The stored file of `key` (a full key or a unique prefix of one)."""
        key = self.resolve(key)
        p = self._object(key)
        if not p.exists():
            raise StoreError(f"store entry {key[:12]} has no file (run `kvmlx store reindex`)")
        return p

    def resolve(self, key: str) -> str:
        """A full key from a full key or a unique prefix of at least 4 hex digits."""
        return self.index.resolve(key)

    # ---- adding ---------------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory under tmp/ for one writer, flock'ed while it exists (gc skips it).

        Created under the store lock, so gc never sees it before its lock is held; removed on exit.
        A writer killed at any point leaves only this directory, which ls/lookup never look at and
        gc removes once its lock is free.
        """
        with self._lock:
            d = self.tmp / uuid.uuid4().hex
            d.mkdir(parents=True)
            fd = lock_staging(d)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
            os.close(fd)

    def add(self, artifact: str | os.PathLike, *, verify: bool = True) -> str:
        """Copy a validated artifact into the store (every tensor digest checked); return its key.

        Adding an artifact that is already stored keeps the stored bytes and returns the same key.
        """
        src = Path(artifact)
        with Artifact(src) as art:  # fail fast on a malformed file, before copying anything
            parts = [p["file"] for p in art.header.get("parallel", {}).get("parts", [])]
        with self.staging() as stage:
            tmp = stage / f"artifact{OBJECT_SUFFIX}"
            # a parallel artifact's manifest brings the parts found beside it (on a multi-host run, this host's)
            for name, dst in [(p, stage / p) for p in parts if (src.parent / p).exists()] + [(src.name, tmp)]:
                _copy(src.parent / name, dst)
            if parts:
                self._ingest_parts(tmp)
            return self._ingest(tmp, verify=verify)[0]

    def _ingest(self, tmp: Path, *, verify: bool = True) -> tuple[str, Entry]:
        """Validate the staged file (the copy, not the source), rename it into objects/ and index it.

        Returns the key and its entry as indexed, read under the store lock: a concurrent `gc` may evict
        the entry the moment the lock is released, and the caller still gets a complete answer."""
        with Artifact(tmp) as art:
            if verify:
                art.verify_all()
            header, signed = art.header, art.signature is not None
        key = header_key(header)
        final = self._object(key)
        with self._lock:
            ours = not self._object_ok(final, key)
            if ours:
                os.rename(tmp, final)
                fsync_dir(self.objects)
            st = final.stat()
            self.index.insert(key, header, signed, st.st_mtime, st.st_mtime)
            if ours and verify:  # the file we hashed is the one now in objects/: record its identity
                with Artifact(final) as art:
                    self.index.record_verified(key, art.identity, time.time())
            entry = self.index.entry(key)
        return key, entry

    def _object_ok(self, path: Path, key: str) -> bool:
        """Whether `path` holds a well-formed artifact whose header belongs to `key` (digests unchecked)."""
        try:
            with Artifact(path) as art:
                return header_key(art.header) == key
        except (KvmlxError, OSError):
            return False

    def publish(
        self,
        lm: "LoadedModel",
        document: str | Sequence[int],
        *,
        chunk_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        force: bool = False,
        **publish_kwargs,
    ) -> StorePublish:
        """Prefill `document` (text, or token ids) with `lm` straight into the store.

        If the same tokens are already stored for this model, tokenizer and dtype, nothing is
        computed (unless `force`): the existing entry is returned with `existed=True`. Other keyword
        arguments (`encoding=`, `sign=`, `kv_quant=`, `checkpoint_every=`) go to `kvmlx.runtime.publish.publish`.
        """
        from ...artifact.identity import model_fingerprint, tokenizer_fingerprint
        from ..distributed import check_parallel_support, gather, running_layout
        from ..publish import DEFAULT_CHUNK, publish as publish_api

        tokens = list(lm.tokenizer.encode(document)) if isinstance(document, str) else [int(t) for t in document]
        if not tokens:
            raise ValueError("the document is empty: nothing to prefill")
        encoding = publish_kwargs.get("encoding", "raw")
        lossless = bool(ENCODINGS.get(encoding, False))
        quant = publish_kwargs.get("kv_quant")
        check_parallel_support(lm, kv_quant=quant)  # before any rank waits on another
        variant = kv_variant(lm.dtype, quant.to_json() if quant else None)
        layout = running_layout(lm)
        key = artifact_key(model_fingerprint(lm), tokenizer_fingerprint(lm), variant, tokens,
                           None if lossless else encoding, layout)
        entry = None if force else self.get(key)
        if layout is not None:  # every rank prefills together: skip only if every rank's store has it
            if not all(row[0] for row in gather(lm, [entry is not None], what="looking up the key")):
                entry = None
        if entry is not None:
            return StorePublish(key, entry, None, True)
        with self.staging() as stage:
            out = stage / f"artifact{OBJECT_SUFFIX}"
            result = publish_api(lm, document, out, chunk_size=chunk_size or DEFAULT_CHUNK, progress=progress, **publish_kwargs)
            if layout is not None:  # this rank's part goes in first; no manifest is stored before every part is
                self._ingest_parts(out)
                gather(lm, [1], what="storing every rank's part")
            got, entry = self._ingest(out, verify=True)
        if got != key:  # cannot happen unless tokenization is not deterministic
            raise StoreError(f"published artifact has key {got[:12]}, expected {key[:12]}")
        result.path = entry.path  # a concurrent gc may evict it from here on; the publish itself succeeded
        return StorePublish(got, entry, result, False)

    def _ingest_parts(self, manifest: Path) -> None:
        """Move the part files a manifest lists and that sit beside it (this rank's; on one host, maybe all)
        into objects/, each checked against the manifest's digest for it and verified, before the manifest."""
        with Artifact(manifest) as art:
            parts = art.header.get("parallel", {}).get("parts", [])
        for part in parts:
            src = manifest.parent / part["file"]
            if not src.exists():
                continue
            with Artifact(src) as p:
                if p.header_digest.hex() != part["header_blake3"]:
                    raise ArtifactError(f"{src.name}: part does not match the digest its manifest records")
                p.verify_all()
            with self._lock:
                if not (self.objects / part["file"]).exists():
                    os.rename(src, self.objects / part["file"])
                    fsync_dir(self.objects)

    # ---- reading --------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry of a full key if it is indexed and its file exists, else None."""
        entry = self.index.entry(key)
        return entry if entry is not None and entry.path.exists() else None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def ls(self) -> list[Entry]:
        """Every indexed entry, most recently used first (staging and quarantined files are never listed)."""
        return self.index.ls()

    def tokens(self, key: str) -> list[int]:
        return self.index.tokens(key)

    def total_bytes(self) -> int:
        return self.index.total_bytes()

    def touch(self, key: str, when: float | None = None) -> None:
        """Record a use of `key`: in the index, and as the file's mtime when that is older than
        `TOUCH_EVERY` (so reindex keeps LRU order to that precision). Setting the mtime changes the
        file's ctime, hence its identity: a verified record that matched just before is moved along."""
        when = time.time() if when is None else when
        self.index.touch(key, when)
        path = self._object(key)
        try:
            before = os.stat(path)
            if abs(when - before.st_mtime) < TOUCH_EVERY:
                return
            recorded = self.index.verified(key)
            was = recorded is not None and _same_file(recorded, before)
            os.utime(path, (when, when))
            if was:
                after = os.stat(path)
                self.index.record_verified(key, replace(recorded, mtime_ns=after.st_mtime_ns, ctime_ns=after.st_ctime_ns),
                                           time.time())
        except OSError:
            pass

    def verified_identity(self, key: str):
        """The identity recorded when `key`'s file was last fully verified (`VerifiedIdentity`), or None."""
        return self.index.verified(key)

    def record_load(self, key: str, loaded) -> None:
        """After a load of `key`: remember the file as verified if that load hashed every digest, and
        record the use for gc's LRU order."""
        self.record_verified_load(key, loaded)
        self.touch(key)

    def record_verified_load(self, key: str, loaded) -> None:
        """Remember `key`'s file as verified if `loaded` (a `LoadedKV`) hashed every digest of it (a
        version-2 load of one state checkpoint hashes only part: digests "partial", not recorded)."""
        if loaded.digests == "hashed" and loaded.identity is not None:
            self.index.record_verified(key, loaded.identity, time.time())

    def load(self, key: str, lm: "LoadedModel", **kwargs):
        """`kvmlx.runtime.load.load_artifact` on a stored entry, recording the use for gc's LRU order.

        A file whose verified identity the store recorded (at add, publish, fetch, `verify`, or a
        hashed load) and which still has it is loaded without hashing (docs/SECURITY.md)."""
        from ..load import load_artifact

        key = self.resolve(key)
        loaded = load_artifact(self.path(key), lm, verified=self.index.verified(key), **kwargs)
        self.record_load(key, loaded)
        return loaded

    def verify(self, keys: Sequence[str] = (), *, on_result: Callable[[VerifyResult], None] | None = None
               ) -> list[VerifyResult]:
        """The scrub: re-hash every tensor of every entry (or of `keys`), quarantine the bad ones, and
        record the identity of the good ones. `on_result` is called as each entry is done."""
        out = []
        for key in [self.resolve(k) for k in keys] or sorted(self.index.keys()):
            path, t0 = self._object(key), time.perf_counter()
            try:
                with Artifact(path) as art:
                    if header_key(art.header) != key:
                        raise ArtifactError(f"{path.name}: its header belongs to another key ({header_key(art.header)[:12]})")
                    art.verify_all()
                    art.check_unchanged()
                    identity = art.identity
                self.index.record_verified(key, identity, time.time())
                res = VerifyResult(key, True, path.stat().st_size, time.perf_counter() - t0)
            except (KvmlxError, OSError) as e:
                reason = f"verify failed: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
                moved = self.discard(key, reason)
                res = VerifyResult(key, False, 0, time.perf_counter() - t0, reason, str(moved) if moved else None)
            out.append(res)
            if on_result:
                on_result(res)
        return out

    # ---- removing -------------------------------------------------------------------------------

    def rm(self, key: str) -> Entry:
        """Remove one entry (a full key or unique prefix): its index row first, then its file (and parts)."""
        with self._lock:
            key = self.resolve(key)
            entry = self.index.entry(key)
            self.index.drop([key])
            maintenance.remove_object(self.root, key)
            fsync_dir(self.objects)
        return entry

    def discard(self, key: str, reason: str = "") -> Path | None:
        """Take an entry out of service after a failed load: drop its row, move its file to quarantine/
        (returned, with `reason` in a `.reason.txt` beside it)."""
        return maintenance.quarantine(self.root, self.index, key, reason)

    def gc(self, max_bytes: int | None = None) -> GcResult:
        """Remove dead writers' staging directories and quarantined files; then, with `max_bytes`,
        evict least recently used entries until the artifacts total at most `max_bytes`."""
        return maintenance.gc(self.root, self.index, max_bytes)

    # ---- index maintenance ----------------------------------------------------------------------

    def sync(self) -> ReindexResult:
        """Reconcile the index with objects/: index files it lacks, drop rows whose file is gone."""
        with self._lock:
            self.index.db()
            return self._sync_locked()

    def reindex(self) -> ReindexResult:
        """Rebuild the index from the files' headers (last use comes back from each file's mtime)."""
        with self._lock:
            self.index.discard()
            return self._last_sync

    def _sync_locked(self) -> ReindexResult:
        self._last_sync = maintenance.reconcile(self.root, self.index)
        return self._last_sync
