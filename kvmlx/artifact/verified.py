"""Which files are known to be intact: a file's identity (device, inode, size, mtime_ns, ctime_ns,
header digest), the files this process verified (every tensor digest matched), and the rule for
remembering one. A re-load of a remembered file, or of one a store recorded as verified, skips
hashing (docs/SECURITY.md says what that trusts).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

SETTLED_SECONDS = 2.0  # a file changed this recently may change again within one timestamp tick
_MAX = 4096
_lock = threading.Lock()
_verified: dict[tuple, None] = {}  # (file identity, header digest) of files verified in this process
_partly: dict[tuple, frozenset] = {}  # (file identity, header digest) -> tensors verified so far (partial loads)


@dataclass(frozen=True)
class VerifiedIdentity:
    """What a store records about a file whose every digest it checked: a load that finds the same
    device, inode, size, mtime_ns, ctime_ns and header digest hashes nothing (docs/SECURITY.md)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    header_digest: str  # hex


def file_identity(fd: int) -> tuple[int, int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def remembered(identity: tuple, header_digest: bytes) -> bool:
    return (identity, header_digest) in _verified


def remember(identity: tuple, header_digest: bytes, tensors: frozenset | None = None) -> None:
    """Remember a file whose every digest matched (or, with `tensors`, whose named tensors' digests
    matched: a load of one state checkpoint), unless it changed in the last SETTLED_SECONDS (a second
    write within one tick of the file system's clock could leave the change time as it is: the
    "racy git" problem)."""
    if time.time() - identity[4] / 1e9 < SETTLED_SECONDS:
        return
    key = (identity, header_digest)
    with _lock:
        table = _verified if tensors is None else _partly
        if len(table) >= _MAX and key not in table:
            del table[next(iter(table))]
        table[key] = None if tensors is None else tensors | _partly.get(key, frozenset())


def remembered_tensors(identity: tuple, header_digest: bytes) -> frozenset:
    """The tensors of this very file whose digests matched earlier in this process (partial loads)."""
    return _partly.get((identity, header_digest), frozenset())


def forget_verified() -> None:
    """Forget which files were verified in this process: the next load of each hashes every tensor."""
    with _lock:
        _verified.clear()
        _partly.clear()
