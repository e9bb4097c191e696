"""A content-addressed local store of artifacts, and the prefix index that finds them by a prompt.

    store = Store()                                  # $KVMLX_HOME/store, or Store("/some/dir")
    key = store.add("paper.kvmlx")                   # verified, copied in atomically
    pub = store.publish(lm, text)                    # prefill straight into the store
    hit = store.lookup(model_fp, tokenizer_fp, dtype, prompt_tokens)   # (Entry, matched) | None

Layout (docs/STORE.md has the full story):

    <root>/objects/<key>.kvmlx    the artifacts: complete, verified, never modified in place
    <root>/index.sqlite           the prefix index (SQLite, WAL): a cache of the artifacts' headers
    <root>/lock                   flock'ed while files and index rows change together
    <root>/tmp/<id>/              one staging directory per writer, flock'ed by it while it works
    <root>/quarantine/            objects that failed a load (kept for inspection; gc empties it)

Key: BLAKE3 hex of canonical JSON of (model fingerprint, tokenizer fingerprint, KV dtype, token ids),
plus the encoding's name for lossily encoded (quantised) KV, which is different KV. The same tokens
for the same model, tokenizer and dtype are one entry, whoever published them; lossless encodings
(raw, zstd) of the same KV are the same entry.

Prefix index: every artifact's token prefix is hashed at every BLOCK-token boundary (a chain
h_d = BLAKE3(h_{d-1} || tokens of block d), h_0 = the (model, tokenizer, dtype) bucket, as vLLM's
block hashes); each (hash, artifact) row also holds the artifact's next (up to BLOCK) tokens. A
lookup hashes the prompt's blocks the same way, binary-searches the deepest hash present
(O(log blocks) probes of a clustered index), then reads the two rows of that depth whose next-block
bytes sort next to the prompt's (one of them shares the longest prefix), so a lookup is a dozen
indexed queries whatever the number of artifacts. No artifact file is opened. The index only
caches what the files' headers say: `reindex()` rebuilds it from the files, and a missing or corrupt
index is rebuilt on open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import blake3
import numpy as np

from ...errors import ArtifactError, KvmlxError
from ...artifact.format import ENCODINGS, Artifact, canonical_json, fsync_dir
from ...models import kvmlx_home

if TYPE_CHECKING:
    from ...models import LoadedModel
    from ..publish import PublishResult

BLOCK = 16  # tokens per prefix block (vLLM's default block size)
SCHEMA_VERSION = 5
KEY_VERSION = 1
INDEX_NAME = "index.sqlite"
OBJECT_SUFFIX = ".kvmlx"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_BYTES = 16
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    bucket TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_fp TEXT NOT NULL,
    tokenizer_fp TEXT NOT NULL,
    dtype TEXT NOT NULL,
    encoding TEXT NOT NULL,
    lossless INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    file_bytes INTEGER NOT NULL,
    text_blake3 TEXT,
    signed INTEGER NOT NULL,
    added REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_lru ON artifacts (last_used);
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY,          -- artifacts.id
    tokens BLOB NOT NULL             -- uint32 little-endian token ids (kept apart: artifacts rows stay small)
);
CREATE TABLE IF NOT EXISTS blocks (
    hash BLOB NOT NULL,              -- {_HASH_BYTES}-byte chained hash of the first depth*BLOCK tokens (depth 0: the bucket)
    aid INTEGER NOT NULL,            -- artifacts.id
    next BLOB NOT NULL,              -- the artifact's following tokens, up to BLOCK of them (uint32 LE)
    n INTEGER NOT NULL,              -- the artifact's length in tokens (ranks ties without a join)
    PRIMARY KEY (hash, next, aid)    -- clustered: one depth's rows sorted by their next tokens' bytes

) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_aid ON blocks (aid);
"""
_COLUMNS = ("id, key, bucket, model_id, model_fp, tokenizer_fp, dtype, num_tokens, chunk_size, file_bytes, "
            "text_blake3, signed, added, last_used, encoding, lossless")


class StoreError(KvmlxError):
    """A store operation failed: unknown or ambiguous key, unusable store directory."""


@dataclass(frozen=True)
class Entry:
    """One stored artifact, as the index describes it (the file's header is the source of truth)."""

    key: str
    path: Path
    model_id: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    num_tokens: int
    chunk_size: int
    file_bytes: int
    text_blake3: str | None
    signed: bool
    added: float
    last_used: float
    encoding: str = "raw"
    lossless: bool = True  # False: quantised KV, not token-exact; automatic reuse skips it unless allowed

    def to_json(self) -> dict:
        return {
            "key": self.key, "path": str(self.path), "model": self.model_id,
            "model_fingerprint": self.model_fingerprint, "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "dtype": self.dtype, "tokens": self.num_tokens, "chunk_size": self.chunk_size,
            "file_bytes": self.file_bytes, "text_blake3": self.text_blake3, "signed": self.signed,
            "added": self.added, "last_used": self.last_used, "encoding": self.encoding, "lossless": self.lossless,
        }


@dataclass
class StorePublish:
    """What `Store.publish` did: the entry, and the publish result unless the key was already stored."""

    key: str
    entry: Entry
    result: "PublishResult | None"  # None when `existed`: no prefill ran
    existed: bool


@dataclass
class GcResult:
    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    temp_removed: int = 0
    quarantine_removed: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ReindexResult:
    indexed: int = 0  # files (re)indexed from their headers
    dropped: int = 0  # index rows whose file is gone
    skipped: list[str] = field(default_factory=list)  # files in objects/ that are not valid store objects

    def to_json(self) -> dict:
        return dict(self.__dict__)


def default_root() -> Path:
    """`kvmlx_home() / "store"` ($KVMLX_HOME/store, else ~/.cache/kvmlx/store)."""
    return kvmlx_home() / "store"


def artifact_key(model_fp: str, tokenizer_fp: str, dtype: str, tokens: Sequence[int], lossy: str | None = None) -> str:
    """The store key: BLAKE3 hex of canonical JSON of what the KV is a function of.

    `lossy` names a lossy encoding (the KV then differs from the computed one); lossless encodings
    store the same KV and share the raw key.
    """
    material = {"kvmlx_store_key": KEY_VERSION, "model": model_fp, "tokenizer": tokenizer_fp, "dtype": dtype,
                "tokens": [int(t) for t in tokens]}
    if lossy is not None:
        material["lossy_encoding"] = lossy
    return blake3.blake3(canonical_json(material)).hexdigest()


def encoding_of(header: dict) -> tuple[str, bool]:
    """(KV encoding, lossless?) of a header; losslessness comes from kvmlx's table, not the header's word."""
    encoding = header["kv"].get("encoding", "raw")
    return encoding, bool(ENCODINGS.get(encoding, False))


def header_key(header: dict) -> str:
    encoding, lossless = encoding_of(header)
    return artifact_key(header["model"]["fingerprint"], header["tokenizer"]["fingerprint"], header["kv"]["dtype"],
                        header["document"]["tokens"], None if lossless else encoding)


def bucket_id(model_fp: str, tokenizer_fp: str, dtype: str, exact: bool = True) -> str:
    """What must be equal for KV to be reusable at all: one bucket of the index per (model, tokenizer,
    dtype), with lossily encoded KV in a bucket of its own."""
    return blake3.blake3(canonical_json({"kvmlx_bucket": KEY_VERSION, "model": model_fp, "tokenizer": tokenizer_fp,
                                         "dtype": dtype, "kv": "exact" if exact else "lossy"})).hexdigest()[:32]


def block_hashes(bucket: str, tokens: Sequence[int] | np.ndarray, block: int = BLOCK) -> list[bytes]:
    """Chained hashes of tokens[:block], tokens[:2*block], ... (whole blocks only)."""
    arr = _pack(tokens)
    h = bytes.fromhex(bucket)
    out = []
    step = 4 * block
    for end in range(step, len(arr) + 1, step):
        h = blake3.blake3(h + arr[end - step : end]).digest(_HASH_BYTES)
        out.append(h)
    return out


def parse_size(text: str | int) -> int:
    """'1500', '10M', '2.5G', '1GiB' -> bytes (K/M/G/T: powers of 1000; KiB/MiB/GiB/TiB: of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G, 1GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


def _pack(tokens: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(tokens, dtype="<u4").tobytes()


def _common_tokens(a: bytes, b: bytes) -> int:
    """Length in tokens of the common prefix of two packed uint32 token strings."""
    n = min(len(a), len(b)) // 4
    for i in range(n):
        if a[4 * i : 4 * i + 4] != b[4 * i : 4 * i + 4]:
            return i
    return n


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg


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
        self._tlock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._conn_id: tuple | None = None
        self._last_sync = ReindexResult()
        if sync:
            self.sync()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- locking and the index connection -------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store-wide writer lock (re-entrant within this object)."""
        with self._tlock:
            if self._depth == 0:
                fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._lock_fd = self._lock_fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    def _db(self) -> sqlite3.Connection:
        """This process's connection, (re)opened when the index file was replaced, removed, or we forked."""
        try:
            st = os.stat(self.index_path)
            ident = (os.getpid(), st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = None
        if self._conn is not None and self._conn_id[0] != os.getpid():
            self._conn, self._conn_id = None, None  # inherited through fork: abandon it, never close it here
        if self._conn is None or ident != self._conn_id:
            self._close()
            self._open_index()
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
        self._conn, self._conn_id = None, None

    def close(self) -> None:
        with self._tlock:
            self._close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.index_path, timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after a crash; the index is a cache
        return conn

    def _open_index(self) -> None:
        """Open the index; create it, or rebuild it from the files when it is missing, corrupt or stale."""
        with self._locked():
            rebuild = not self.index_path.exists()
            conn = None
            if not rebuild:
                try:
                    conn = self._connect()
                    row = dict(conn.execute("SELECT name, value FROM meta").fetchall())
                    if row.get("schema") != str(SCHEMA_VERSION) or row.get("block") != str(BLOCK):
                        rebuild = True
                    else:
                        conn.execute("SELECT count(*) FROM artifacts").fetchone()
                        conn.execute("SELECT count(*) FROM blocks").fetchone()
                        conn.execute("SELECT count(*) FROM tokens").fetchone()
                except sqlite3.DatabaseError:  # corrupt, not a database, or a table missing
                    rebuild = True
                if rebuild and conn is not None:
                    conn.close()
                    conn = None
            if rebuild:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{self.index_path}{suffix}").unlink(missing_ok=True)
                conn = self._connect()
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?), ('block', ?)", (str(SCHEMA_VERSION), str(BLOCK)))
            st = os.stat(self.index_path)
            self._conn, self._conn_id = conn, (os.getpid(), st.st_dev, st.st_ino)
            if rebuild:
                self._sync_locked()

    def _run(self, fn: Callable[[sqlite3.Connection], object]):
        """Run `fn(conn)`; if the index turns out corrupt, rebuild it from the files and run it again."""
        with self._tlock:
            for attempt in range(2):
                try:
                    return fn(self._db())
                except sqlite3.DatabaseError as e:
                    if attempt or not _is_corruption(e):
                        raise
                    self._discard_index()

    def _discard_index(self) -> None:
        with self._locked():
            self._close()
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.index_path}{suffix}").unlink(missing_ok=True)
            self._open_index()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ---- paths ----------------------------------------------------------------------------------

    def _object(self, key: str) -> Path:
        return self.objects / f"{key}{OBJECT_SUFFIX}"

    def path(self, key: str) -> Path:
        """The stored file of `key` (a full key or a unique prefix of one)."""
        key = self.resolve(key)
        p = self._object(key)
        if not p.exists():
            raise StoreError(f"store entry {key[:12]} has no file (run `kvmlx store reindex`)")
        return p

    def resolve(self, key: str) -> str:
        """A full key from a full key or a unique prefix of at least 4 hex digits."""
        key = key.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", key):
            raise StoreError(f"not a store key: {key!r} (64 hex digits, or a unique prefix of 4 or more)")
        rows = self._run(lambda c: c.execute("SELECT key FROM artifacts WHERE key >= ? AND key < ? LIMIT 2",
                                             (key, key + "g")).fetchall())
        if not rows:
            raise StoreError(f"no store entry {key}")
        if len(rows) > 1:
            raise StoreError(f"store key prefix {key} is ambiguous")
        return rows[0][0]

    # ---- adding ---------------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory under tmp/ for one writer, flock'ed while it exists (gc skips it).

        Created under the store lock, so gc never sees it before its lock is held; removed on exit.
        A writer killed at any point leaves only this directory, which ls/lookup never look at and
        gc removes once its lock is free.
        """
        with self._locked():
            d = self.tmp / uuid.uuid4().hex
            d.mkdir(parents=True)
            fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
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
        with self._locked():
            if not self._object_ok(final, key):
                os.rename(tmp, final)
                fsync_dir(self.objects)
            st = final.stat()
            self._insert(key, header, signed, st.st_mtime, st.st_mtime)
        return key

    def _object_ok(self, path: Path, key: str) -> bool:
        """Whether `path` holds a well-formed artifact whose header belongs to `key` (digests unchecked)."""
        try:
            with Artifact(path) as art:
                return header_key(art.header) == key
        except (KvmlxError, OSError):
            return False

    def _insert(self, key: str, header: dict, signed: bool, added: float, last_used: float) -> bool:
        m, kv, tokens = header["model"], header["kv"], header["document"]["tokens"]
        encoding, lossless = encoding_of(header)
        bucket = bucket_id(m["fingerprint"], header["tokenizer"]["fingerprint"], kv["dtype"], lossless)
        packed = _pack(tokens)
        hashes = [bytes.fromhex(bucket)] + block_hashes(bucket, tokens)
        step = 4 * BLOCK
        rows = [(h, packed[d * step : (d + 1) * step]) for d, h in enumerate(hashes)]

        def insert(_):
            with self._write() as c:
                cur = c.execute(
                    "INSERT OR IGNORE INTO artifacts (key, bucket, model_id, model_fp, tokenizer_fp, dtype, encoding, lossless, "
                    "num_tokens, chunk_size, file_bytes, text_blake3, signed, added, last_used) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, bucket, m["id"], m["fingerprint"], header["tokenizer"]["fingerprint"], kv["dtype"], encoding, int(lossless),
                     kv["num_tokens"], kv["chunk_size"], header["file_bytes"],
                     header["document"].get("text_blake3"), int(signed), added, last_used))
                if cur.rowcount != 1:
                    return False
                aid = cur.lastrowid
                c.execute("INSERT OR REPLACE INTO tokens (id, tokens) VALUES (?, ?)", (aid, packed))
                c.executemany("INSERT OR IGNORE INTO blocks (hash, aid, next, n) VALUES (?, ?, ?, ?)",
                              ((h, aid, nxt, len(tokens)) for h, nxt in rows))
                return True

        return self._run(insert)

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
        arguments (`encoding=`, `sign=`) go to `kvmlx.runtime.publish.publish`.
        """
        from ...artifact.identity import model_fingerprint, tokenizer_fingerprint
        from ..publish import DEFAULT_CHUNK, publish as publish_api

        tokens = list(lm.tokenizer.encode(document)) if isinstance(document, str) else [int(t) for t in document]
        if not tokens:
            raise ValueError("the document is empty: nothing to prefill")
        encoding = publish_kwargs.get("encoding", "raw")
        lossless = bool(ENCODINGS.get(encoding, False))
        key = artifact_key(model_fingerprint(lm.model, lm.config), tokenizer_fingerprint(lm.tokenizer), lm.dtype, tokens,
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

    def _entry(self, row: tuple) -> Entry:
        (_, key, _, model_id, model_fp, tok_fp, dtype, n, chunk, nbytes, text, signed, added, used, enc, lossless) = row
        return Entry(key, self._object(key), model_id, model_fp, tok_fp, dtype, n, chunk, nbytes, text, bool(signed),
                     added, used, enc, bool(lossless))

    def get(self, key: str) -> Entry | None:
        """The entry of a full key if it is indexed and its file exists, else None."""
        row = self._run(lambda c: c.execute(f"SELECT {_COLUMNS} FROM artifacts WHERE key = ?", (key,)).fetchone())
        if row is None:
            return None
        entry = self._entry(row)
        return entry if entry.path.exists() else None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def ls(self) -> list[Entry]:
        """Every indexed entry, most recently used first (staging and quarantined files are never listed)."""
        rows = self._run(lambda c: c.execute(f"SELECT {_COLUMNS} FROM artifacts ORDER BY last_used DESC, key").fetchall())
        return [self._entry(r) for r in rows]

    def tokens(self, key: str) -> list[int]:
        row = self._run(lambda c: c.execute("SELECT t.tokens FROM artifacts a JOIN tokens t ON t.id = a.id WHERE a.key = ?",
                                            (key,)).fetchone())
        if row is None:
            raise StoreError(f"no store entry {key}")
        return np.frombuffer(row[0], "<u4").tolist()

    def total_bytes(self) -> int:
        return int(self._run(lambda c: c.execute("SELECT coalesce(sum(file_bytes), 0) FROM artifacts").fetchone()[0]))

    def lookup(
        self,
        model_fp: str,
        tokenizer_fp: str,
        dtype: str,
        tokens: Sequence[int],
        *,
        exclude: Sequence[str] = (),
        min_tokens: int = 1,
        exact_only: bool = True,
    ) -> tuple[Entry, int] | None:
        """The stored artifact sharing the longest token prefix with `tokens`, and that prefix's length.

        Only artifacts of the same model fingerprint, tokenizer fingerprint and KV dtype are
        considered, and with `exact_only` (the default) only losslessly encoded ones. Ties prefer
        lossless KV, then an artifact that ends at the match (nothing to trim), then the shortest,
        then the most recently used. None when no artifact shares `min_tokens` tokens.
        """
        if not len(tokens):
            return None
        packed = _pack(tokens)
        excluded = set(exclude)
        buckets = [bucket_id(model_fp, tokenizer_fp, dtype, True)]
        if not exact_only:
            buckets.append(bucket_id(model_fp, tokenizer_fp, dtype, False))
        for _ in range(8):
            found = [self._run(lambda c: self._find(c, b, tokens, packed, excluded)) for b in buckets]
            found = [f for f in found if f is not None]
            retry = [f[1] for f in found if f[0] == "retry"]
            if retry:  # a hash collision (or a row replaced meanwhile): skip that entry and look again
                excluded.update(retry)
                continue
            if not found:
                return None
            row, rank = max(found, key=lambda f: f[1])
            matched = rank[0]
            if matched < max(1, min_tokens):
                return None
            return self._entry(row), matched
        return None

    def _find(self, c: sqlite3.Connection, bucket: str, tokens: Sequence[int], packed: bytes, excluded: set[str]):
        """Longest match in one bucket: (row, rank), ("retry", key) after a hash collision, or None.

        Every step is an indexed SQLite query on the clustered `blocks` table; token comparisons run
        inside SQLite on the stored next-block bytes, so thousands of artifacts sharing a prefix cost
        no Python loop and no read of their full token lists.
        """
        hashes = [bytes.fromhex(bucket)] + block_hashes(bucket, tokens)  # hashes[d]: the first d blocks
        if excluded:
            skip_args = tuple(r[0] for r in c.execute(
                f"SELECT id FROM artifacts WHERE key IN ({', '.join('?' * len(excluded))})", tuple(excluded)).fetchall())
        else:
            skip_args = ()
        skip = f" AND b.aid NOT IN ({', '.join('?' * len(skip_args))})" if skip_args else ""

        def present(depth: int) -> bool:
            q = "SELECT 1 FROM blocks b WHERE b.hash = ?" + skip + " LIMIT 1"
            return c.execute(q, (hashes[depth], *skip_args)).fetchone() is not None

        if not present(0):
            return None
        # chained hashes make presence monotone in depth: binary search for the deepest block present
        lo, hi = 0, len(hashes) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if present(mid):
                lo = mid
            else:
                hi = mid - 1
        start = lo * BLOCK
        window = packed[4 * start : 4 * (start + BLOCK)]
        source = "FROM blocks b WHERE b.hash = ?" + skip
        args = (hashes[lo], *skip_args)
        # Rows of one depth are sorted by their next-block bytes, so the row sharing the longest
        # prefix with the prompt's next block is the window's neighbour below or above it.
        below = c.execute(f"SELECT b.next {source} AND b.next <= ? ORDER BY b.next DESC LIMIT 1", (*args, window)).fetchone()
        above = c.execute(f"SELECT b.next {source} AND b.next > ? ORDER BY b.next ASC LIMIT 1", (*args, window)).fetchone()
        lo_j = max((_common_tokens(r[0], window) for r in (below, above) if r is not None), default=0)
        matched = start + lo_j
        if matched == 0:
            return None
        # ties: an artifact ending at the match (nothing to trim), then the shortest, then the most recently used
        prefix = window[: 4 * lo_j]
        match = f"{source} AND b.next >= ? AND b.next <= ?"  # next starts with prefix (blobs are at most 4*BLOCK bytes)
        bounds = (prefix, prefix + b"\xff" * (4 * BLOCK + 1))
        best_n = c.execute(f"SELECT b.n {match} ORDER BY (b.n = ?) DESC, b.n ASC LIMIT 1",
                           (*args, *bounds, matched)).fetchone()
        if best_n is None:
            return None
        cols = ", ".join("a." + x.strip() for x in _COLUMNS.split(","))
        row = c.execute(
            f"SELECT {cols} FROM blocks b JOIN artifacts a ON a.id = b.aid WHERE b.hash = ?{skip} "
            "AND b.next >= ? AND b.next <= ? AND b.n = ? AND a.bucket = ? ORDER BY a.last_used DESC, a.key DESC LIMIT 1",
            (*args, *bounds, best_n[0], bucket)).fetchone()
        if row is None:
            return None
        # the hashes located the candidates; the token ids themselves decide
        full = c.execute("SELECT substr(tokens, 1, ?) FROM tokens WHERE id = ?", (4 * matched, row[0])).fetchone()
        if full is None or full[0] != packed[: 4 * matched]:
            return ("retry", row[1])
        return row, (matched, row[15], row[7] == matched, -row[7], row[13], row[1])

    def touch(self, key: str, when: float | None = None) -> None:
        """Record a use of `key` (in the index and as the file's mtime, so reindex keeps LRU order)."""
        when = time.time() if when is None else when

        def update(_):
            with self._write() as c:
                c.execute("UPDATE artifacts SET last_used = ? WHERE key = ?", (when, key))

        self._run(update)
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
        with self._locked():
            key = self.resolve(key)
            row = self._run(lambda c: c.execute(f"SELECT {_COLUMNS} FROM artifacts WHERE key = ?", (key,)).fetchone())
            self._drop_rows([key])
            self._object(key).unlink(missing_ok=True)
            fsync_dir(self.objects)
        return self._entry(row)

    def _drop_rows(self, keys: Sequence[str]) -> None:
        def drop(_):
            with self._write() as c:
                for key in keys:
                    c.execute("DELETE FROM blocks WHERE aid IN (SELECT id FROM artifacts WHERE key = ?)", (key,))
                    c.execute("DELETE FROM tokens WHERE id IN (SELECT id FROM artifacts WHERE key = ?)", (key,))
                    c.execute("DELETE FROM artifacts WHERE key = ?", (key,))

        if keys:
            self._run(drop)

    def discard(self, key: str, reason: str = "") -> None:
        """Take an entry out of service after a failed load: drop its row, move its file to quarantine/."""
        with self._locked():
            self._drop_rows([key])
            src = self._object(key)
            if src.exists():
                self.quarantine_dir.mkdir(exist_ok=True)
                os.replace(src, self.quarantine_dir / f"{key}.{int(time.time())}{OBJECT_SUFFIX}")
                if reason:
                    (self.quarantine_dir / f"{key}.reason.txt").write_text(reason + "\n", encoding="utf-8")

    def gc(self, max_bytes: int | None = None) -> GcResult:
        """Remove dead writers' staging directories and quarantined files; then, with `max_bytes`,
        evict least recently used entries until the artifacts total at most `max_bytes`."""
        out = GcResult()
        with self._locked():
            for d in sorted(self.tmp.iterdir()) if self.tmp.exists() else []:
                if _dead_staging(d):
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                    out.temp_removed += 1
            if self.quarantine_dir.exists():
                for f in self.quarantine_dir.iterdir():
                    f.unlink(missing_ok=True)
                    out.quarantine_removed += 1
            self._sync_locked()
            rows = self._run(lambda c: c.execute(
                "SELECT key, file_bytes FROM artifacts ORDER BY last_used ASC, added ASC, key").fetchall())
            total = sum(b for _, b in rows)
            victims = []
            if max_bytes is not None:
                for key, nbytes in rows:
                    if total <= max_bytes:
                        break
                    victims.append(key)
                    total -= nbytes
                    out.freed_bytes += nbytes
            self._drop_rows(victims)
            for key in victims:
                self._object(key).unlink(missing_ok=True)
            if victims:
                fsync_dir(self.objects)
            out.evicted = victims
            out.kept, out.kept_bytes = len(rows) - len(victims), total
        return out

    # ---- index maintenance ----------------------------------------------------------------------

    def sync(self) -> ReindexResult:
        """Reconcile the index with objects/: index files it lacks, drop rows whose file is gone."""
        with self._locked():
            self._db()
            return self._sync_locked()

    def reindex(self) -> ReindexResult:
        """Rebuild the index from the files' headers (last use comes back from each file's mtime)."""
        with self._locked():
            self._discard_index()
            return self._last_sync

    def _sync_locked(self) -> ReindexResult:
        res = ReindexResult()
        names = {}
        with os.scandir(self.objects) as it:
            for e in it:
                stem = e.name[: -len(OBJECT_SUFFIX)] if e.name.endswith(OBJECT_SUFFIX) else ""
                if _KEY_RE.match(stem) and e.is_file(follow_symlinks=False):
                    names[stem] = e
                elif not e.name.startswith("."):
                    res.skipped.append(e.name)
        indexed = {k for (k,) in self._db().execute("SELECT key FROM artifacts").fetchall()}
        gone = sorted(indexed - names.keys())
        self._drop_rows(gone)
        res.dropped = len(gone)
        for key in sorted(names.keys() - indexed):
            path = self._object(key)
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
            self._insert(key, header, signed, st.st_mtime, st.st_mtime)
            res.indexed += 1
        self._last_sync = res
        return res


def _dead_staging(path: Path) -> bool:
    """A tmp/ entry whose writer is gone: a directory whose lock file nobody holds, or a stray file."""
    if not path.is_dir():
        return True
    try:
        fd = os.open(path / "lock", os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    finally:
        os.close(fd)
    return True
