"""The prefix cache's index: one SQLite row per record (segment or snapshot), a trie by (parent, start).

A segment row holds its token ids, where it starts and its parent (the previous segment of the same
prefix, or its chain's root: the identity's, or the end of a published entry it continues); children of a row that start at position p continue a prefix that
shares the row's tokens up to p. A snapshot row hangs off the segment it follows, at the position its
state belongs to. Rows appear only after their file is in place, and go before their file does, so a
reader that finds a row and no file is looking at an eviction in progress (a miss, never an error).
The connection is shared by this process's threads under one mutex; with `path=None` the index lives
in memory (`--no-persist`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY, root TEXT NOT NULL, parent TEXT NOT NULL, kind TEXT NOT NULL,
    start INTEGER NOT NULL, end INTEGER NOT NULL, tokens BLOB NOT NULL, family TEXT NOT NULL,
    file_bytes INTEGER NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL,
    verified TEXT
);
CREATE INDEX IF NOT EXISTS records_children ON records (parent, kind, start);
CREATE INDEX IF NOT EXISTS records_lru ON records (last_used);
"""


@dataclass(frozen=True)
class Row:
    key: str
    root: str  # where its chain starts: the cache identity's root, or a published entry's end
    parent: str
    kind: str  # "segment" or "snapshot"
    start: int
    end: int  # a snapshot's position is its start and end
    tokens: tuple[int, ...]
    family: str  # a segment's KV: "kv" (full precision) or "quantized"; a snapshot: "state"
    file_bytes: int
    last_used: float = 0.0
    verified: str | None = None  # the file identity recorded when its digests were last checked

    @property
    def length(self) -> int:
        return self.end - self.start


def _row(r) -> Row:
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], tuple(np.frombuffer(r[6], dtype="<u4").tolist()), r[7], r[8],
               r[9], r[10])


_COLS = "key, root, parent, kind, start, end, tokens, family, file_bytes, last_used, verified"


class CacheIndex:
    def __init__(self, path: Path | None):
        self.path = path
        self.mutex = threading.RLock()
        self._conn = sqlite3.connect(":memory:" if path is None else str(path), timeout=60.0, isolation_level=None,
                                     check_same_thread=False)
        if path is not None:
            self._conn.execute("PRAGMA busy_timeout = 60000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self.mutex:
            self._conn.close()

    def _q(self, sql: str, args: Sequence = ()) -> list:
        with self.mutex:
            return self._conn.execute(sql, args).fetchall()

    def children(self, parent: str, start: int) -> list[Row]:
        return [_row(r) for r in self._q(f"SELECT {_COLS} FROM records WHERE parent = ? AND kind = 'segment' AND start = ?",
                                         (parent, start))]

    def snapshots(self, parents: Iterable[str]) -> list[Row]:
        parents = list(parents)
        if not parents:
            return []
        marks = ",".join("?" * len(parents))
        return [_row(r) for r in self._q(f"SELECT {_COLS} FROM records WHERE kind = 'snapshot' AND parent IN ({marks})",
                                         parents)]

    def get(self, key: str) -> Row | None:
        rows = self._q(f"SELECT {_COLS} FROM records WHERE key = ?", (key,))
        return _row(rows[0]) if rows else None

    def insert(self, row: Row, when: float | None = None) -> bool:
        """Add a row (its file is in place); False if the key was already there (nothing changes)."""
        when = time.time() if when is None else when
        with self.mutex:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (row.key, row.root, row.parent, row.kind, row.start, row.end,
                 np.asarray(row.tokens, dtype="<u4").tobytes(), row.family, row.file_bytes, when, when, row.verified))
            return cur.rowcount == 1

    def touch(self, keys: Sequence[str], when: float | None = None) -> None:
        if keys:
            when = time.time() if when is None else when
            with self.mutex:
                self._conn.executemany("UPDATE records SET last_used = ? WHERE key = ?", [(when, k) for k in keys])

    def set_verified(self, key: str, identity: str | None) -> None:
        with self.mutex:
            self._conn.execute("UPDATE records SET verified = ? WHERE key = ?", (identity, key))

    def drop(self, keys: Sequence[str]) -> None:
        with self.mutex:
            self._conn.executemany("DELETE FROM records WHERE key = ?", [(k,) for k in keys])

    def leaves(self, limit: int = 64) -> list[Row]:
        """Rows no other row hangs off, least recently used first (what eviction takes)."""
        return [_row(r) for r in self._q(
            f"SELECT {', '.join('r.' + c.strip() for c in _COLS.split(','))} FROM records r "
            "WHERE NOT EXISTS (SELECT 1 FROM records c WHERE c.parent = r.key) ORDER BY r.last_used LIMIT ?", (limit,))]

    def orphans(self) -> list[str]:
        """Keys whose parent is neither a row nor their chain's root (left by an eviction racing a write)."""
        return [r[0] for r in self._q("SELECT r.key FROM records r WHERE r.parent != r.root "
                                      "AND NOT EXISTS (SELECT 1 FROM records p WHERE p.key = r.parent)")]

    def totals(self) -> dict:
        (n, nbytes, seg, snap, tokens), = self._q(
            "SELECT COUNT(*), COALESCE(SUM(file_bytes), 0), COALESCE(SUM(kind = 'segment'), 0), "
            "COALESCE(SUM(kind = 'snapshot'), 0), COALESCE(SUM(CASE WHEN kind = 'segment' THEN end - start END), 0) "
            "FROM records")
        return {"records": n, "bytes": nbytes, "segments": seg, "snapshots": snap, "tokens": tokens}

    def total_bytes(self) -> int:
        return self._q("SELECT COALESCE(SUM(file_bytes), 0) FROM records")[0][0]

    def keys(self) -> list[str]:
        return [r[0] for r in self._q("SELECT key FROM records")]
