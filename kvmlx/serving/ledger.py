"""The entitlement ledger: how many loads and bytes each access token has spent, in an embedded
SQLite database (WAL mode), shared by every worker process of one artifact server.

Every spend is one atomic conditional update inside an immediate (write-locked) transaction, e.g.
`UPDATE tokens SET loads = loads + 1 WHERE tid = ? AND loads < ?`: of N workers racing for a token's
last load exactly one sees a changed row; the rest are refused. Nothing is counted in process memory,
so `kvmlx serve-artifacts --workers N` stays exact. The JSON-lines metering log (entitlements.Meter)
remains the export that `kvmlx token report` reads; a ledger created beside an existing log is seeded
from it once, so upgrading a server neither forgets nor refunds loads.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from .entitlements import read_log

BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (tid TEXT PRIMARY KEY, loads INTEGER NOT NULL DEFAULT 0,
                                   bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class Spent(Exception):
    """A spend was refused; the message says why (one line)."""


class Ledger:
    """Per-token loads and bytes in SQLite at `path`; one connection per process, used under SQLite's lock."""

    def __init__(self, path: str | os.PathLike, seed_log: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
        self._lock = threading.Lock()  # one transaction at a time on this process's connection
        self.db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            seeded = self.db.execute("SELECT value FROM meta WHERE key = 'seeded'").fetchone()
            if seeded is None:
                if seed_log is not None:
                    self._seed(seed_log)
                self.db.execute("INSERT INTO meta VALUES ('seeded', '1')")

    def _write(self):
        return _Immediate(self.db, self._lock)

    def _seed(self, log) -> None:
        loads: dict[str, int] = {}
        sent: dict[str, int] = {}
        for rec in read_log(log):
            tid = rec.get("token")
            if isinstance(tid, str):
                sent[tid] = sent.get(tid, 0) + int(rec.get("bytes", 0))
                loads[tid] = loads.get(tid, 0) + (1 if rec.get("load") else 0)
        self.db.executemany("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?)",
                            [(t, loads.get(t, 0), sent.get(t, 0)) for t in sent])

    def get(self, tid: str) -> tuple[int, int]:
        """(loads taken, bytes served or reserved) under a token."""
        row = self.db.execute("SELECT loads, bytes FROM tokens WHERE tid = ?", (tid,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def take_load(self, tid: str, max_loads: int) -> int:
        """Take one of the token's `max_loads` loads (atomically); the number taken so far. Spent if none is left."""
        with self._write():
            self.db.execute("INSERT OR IGNORE INTO tokens (tid) VALUES (?)", (tid,))
            cur = self.db.execute("UPDATE tokens SET loads = loads + 1 WHERE tid = ? AND loads < ?", (tid, max_loads))
            if cur.rowcount != 1:
                raise Spent(f"token used up ({self.get(tid)[0]} of {max_loads} loads)")
            return self.get(tid)[0]

    def reserve(self, tid: str, length: int, allowed_per_load: int, slack: int) -> None:
        """Reserve `length` bytes of a resume: allowed only after a load, and while the bytes under the
        token stay within loads x `allowed_per_load` + `slack`."""
        with self._write():
            cur = self.db.execute("UPDATE tokens SET bytes = bytes + ? WHERE tid = ? AND loads > 0 "
                                  "AND bytes + ? <= loads * ? + ?", (length, tid, length, allowed_per_load, slack))
            if cur.rowcount != 1:
                loads, _ = self.get(tid)
                if loads == 0:
                    raise Spent("a resume needs a download started with this token (request from byte 0 first)")
                raise Spent(f"token used up ({loads} loads downloaded)")

    def settle(self, tid: str, reserved: int, sent: int) -> None:
        """A response under the token ended: replace its reservation by the bytes actually sent."""
        with self._write():
            self.db.execute("UPDATE tokens SET bytes = bytes - ? + ? WHERE tid = ?", (reserved, sent, tid))

    def close(self) -> None:
        self.db.close()


class _Immediate:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): the write lock is taken before anything is read."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self):
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, kind, exc, tb):
        try:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.lock.release()
        return False
