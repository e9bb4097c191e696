"""Cache records: the files of the store's prefix cache (docs/STORE.md, "The prefix cache").

One record is a run of tokens of one conversation prefix (a *segment*: the KV of the layers that can
be cut at any token, sliced to its positions) or the state of the other layers after a prefix (a
*snapshot*: recurrent state, sliding windows). The layout is the artifact's, smaller:

    0   8  magic  b"\\x89KVBLK\\r\\n"
    8   4  format version (u32, 1)
    12  4  flags (u32, 0)
    16  8  header length H (u64)
    24  8  data offset (u64, a multiple of RECORD_ALIGN)
    32 32  BLAKE3 digest of the header bytes
    64  H  header: canonical UTF-8 JSON ({kvmlx_record, key, kind, parent, start, tokens, layers, tensors})
    ...    tensors, each at a RECORD_ALIGN-aligned offset with its BLAKE3 digest in the header

Records are small (a block of 256 tokens at most) and are read into memory whole, so they are aligned
to 64 bytes, not to pages: no padding to speak of for a 20-token tail. Writes are atomic (temp file
in the caller's staging directory, fsync, rename); the file is created 0600 (records hold
conversations). The reader checks every length and offset against the file and every digest it is
asked to, and raises `ArtifactError`/`IntegrityError` with one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import blake3
import numpy as np

from ..errors import ArtifactError, IntegrityError, UnsupportedVersionError
from .format import PREAMBLE, TENSOR_DTYPES, TensorEntry, _write_all, canonical_json, replacing

RECORD_MAGIC = b"\x89KVBLK\r\n"
RECORD_VERSION = 1
RECORD_ALIGN = 64
MAX_RECORD_HEADER = 16 << 20
KINDS = ("segment", "snapshot")


def _align(n: int) -> int:
    return -(-n // RECORD_ALIGN) * RECORD_ALIGN


def write_record(path: Path, header: dict, tensors: Sequence[tuple[str, str, tuple[int, ...], memoryview]],
                 staging: Path) -> int:
    """Write one record atomically at `path` (temp file in `staging`, fsync, rename; mode 0600).

    `tensors`: (name, dtype, shape, C-contiguous bytes). Returns the file's size in bytes."""
    entries, datas, pos = [], [], 0
    for name, dtype, shape, data in tensors:
        data = memoryview(data).cast("B")
        if dtype not in TENSOR_DTYPES or data.nbytes != int(np.prod(shape, dtype=np.int64)) * TENSOR_DTYPES[dtype]:
            raise ArtifactError(f"cannot write record tensor {name}: {data.nbytes} bytes, {dtype} {tuple(shape)}")
        entries.append({"name": name, "dtype": dtype, "shape": [int(s) for s in shape], "offset": pos,
                        "nbytes": data.nbytes, "digest": blake3.blake3(data).hexdigest()})
        datas.append(data)
        pos = _align(pos + data.nbytes)
    body = canonical_json({**header, "kvmlx_record": RECORD_VERSION, "tensors": entries})
    data_offset = _align(PREAMBLE.size + len(body))
    head = PREAMBLE.pack(RECORD_MAGIC, RECORD_VERSION, 0, len(body), data_offset, blake3.blake3(body).digest()) + body
    with replacing(path, directory=staging, prefix=".record.") as tmp, open(tmp, "wb", buffering=0) as f:
        _write_all(f, head + bytes(data_offset - len(head)))
        for e, data in zip(entries, datas):
            _write_all(f, data)
            _write_all(f, bytes(_align(e["nbytes"]) - e["nbytes"]))
    return data_offset + pos


@dataclass
class Record:
    """A record read into memory: its header, tensors (as numpy byte views of one buffer), file size."""

    header: dict
    tensors: dict[str, TensorEntry]
    buffer: np.ndarray  # the data region, uint8
    file_bytes: int

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.buffer[t.offset : t.offset + t.nbytes]


def read_record(path: Path, *, verify: bool = True) -> Record:
    """Read and check one record file (every tensor's digest unless `verify` is False)."""
    where = path.name
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pre = f.read(PREAMBLE.size)
        if len(pre) < PREAMBLE.size:
            raise ArtifactError(f"{where}: truncated cache record ({size} bytes)")
        magic, version, flags, hlen, data_offset, hdigest = PREAMBLE.unpack(pre)
        if magic != RECORD_MAGIC:
            raise ArtifactError(f"{where}: not a kvmlx cache record (bad magic)")
        if version > RECORD_VERSION:
            raise UnsupportedVersionError(f"{where}: cache record version {version} is newer than this kvmlx reads ({RECORD_VERSION})")
        if version < 1 or flags != 0 or hlen > MAX_RECORD_HEADER or data_offset % RECORD_ALIGN \
                or data_offset < PREAMBLE.size + hlen or data_offset > size:
            raise ArtifactError(f"{where}: malformed cache record preamble")
        body = f.read(hlen)
        if len(body) != hlen:
            raise ArtifactError(f"{where}: truncated cache record header")
        if blake3.blake3(body).digest() != hdigest:
            raise IntegrityError(f"{where}: cache record header digest mismatch (altered or corrupt)")
        try:
            header = json.loads(body)
        except ValueError:
            raise ArtifactError(f"{where}: cache record header is not JSON") from None
        tensors = _check_header(header, size - data_offset, where)
        f.seek(data_offset)
        buffer = np.empty(size - data_offset, dtype=np.uint8)
        if f.readinto(memoryview(buffer)) != buffer.nbytes:
            raise ArtifactError(f"{where}: truncated cache record data")
    rec = Record(header, tensors, buffer, size)
    if verify:
        for t in tensors.values():
            if blake3.blake3(memoryview(rec.raw(t.name))).hexdigest() != t.digest:
                raise IntegrityError(f"{where}: tensor {t.name} digest mismatch (altered or corrupt)")
    return rec


def _check_header(header, data_bytes: int, where: str) -> dict[str, TensorEntry]:
    def bad(what: str):
        return ArtifactError(f"{where}: malformed cache record header ({what})")

    if not isinstance(header, dict) or header.get("kvmlx_record") != RECORD_VERSION:
        raise bad("not a record header")
    if header.get("kind") not in KINDS:
        raise bad("kind")
    for k in ("key", "parent", "identity", "root"):
        if not isinstance(header.get(k), str) or len(header[k]) != 64:
            raise bad(k)
    start, tokens = header.get("start"), header.get("tokens")
    if not isinstance(start, int) or start < 0 or not isinstance(tokens, list) or \
            not all(isinstance(t, int) and 0 <= t < 1 << 32 for t in tokens):
        raise bad("start or tokens")
    if not isinstance(header.get("layers"), dict):
        raise bad("layers")
    out: dict[str, TensorEntry] = {}
    end = 0
    for e in header.get("tensors", None) or []:
        try:
            t = TensorEntry(str(e["name"]), str(e["dtype"]), tuple(int(s) for s in e["shape"]), int(e["offset"]),
                             int(e["nbytes"]), str(e["digest"]))
        except (KeyError, TypeError, ValueError):
            raise bad("tensor entry") from None
        if t.dtype not in TENSOR_DTYPES or any(s < 0 for s in t.shape) or t.name in out or \
                t.nbytes != int(np.prod(t.shape, dtype=np.int64)) * TENSOR_DTYPES[t.dtype] or \
                t.offset % RECORD_ALIGN or t.offset < end or t.offset + t.nbytes > data_bytes:
            raise bad(f"tensor {t.name}")
        end = t.offset + t.nbytes
        out[t.name] = t
    return out
