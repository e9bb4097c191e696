"""The store's file locks: the store-wide writer lock on `<root>/lock`, and the per-writer lock that
marks a staging directory under `<root>/tmp/` as alive. Both are `flock`s, so they vanish with the
process that held them: a killed writer never leaves the store locked, and its staging directory
reads as dead (gc removes it) as soon as its lock is free.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path


class StoreLock:
    """The store-wide writer lock: an exclusive `flock` on one file, re-entrant within this object.

    `mutex` serialises this object's threads; the index takes the same mutex around every use of its
    shared connection, so one lock order holds (mutex, then flock) whoever comes first.
    """

    def __init__(self, path: Path):
        self.path = path
        self.mutex = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def __enter__(self) -> "StoreLock":
        self.mutex.acquire()
        try:
            if self._depth == 0:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
        except BaseException:
            self.mutex.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._depth -= 1
            if self._depth == 0:
                fd, self._fd = self._fd, None
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self.mutex.release()


def lock_staging(directory: Path) -> int:
    """Create and hold `directory/lock` (the writer is alive while held); the caller closes the fd."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def dead_staging(path: Path) -> bool:
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
