"""The prefix cache's background writer: record files are written on one thread while the caller (the
serving engine's loop) goes on.

`PrefixCache.write_in_background()` turns it on. A record is then kept in memory and listed as pending
(`PrefixCache.pending`: lookups in this process find it at once) before its file is written; the
writer writes the file, adds its index row (other processes find it from then on) and drops it from
pending, in submission order, so a record's parent is always indexed before it. `flush` waits until
everything submitted so far is done; `close` flushes and stops the thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable


class RecordWriter:
    """One thread running submitted writes in order (each handles and counts its own errors)."""

    def __init__(self, name: str = "kvmlx-cache-writer"):
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._done = threading.Condition()
        self._outstanding = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], None]) -> None:
        with self._done:
            self._outstanding += 1
        self._queue.put(write)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write submitted so far has run; False if `timeout` passed first."""
        with self._done:
            return self._done.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            write = self._queue.get()
            if write is None:
                return
            try:
                write()
            except Exception:  # noqa: BLE001 - writes count their own errors; the thread must survive anything
                pass
            finally:
                with self._done:
                    self._outstanding -= 1
                    self._done.notify_all()


def pending_under(pending: dict, parents, start: int | None = None) -> list:
    """The pending rows under `parents` (`PrefixCache.pending`, a key -> Row dict): segments starting at
    `start`, or snapshots when `start` is None (what a lookup adds to the index's answer)."""
    if not pending:
        return []
    return [r for r in list(pending.values()) if r.parent in parents
            and (r.kind == "snapshot" if start is None else r.kind == "segment" and r.start == start)]
