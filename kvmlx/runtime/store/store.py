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
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ...artifact.format import ENCODINGS, Artifact, fsync_dir
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
        Artifact(src).close()  # fail fast on a malformed file, before copying anything
        with self.staging() as stage:
            tmp = stage / f"artifact{OBJECT_SUFFIX}"
            try:
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
                    fout.flush()
                    os.fsync(fout.fileno())
            except OSError as e:
                raise ArtifactError(f"{src}: cannot copy into the store ({e.strerror or e})") from e
            return self._ingest(tmp, verify=verify)

    def _ingest(self, tmp: Path, *, verify: bool = True) -> str:
        """Validate the staged file (the copy, not the source), rename it into objects/ and index it."""
        with Artifact(tmp) as art:
            if verify:
                art.verify_all()
            header, signed = art.header, art.signature is not None
        key = header_key(header)
        final = self._object(key)
        with self._lock:
            if not self._object_ok(final, key):
                os.rename(tmp, final)
                fsync_dir(self.objects)
            st = final.stat()
            self.index.insert(key, header, signed, st.st_mtime, st.st_mtime)
        return key

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
        from ..publish import DEFAULT_CHUNK, publish as publish_api

        tokens = list(lm.tokenizer.encode(document)) if isinstance(document, str) else [int(t) for t in document]
        if not tokens:
            raise ValueError("the document is empty: nothing to prefill")
        encoding = publish_kwargs.get("encoding", "raw")
        lossless = bool(ENCODINGS.get(encoding, False))
        quant = publish_kwargs.get("kv_quant")
        variant = kv_variant(lm.dtype, quant.to_json() if quant else None)
        key = artifact_key(model_fingerprint(lm), tokenizer_fingerprint(lm), variant, tokens,
                           None if lossless else encoding)
        if not force and (entry := self.get(key)) is not None:
            return StorePublish(key, entry, None, True)
        with self.staging() as stage:
            out = stage / f"artifact{OBJECT_SUFFIX}"
            result = publish_api(lm, document, out, chunk_size=chunk_size or DEFAULT_CHUNK, progress=progress, **publish_kwargs)
            got = self._ingest(out, verify=True)
        if got != key:  # cannot happen unless tokenization is not deterministic
            raise StoreError(f"published artifact has key {got[:12]}, expected {key[:12]}")
        entry = self.get(got)
        result.path = entry.path
        return StorePublish(got, entry, result, False)

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
        """Record a use of `key` (in the index and as the file's mtime, so reindex keeps LRU order)."""
        when = time.time() if when is None else when
        self.index.touch(key, when)
        try:
            os.utime(self._object(key), (when, when))
        except OSError:
            pass

    def load(self, key: str, lm: "LoadedModel", **kwargs):
        """`kvmlx.runtime.load.load_artifact` on a stored entry, recording the use for gc's LRU order."""
        from ..load import load_artifact

        loaded = load_artifact(self.path(key), lm, **kwargs)
        self.touch(self.resolve(key))
        return loaded

    # ---- removing -------------------------------------------------------------------------------

    def rm(self, key: str) -> Entry:
        """Remove one entry (a full key or unique prefix): its index row first, then its file."""
        with self._lock:
            key = self.resolve(key)
            entry = self.index.entry(key)
            self.index.drop([key])
            self._object(key).unlink(missing_ok=True)
            fsync_dir(self.objects)
        return entry

    def discard(self, key: str, reason: str = "") -> None:
        """Take an entry out of service after a failed load: drop its row, move its file to quarantine/."""
        maintenance.quarantine(self.root, self.index, key, reason)

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
