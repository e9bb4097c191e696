"""The prefix index: a SQLite cache of the stored artifacts' headers that finds, without opening any
artifact file, the stored artifact sharing the longest token prefix with a prompt. It owns the schema,
its connection (reopened after a fork or when the file is replaced), the rebuild of a missing, stale
or corrupt index, and every row: insert, get, list, lookup, touch, drop.

Every artifact's token prefix is hashed at every BLOCK-token boundary (a chain
h_d = BLAKE3(h_{d-1} || tokens of block d), h_0 = the (model, tokenizer, dtype) bucket, as vLLM's
block hashes); each (hash, artifact) row also holds the artifact's next (up to BLOCK) tokens. A
lookup hashes the prompt's blocks the same way, binary-searches the deepest hash present
(O(log blocks) probes of a clustered index), then reads the two rows of that depth whose next-block
bytes sort next to the prompt's (one of them shares the longest prefix), so a lookup is a dozen
indexed queries whatever the number of artifacts. No artifact file is opened. The index only
caches what the files' headers say: the store's `reindex()` rebuilds it from the files, and a
missing or corrupt index is rebuilt on open.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ...caches import restore_info
from .keys import (
    BLOCK, _HASH_BYTES, Entry, StoreError, _common_tokens, _pack, block_hashes, bucket_id, encoding_of, header_variant,
)
from .lock import StoreLock

SCHEMA_VERSION = 6
INDEX_NAME = "index.sqlite"
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
    last_used REAL NOT NULL,
    restore TEXT                     -- JSON: which prefixes can be restored (state checkpoints); NULL: any
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
            "text_blake3, signed, added, last_used, encoding, lossless, restore")


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg


class Index:
    """The prefix index of one store: `path` is the SQLite file, `object_path(key)` a stored file's path.

    Every query runs under `lock.mutex` (one connection per process, shared by its threads); opening
    or rebuilding the file takes the store-wide `lock`, and a rebuild ends with `rebuild()`, which
    indexes the files again. The connection uses WAL: readers take no file lock.
    """

    def __init__(self, path: Path, lock: StoreLock, *, object_path: Callable[[str], Path], rebuild: Callable[[], object]):
        self.path = path
        self.lock = lock
        self._object_path = object_path
        self._rebuild = rebuild
        self._conn: sqlite3.Connection | None = None
        self._conn_id: tuple | None = None

    # ---- the connection -------------------------------------------------------------------------

    def db(self) -> sqlite3.Connection:
        """This process's connection, (re)opened when the index file was replaced, removed, or we forked."""
        try:
            st = os.stat(self.path)
            ident = (os.getpid(), st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = None
        if self._conn is not None and self._conn_id[0] != os.getpid():
            self._conn, self._conn_id = None, None  # inherited through fork: abandon it, never close it here
        if self._conn is None or ident != self._conn_id:
            self._close()
            self._open()
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
        self._conn, self._conn_id = None, None

    def close(self) -> None:
        with self.lock.mutex:
            self._close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after a crash; the index is a cache
        return conn

    def _unlink(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _open(self) -> None:
        """Open the index; create it, or rebuild it from the files when it is missing, corrupt or stale."""
        with self.lock:
            rebuild = not self.path.exists()
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
                self._unlink()
                conn = self._connect()
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?), ('block', ?)", (str(SCHEMA_VERSION), str(BLOCK)))
            st = os.stat(self.path)
            self._conn, self._conn_id = conn, (os.getpid(), st.st_dev, st.st_ino)
            if rebuild:
                self._rebuild()

    def run(self, fn: Callable[[sqlite3.Connection], object]):
        """Run `fn(conn)`; if the index turns out corrupt, rebuild it from the files and run it again."""
        with self.lock.mutex:
            for attempt in range(2):
                try:
                    return fn(self.db())
                except sqlite3.DatabaseError as e:
                    if attempt or not _is_corruption(e):
                        raise
                    self.discard()

    def discard(self) -> None:
        """Delete the index file and build a new one from the files."""
        with self.lock:
            self._close()
            self._unlink()
            self._open()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self.db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ---- rows -----------------------------------------------------------------------------------

    def insert(self, key: str, header: dict, signed: bool, added: float, last_used: float) -> bool:
        """Index one artifact from its header; False when its key is already indexed."""
        m, kv, tokens = header["model"], header["kv"], header["document"]["tokens"]
        encoding, lossless = encoding_of(header)
        variant = header_variant(header)
        bucket = bucket_id(m["fingerprint"], header["tokenizer"]["fingerprint"], variant, lossless)
        info = restore_info(header)
        restore = None if info.any_from == 0 else json.dumps(info.to_json(), sort_keys=True)
        packed = _pack(tokens)
        hashes = [bytes.fromhex(bucket)] + block_hashes(bucket, tokens)
        step = 4 * BLOCK
        rows = [(h, packed[d * step : (d + 1) * step]) for d, h in enumerate(hashes)]

        def insert(_):
            with self._write() as c:
                cur = c.execute(
                    "INSERT OR IGNORE INTO artifacts (key, bucket, model_id, model_fp, tokenizer_fp, dtype, encoding, lossless, "
                    "num_tokens, chunk_size, file_bytes, text_blake3, signed, added, last_used, restore) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, bucket, m["id"], m["fingerprint"], header["tokenizer"]["fingerprint"], variant, encoding, int(lossless),
                     kv["num_tokens"], kv["chunk_size"], header["file_bytes"],
                     header["document"].get("text_blake3"), int(signed), added, last_used, restore))
                if cur.rowcount != 1:
                    return False
                aid = cur.lastrowid
                c.execute("INSERT OR REPLACE INTO tokens (id, tokens) VALUES (?, ?)", (aid, packed))
                c.executemany("INSERT OR IGNORE INTO blocks (hash, aid, next, n) VALUES (?, ?, ?, ?)",
                              ((h, aid, nxt, len(tokens)) for h, nxt in rows))
                return True

        return self.run(insert)

    def drop(self, keys: Sequence[str]) -> None:
        """Delete the rows of `keys` (artifact, tokens and blocks)."""
        def drop(_):
            with self._write() as c:
                for key in keys:
                    c.execute("DELETE FROM blocks WHERE aid IN (SELECT id FROM artifacts WHERE key = ?)", (key,))
                    c.execute("DELETE FROM tokens WHERE id IN (SELECT id FROM artifacts WHERE key = ?)", (key,))
                    c.execute("DELETE FROM artifacts WHERE key = ?", (key,))

        if keys:
            self.run(drop)

    def touch(self, key: str, when: float) -> None:
        def update(_):
            with self._write() as c:
                c.execute("UPDATE artifacts SET last_used = ? WHERE key = ?", (when, key))

        self.run(update)

    def _entry(self, row: tuple) -> Entry:
        (_, key, _, model_id, model_fp, tok_fp, dtype, n, chunk, nbytes, text, signed, added, used, enc, lossless,
         restore) = row
        return Entry(key, self._object_path(key), model_id, model_fp, tok_fp, dtype, n, chunk, nbytes, text, bool(signed),
                     added, used, enc, bool(lossless), json.loads(restore) if restore else None)

    def entry(self, key: str) -> Entry | None:
        """The indexed entry of a full key, whether or not its file exists; None if not indexed."""
        row = self.run(lambda c: c.execute(f"SELECT {_COLUMNS} FROM artifacts WHERE key = ?", (key,)).fetchone())
        return None if row is None else self._entry(row)

    def ls(self) -> list[Entry]:
        """Every indexed entry, most recently used first."""
        rows = self.run(lambda c: c.execute(f"SELECT {_COLUMNS} FROM artifacts ORDER BY last_used DESC, key").fetchall())
        return [self._entry(r) for r in rows]

    def keys(self) -> set[str]:
        """Every indexed key (no corruption retry: used while the index is being built)."""
        return {k for (k,) in self.db().execute("SELECT key FROM artifacts").fetchall()}

    def lru(self) -> list[tuple[str, int]]:
        """(key, file bytes) of every entry, least recently used first."""
        return self.run(lambda c: c.execute(
            "SELECT key, file_bytes FROM artifacts ORDER BY last_used ASC, added ASC, key").fetchall())

    def tokens(self, key: str) -> list[int]:
        row = self.run(lambda c: c.execute("SELECT t.tokens FROM artifacts a JOIN tokens t ON t.id = a.id WHERE a.key = ?",
                                           (key,)).fetchone())
        if row is None:
            raise StoreError(f"no store entry {key}")
        return np.frombuffer(row[0], "<u4").tolist()

    def total_bytes(self) -> int:
        return int(self.run(lambda c: c.execute("SELECT coalesce(sum(file_bytes), 0) FROM artifacts").fetchone()[0]))

    def resolve(self, key: str) -> str:
        """A full key from a full key or a unique prefix of at least 4 hex digits."""
        key = key.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", key):
            raise StoreError(f"not a store key: {key!r} (64 hex digits, or a unique prefix of 4 or more)")
        rows = self.run(lambda c: c.execute("SELECT key FROM artifacts WHERE key >= ? AND key < ? LIMIT 2",
                                            (key, key + "g")).fetchall())
        if not rows:
            raise StoreError(f"no store entry {key}")
        if len(rows) > 1:
            raise StoreError(f"store key prefix {key} is ambiguous")
        return rows[0][0]

    # ---- lookup ---------------------------------------------------------------------------------

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
        then the most recently used. None when no artifact shares `min_tokens` tokens. A hash
        collision (or a row replaced meanwhile) excludes that entry and looks again.
        """
        if not len(tokens):
            return None
        packed = _pack(tokens)
        excluded = set(exclude)
        buckets = [bucket_id(model_fp, tokenizer_fp, dtype, True)]
        if not exact_only:
            buckets.append(bucket_id(model_fp, tokenizer_fp, dtype, False))
        for _ in range(8):
            found = [self.run(lambda c: self._find(c, b, tokens, packed, excluded)) for b in buckets]
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
