"""The `.kvmlx` artifact format: a JSON header, then raw tensors, in one of two containers.

Version 3 (what the writer writes) is a safetensors file whose metadata carries the header
(envelope.py): `mx.load` reads its tensors natively. Versions 1 and 2 use kvmlx's own container;
every reader keeps reading them. Their layout (all integers little-endian; see docs/FORMAT.md):

    0   8  magic  b"\\x89KVMLX\\r\\n"
    8   4  format version (u32)
    12  4  flags (u32): bit 0 = signed; no other bit is defined in v1
    16  8  header length H in bytes (u64)
    24  8  data offset: where the first tensor starts (u64, a multiple of ALIGN)
    32 32  BLAKE3 digest of the header bytes
    64  H  header: canonical UTF-8 JSON
    64+H 96 signature block: Ed25519 public key (32) + signature of the header digest (64); zeros if unsigned
    ... zero padding; each tensor at an ALIGN-aligned offset, padded to ALIGN; file ends padded.

Version 1 holds plain KV (`layers.{i}.keys/values`); version 2 adds per-layer cache families, state
tensors, KV quantization settings and state checkpoints (checked by layers.py); a version-3 header
holds either (it has `caches` or not). This module knows nothing about models: it writes and validates files. Reading is defensive: every
length and offset is checked against the file before anything is used, and every failure is a
typed `ArtifactError` with a one-line message.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import blake3

from ..errors import ArtifactError, IntegrityError, UnsupportedVersionError
from . import envelope
from .layout import kv_plan
from .schema import (  # noqa: F401 (re-exported: what a header may say)
    ALIGN,
    DIGEST,
    DTYPE_SIZES,
    ENCODINGS,
    MAX_EXPANSION,
    MAX_TOKENS,
    TENSOR_DTYPES,
    _prod,
    align,
    kv_tensor_names,
    validate,
)
from .verified import (  # noqa: F401 (re-exported)
    VerifiedIdentity,
    file_identity,
    forget_verified,
    remember,
    remembered,
    remembered_tensors,
)

MAGIC = b"\x89KVMLX\r\n"
VERSION = envelope.VERSION  # the newest version this reader understands, and the writer's
LEGACY = (1, 2)  # versions in kvmlx's own container (the preamble below): still read, written on request
PREAMBLE = struct.Struct("<8sIIQQ32s")
assert PREAMBLE.size == 64
SIGNATURE_BLOCK = struct.Struct("<32s64s")  # Ed25519 public key, signature of the 32-byte header digest
FLAG_SIGNED = 1
MAX_HEADER_BYTES = 64 << 20  # a 3774-token header is ~30 KB; anything near this is hostile


ProgressFn = Callable[[int, int], None]
# Given the header digest, returns (raw 32-byte public key, 64-byte signature). See kvmlx/artifact/trust.py.
Signer = Callable[[bytes], tuple[bytes, bytes]]


def header_kv_names(header: dict) -> list[str]:
    """The KV tensors a validated header lists: every layer's, or a parallel part's own (artifact/layout.py)."""
    (first, end), _, _ = kv_plan(header, "artifact")
    return kv_tensor_names(end, first)


def digest(data: Any, threaded: bool = True) -> str:
    """Hex BLAKE3 of a bytes-like object: multithreaded for large inputs, or on the calling thread
    alone where the caller hashes several at once (BLAKE3's pool per call, on top of the caller's
    workers: 72 tensors of 0.5 MB hashed at 4.3 GB/s, against 7.7 GB/s one thread each)."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if threaded else 1).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The one byte string a header (or a fingerprint's input) serialises to."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live in the file, and what they are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    digest: str
    encoding: str = "raw"
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
            "nbytes": self.nbytes, "digest": self.digest, "encoding": self.encoding, "params": self.params,
        }


@dataclass(frozen=True)
class TensorData:
    """A tensor to write: its stored bytes (any C-contiguous buffer), decoded dtype and shape, encoding."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    encoding: str = "raw"
    params: dict = field(default_factory=dict)


def _layout(header: dict, tensors: Sequence[TensorData], digests: Sequence[str],
            signed: bool) -> tuple[bytes, int, list[dict]]:
    """Fix the tensor offsets and return (header bytes, data offset, the header's tensor entries).

    The offsets depend on the header's length, which depends on the offsets' digits: iterate until
    the header (with the preamble and signature block, or inside version 3's table) fits before the
    data offset it declares (two rounds in practice).
    """
    data_offset = align(PREAMBLE.size + 1)
    while True:
        entries, pos = [], data_offset
        for t, d in zip(tensors, digests):
            entries.append(TensorEntry(t.name, t.dtype, t.shape, pos, t.data.nbytes, d, t.encoding, t.params).to_json())
            pos = align(pos + t.data.nbytes)
        body = canonical_json({**header, "tensors": entries, "file_bytes": pos})
        if header["version"] in LEGACY:
            needed = align(PREAMBLE.size + len(body) + SIGNATURE_BLOCK.size)
        else:  # the table's length with the digest and signature it will hold (fixed-length hex)
            placeholder = bytes(SIGNATURE_BLOCK.size) if signed else None
            needed = align(envelope.LENGTH.size + len(envelope.table(body, entries, data_offset, bytes(32), placeholder).rstrip(b" ")))
        if needed <= data_offset:
            return body, data_offset, entries
        data_offset = needed


def write_artifact(
    path: str | os.PathLike,
    header: dict,
    tensors: Sequence[TensorData],
    progress: ProgressFn | None = None,
    sign: Signer | None = None,
    version: int = VERSION,
) -> dict:
    """Write an artifact atomically (temp file, fsync, rename, fsync dir); return its full header.

    `header` holds everything but `tensors` and `file_bytes`, which are computed here. With `sign`,
    the header digest (which covers every tensor digest) is signed into the signature block. A crash
    at any point leaves either no file or the previous one at `path`, never a partial artifact.
    `version` 1 or 2 writes kvmlx's own container (for readers older than version 3): 2 when the
    header has `caches`, else 1.
    """
    path = Path(path)
    for t in tensors:
        if t.dtype not in TENSOR_DTYPES:
            raise ArtifactError(f"cannot write tensor {t.name}: unsupported dtype {t.dtype}")
        if t.encoding == "raw" and t.data.nbytes != _prod(t.shape) * TENSOR_DTYPES[t.dtype]:
            raise ArtifactError(f"cannot write tensor {t.name}: {t.data.nbytes} bytes do not match shape {t.shape}")
    # Digests are fixed-length, so placeholders fix the layout: tensors are written while a thread
    # hashes them, their write-back to disk (the first fsync) overlaps the rest of the hashing, and the
    # preamble and header go in last. Until then the file has no magic: a crash never leaves a file
    # that looks valid, and the rename only happens after the final fsync.
    if version not in (*LEGACY, VERSION):
        raise ArtifactError(f"cannot write format version {version} (this kvmlx writes {', '.join(map(str, (*LEGACY, VERSION)))})")
    if version in LEGACY:
        version = 2 if "caches" in header else 1
    header = {**header, "format": "kvmlx", "version": version, "digest": DIGEST}
    body, data_offset, _ = _layout(header, tensors, ["0" * 64] * len(tensors), sign is not None)
    total = sum(t.data.nbytes for t in tensors)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e} (in {path.parent})") from None
    try:
        with os.fdopen(fd, "wb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="kvmlx-hash") as hasher, \
                ThreadPoolExecutor(1, thread_name_prefix="kvmlx-flush") as flusher:
            hashing = [hasher.submit(digest, t.data) for t in tensors]
            f.seek(data_offset)
            done = 0
            for t in tensors:
                _write_all(f, t.data)
                _write_all(f, bytes(align(t.data.nbytes) - t.data.nbytes))
                done += t.data.nbytes
                if progress:
                    progress(done, total)
            flushing = flusher.submit(os.fsync, f.fileno())
            digests = [h.result() for h in hashing]
            flushing.result()
            body, offset, entries = _layout(header, tensors, digests, sign is not None)
            if offset != data_offset:  # digests are fixed-length hex: cannot happen, but never write a wrong layout
                raise ArtifactError(f"cannot write {path.name}: the header grew past its data offset")
            header_digest = blake3.blake3(body).digest()
            signature = SIGNATURE_BLOCK.pack(*sign(header_digest)) if sign else bytes(SIGNATURE_BLOCK.size)
            if version in LEGACY:
                preamble = PREAMBLE.pack(MAGIC, version, FLAG_SIGNED if sign else 0, len(body), data_offset, header_digest)
                head = preamble + body + signature
            else:
                listed = envelope.table(body, entries, data_offset, header_digest, signature if sign else None)
                head = envelope.LENGTH.pack(len(listed)) + listed
            f.seek(0)
            _write_all(f, head + bytes(data_offset - len(head)))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return json.loads(body)


@contextmanager
def replacing(path: Path, suffix: str = ".tmp", *, directory: Path | None = None,
              prefix: str | None = None) -> Iterator[Path]:
    """A temporary path (mode 0600) for the caller to write, beside `path` or in `directory` (same file
    system); on success it is fsynced and renamed over `path` (then `path`'s directory is fsynced), on
    any error removed: `path` is never partial."""
    fd, name = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=suffix, dir=directory or path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_all(f: BinaryIO, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


def fsync_dir(directory: Path) -> None:
    """Make the rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Artifact:
    """An open, validated artifact: its header, an open file, and (on demand) a read-only map of it.

    Opening reads the preamble and header with plain reads and checks them (digest, structure, every
    tensor inside the file, aligned, non-overlapping, sized as its shape says) before any tensor byte
    is read or mapped. Tensor bytes come either as a view of the map (`tensor_bytes`, for zero-copy
    and decoding) or read straight into a caller's buffers (`read_into`, the one-copy load path).
    Digests are checked by both when `verify` is set. With `populate`, the map is pre-faulted
    (Linux MAP_POPULATE, else MADV_WILLNEED) when it is first needed.
    """

    def __init__(self, path: str | os.PathLike, *, populate: bool = False, verified: "VerifiedIdentity | None" = None):
        self.path = Path(path)
        self._populate = populate
        self._recorded = verified  # what a store recorded when it last hashed this file (see verified_before)
        self._mmap: mmap.mmap | None = None
        self._native: tuple[str] | None = None  # native_source's answer, once asked
        self._cached: bool | None = None  # cached()'s answer, once asked
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise ArtifactError(f"{path}: cannot open ({e.strerror or e})") from e
        try:
            self.size = os.fstat(self._fd).st_size
            self.header, self.data_offset, self.header_digest, self.signature, self.version, self.tensors = \
                _parse(self._fd, self.size, self.path.name)
        except BaseException:
            os.close(self._fd)
            raise
        self._identity = file_identity(self._fd)

    @property
    def identity(self) -> "VerifiedIdentity":
        """This file's identity as opened: device, inode, size, mtime_ns, ctime_ns and header digest."""
        return VerifiedIdentity(*self._identity, self.header_digest.hex())

    @property
    def verified_before(self) -> bool:
        """True if every tensor digest of this very file matched earlier in this process, or when a
        store recorded this very file as verified (`verified=` at opening: a persisted record).

        "This very file" is the same device, inode, size, modification and change times as when it
        was verified, and the same header digest: any write to the file changes its change time,
        which no user can set, so a re-load of an unchanged file can skip hashing its 100s of MB.
        Callers that skip still call `check_unchanged` after reading.
        """
        return remembered(self._identity, self.header_digest) or self.recorded

    @property
    def recorded(self) -> bool:
        """True when the identity recorded by a store (`verified=`) is exactly this file's."""
        return self._recorded is not None and self._recorded == self.identity

    def mark_verified(self, tensors: Iterable[str] | None = None) -> None:
        """Record that every tensor's digest and padding matched, or only those of `tensors` (call only
        after checking them; files changed in the last two seconds are not recorded: verified.remember)."""
        remember(self._identity, self.header_digest, None if tensors is None else frozenset(tensors))

    def verified_for(self, tensors: Iterable[str]) -> bool:
        """True if the named tensors' digests matched earlier in this process (a partial load of this
        very file), or the whole file is known intact (`verified_before`)."""
        return self.verified_before or set(tensors) <= remembered_tensors(self._identity, self.header_digest)

    def check_unchanged(self) -> None:
        """Raise IntegrityError if the file was written to since it was opened."""
        if file_identity(self._fd) != self._identity:
            raise IntegrityError(f"{self.path.name}: the file changed on disk while it was being loaded")

    def native_source(self) -> str | None:
        """A name under which `mx.load` opens this very file, or None: version 3 (a safetensors file)
        where the system has /dev/fd (Linux, macOS). The open descriptor's entry names the file this
        Artifact checked even if another was renamed over its path since."""
        if self._native is None:
            fd_path = f"/dev/fd/{self._fd}"
            self._native = (fd_path if self.version not in LEGACY and os.path.exists(fd_path) else "",)
        return self._native[0] or None

    def reading_in_order(self) -> None:
        """Tell the OS that this file's tensors are about to be read front to back (POSIX_FADV_SEQUENTIAL
        on this descriptor: a larger read-ahead window). From a disk the copy path's reads then wait
        less (docs/BENCHMARKS.md); nothing happens where the system has no `posix_fadvise` (macOS)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self.data_offset, 0, os.POSIX_FADV_SEQUENTIAL)

    def cached(self, samples: int = 16) -> bool:
        """Whether the tensor region is in the OS page cache: `samples` pages spread over it all read
        without waiting for a disk (Linux `preadv2(RWF_NOWAIT)`). False where any would wait, and
        where the system cannot tell (then a load assumes the disk: the copy path hashes as it reads).
        Asked once per Artifact: every read of one load takes the same path."""
        if self._cached is None:
            self._cached = self._probe_cache(samples)
        return self._cached

    def _probe_cache(self, samples: int) -> bool:
        flag = getattr(os, "RWF_NOWAIT", None)
        span = self.size - self.data_offset
        if flag is None or span <= 0:
            return False
        page = bytearray(4096)
        for i in range(samples):
            offset = self.data_offset + (span - 1) * i // max(samples - 1, 1)
            try:
                os.preadv(self._fd, [page], offset - offset % 4096, flag)
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: this file system cannot say
                return False
        return True

    def _map(self) -> mmap.mmap:
        with self._lock:
            if self._mmap is None:
                self._mmap = _map(self._fd, self._populate)
            return self._mmap

    def tensor_bytes(self, name: str, verify: bool = True) -> memoryview:
        """A zero-copy view of one tensor's stored bytes in the map; with `verify`, its digest is checked."""
        t = self.tensors[name]
        view = memoryview(self._map())[t.offset : t.offset + t.nbytes]
        if verify:
            self._check_digest(name, digest(view))
        return view

    def read_into(self, name: str, buffers: Sequence[memoryview], verify: bool = True) -> None:
        """Read one tensor's stored bytes, in order, into `buffers` (whose sizes add up to its length).

        One `preadv` per call (page cache -> the caller's memory, the only copy); with `verify`, the
        digest is computed over the buffers afterwards, while they are still hot in the CPU caches.
        """
        t = self.tensors[name]
        views = [memoryview(b).cast("B") for b in buffers]
        if sum(v.nbytes for v in views) != t.nbytes:
            raise ValueError(f"buffers for {name} hold {sum(v.nbytes for v in views)} bytes, the tensor {t.nbytes}")
        offset = t.offset
        while views:
            n = os.preadv(self._fd, views, offset)
            if n <= 0:
                raise ArtifactError(f"{self.path.name}: truncated while reading tensor {name}")
            offset += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        if verify:
            h = blake3.blake3()
            for b in buffers:
                h.update(b)
            self._check_digest(name, h.hexdigest())

    def check_loaded(self, name: str, data: Any, threaded: bool = True) -> None:
        """Check bytes read by someone else (`mx.load`) against a tensor's digest, and its padding
        (`threaded=False`: on this thread alone, for callers hashing several tensors at once)."""
        self._check_digest(name, digest(memoryview(data).cast("B"), threaded))

    def verify_all(self) -> None:
        """Check every tensor's digest and padding (IntegrityError naming the first that fails)."""
        for name in self.tensors:
            self.tensor_bytes(name, verify=True).release()

    def _check_digest(self, name: str, got: str) -> None:
        """`got` (the hex BLAKE3 of a tensor's bytes) must be its recorded digest, and its padding zero."""
        if got != self.tensors[name].digest:
            raise IntegrityError(f"{self.path.name}: tensor {name} does not match its digest (file altered or corrupt)")
        self._check_padding(name)

    def _check_padding(self, name: str) -> None:
        """The bytes between a tensor's end and the next 16 KiB boundary must be zero: nothing hides there."""
        t = self.tensors[name]
        end = t.offset + t.nbytes
        pad = os.pread(self._fd, align(end) - end, end) if align(end) > end else b""
        if pad.count(0) != len(pad):
            raise IntegrityError(f"{self.path.name}: non-zero bytes in the padding after tensor {name}")

    def close(self) -> None:
        """Close the file and unmap it; the unmap fails (BufferError) while views from `tensor_bytes` live."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._mmap is not None:
            self._mmap.close()

    def __enter__(self) -> "Artifact":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except BufferError:
            pass  # a caller still holds a view; the map is released when the last view goes


def read_header(path: str | os.PathLike) -> dict:
    """The validated header of an artifact, without touching tensor data."""
    with Artifact(path) as art:
        return art.header


def _map(fd: int, populate: bool) -> mmap.mmap:
    if populate and hasattr(mmap, "MAP_POPULATE"):
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    if populate and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_WILLNEED)
    return mapped


def _parse(fd: int, size: int, name: str) -> tuple[dict, int, bytes, tuple[bytes, bytes] | None, int]:
    """Read and check the container, header and signature; never reads past what the file holds.

    Returns (header, data offset, header digest, (public key, signature) or None, format version, and
    the header's tensor entries by name: read-only, shared by every Artifact of the same checked header).
    The signature is only extracted here; whether it is valid and trusted is kvmlx/artifact/trust.py's business.
    """
    if size < envelope.LENGTH.size:
        raise ArtifactError(f"{name}: truncated ({size} bytes)")
    first = os.pread(fd, envelope.LENGTH.size, 0)
    listed = table_digest = None
    if first == MAGIC:
        body, data_offset, header_digest, block, version = _read_preamble(fd, size, name)
    else:
        listed, data_offset = envelope.read_table(fd, size, name, first, MAX_HEADER_BYTES)
        table_digest, version = blake3.blake3(listed).digest(), envelope.VERSION
        known = _VALID_TABLES.get((table_digest, size, version))  # a table checked before: its metadata as parsed then
        body, header_digest, block = known or envelope.parse_table(listed, name, MAX_HEADER_BYTES)
    if blake3.blake3(body).digest() != header_digest:
        raise IntegrityError(f"{name}: header does not match its digest (file altered or corrupt)")
    # the checks below depend on nothing else (version 3's table is rebuilt from the rest)
    checked = (header_digest, size, data_offset, version, block, table_digest)
    entries, parsed = _VALID_HEADERS.get(checked, (None, None))
    if parsed is not None:  # these very header bytes were parsed and checked: a fresh copy of that parse
        header = pickle.loads(parsed)  # noqa: S301 - our own pickle of our own parse, never the file's bytes
    else:
        try:
            header = json.loads(body.decode("utf-8"), parse_constant=envelope.reject_constant)
        except (ValueError, RecursionError) as e:
            raise ArtifactError(f"{name}: header is not valid JSON ({type(e).__name__})") from None
    if entries is None:
        try:
            canonical = canonical_json(header) == body
        except (ValueError, RecursionError):  # 1e999 parses as inf, which canonical JSON cannot hold
            canonical = False
        if not canonical:
            raise ArtifactError(f"{name}: header is not canonical JSON (duplicate keys, non-finite or non-canonical numbers, whitespace)")
        validate(header, size, data_offset, name, version)
        if header.get("version") != version:
            raise ArtifactError(f"{name}: invalid header: version {header.get('version')!r} differs from the container's {version}")
        if listed is not None:
            envelope.check_table(listed, header, body, data_offset, header_digest, block, name, ALIGN)
        entries = MappingProxyType({t.name: t for t in (_entry(e) for e in header["tensors"])})
        try:
            parsed = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
        except RecursionError:  # a header nested deeper than pickle recurses: parsed afresh each time
            parsed = None
        with _VALID_LOCK:
            if len(_VALID_HEADERS) >= _MAX_VALID_HEADERS:
                del _VALID_HEADERS[next(iter(_VALID_HEADERS))]
            if len(_VALID_TABLES) >= _MAX_VALID_HEADERS:
                del _VALID_TABLES[next(iter(_VALID_TABLES))]
            _VALID_HEADERS[checked] = entries, parsed
            if table_digest is not None:
                _VALID_TABLES[(table_digest, size, version)] = (body, header_digest, block)
    signature = SIGNATURE_BLOCK.unpack(block) if block is not None else None
    return header, data_offset, header_digest, signature, version, entries


def _read_preamble(fd: int, size: int, name: str) -> tuple[bytes, int, bytes, bytes | None, int]:
    """Versions 1 and 2: the preamble, header bytes and signature block (None when unsigned), checked
    for everything but the header's contents."""
    if size < PREAMBLE.size:
        raise ArtifactError(f"{name}: truncated ({size} bytes, smaller than the 64-byte preamble)")
    magic, version, flags, header_len, data_offset, header_digest = PREAMBLE.unpack(os.pread(fd, PREAMBLE.size, 0))
    if version > VERSION:
        raise UnsupportedVersionError(f"{name}: format version {version} is newer than this kvmlx reads ({VERSION}); upgrade kvmlx")
    if version not in LEGACY:
        raise ArtifactError(f"{name}: invalid format version {version} in a kvmlx preamble")
    if flags & ~FLAG_SIGNED:
        raise ArtifactError(f"{name}: unknown flags {flags:#x} in a version-{version} file")
    if header_len > MAX_HEADER_BYTES:
        raise ArtifactError(f"{name}: declared header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if PREAMBLE.size + header_len > size:
        raise ArtifactError(f"{name}: truncated (header needs {PREAMBLE.size + header_len} bytes, file has {size})")
    head_end = PREAMBLE.size + header_len + SIGNATURE_BLOCK.size
    if data_offset % ALIGN or data_offset < head_end:
        raise ArtifactError(f"{name}: invalid data offset {data_offset}")
    if data_offset > size:
        raise ArtifactError(f"{name}: truncated (data starts at {data_offset}, file has {size} bytes)")
    if data_offset != align(head_end):
        raise ArtifactError(f"{name}: data offset {data_offset} is not the first {ALIGN}-byte boundary after the header")
    rest = os.pread(fd, data_offset - PREAMBLE.size, PREAMBLE.size)
    if len(rest) != data_offset - PREAMBLE.size:
        raise ArtifactError(f"{name}: truncated while reading the header")
    body, block = rest[:header_len], rest[header_len : header_len + SIGNATURE_BLOCK.size]
    if any(rest[header_len + SIGNATURE_BLOCK.size :]) or (not flags & FLAG_SIGNED and any(block)):
        raise ArtifactError(f"{name}: non-zero bytes in the padding after the header")
    return body, data_offset, header_digest, block if flags & FLAG_SIGNED else None, version


# Headers that passed the canonical-JSON and structural checks in this process, by (header digest, file
# size, data offset, version, signature, table digest): those checks are a pure function of the header's
# bytes (which match the digest just recomputed) and of these, so a re-load skips them (0.5-1 ms a load), and the
# JSON parse too: each caller gets its own copy of the parsed header (unpickled from this process's own pickle of
# it, half the cost of parsing), so no caller shares a header dict; the tensor entries, read-only, are shared. Version
# 3's tables checked before, by (table digest, file size, version read): their metadata as parsed then (a re-load parses
# only the header). Bounded; the oldest entries go first.
_VALID_HEADERS: dict[tuple, tuple[MappingProxyType, bytes | None]] = {}  # checked header -> (entries, pickled header)
_VALID_TABLES: dict[tuple, tuple] = {}
_MAX_VALID_HEADERS = 4096
_VALID_LOCK = threading.Lock()


def _entry(e: dict) -> TensorEntry:
    return TensorEntry(e["name"], e["dtype"], tuple(e["shape"]), e["offset"], e["nbytes"], e["digest"], e["encoding"], e.get("params", {}))
