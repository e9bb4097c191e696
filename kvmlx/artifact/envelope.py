"""Version 3's container: a safetensors file whose `__metadata__` carries the kvmlx header.

Layout (docs/FORMAT.md, "Version 3"):

    0    8  N: length of the table, u64 little-endian
    8    N  the table: canonical JSON, padded with spaces so that 8 + N (the data offset) is a multiple of ALIGN
            {"__metadata__": {"format": "kvmlx", "header": "<the kvmlx header: canonical JSON, as a string>",
                              "header_blake3": "<hex>", "signature": "<hex: public key + signature>" (signed only),
                              "version": "3"},
             "<tensor name>": {"data_offsets": [begin, end], "dtype": "BF16", "shape": [1, 8, 3774, 128]}, ...}
    8+N  …  the tensors, exactly as in versions 1 and 2 (each ALIGN-aligned, zero padded)

Any safetensors reader opens it, `mx.load` among them: MLX reads each tensor on its own I/O threads
straight into an exact-size array, which is what mlx-lm's `load_prompt_cache` does (the `native`
load path, kvmlx/runtime/load.py). The table says nothing of its own: it is a function of the kvmlx
header (and of the signature), and a reader rebuilds it and requires these very bytes (`check_table`),
so no offset, shape or dtype that `mx.load` follows can differ from what the header's checks covered.
Raw tensors are listed with their dtype and shape; encoded ones as their stored bytes ("U8", [nbytes]).
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Sequence

from ..errors import ArtifactError, UnsupportedVersionError

LENGTH = struct.Struct("<Q")
VERSION = 3
ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "uint32": "U32"}
_HEX = re.compile(r"[0-9a-f]*")
_META_KEYS = {"format", "version", "header", "header_blake3", "signature"}


def table(body: bytes, entries: Sequence[dict], data_offset: int, header_digest: bytes,
          signature: bytes | None) -> bytes:
    """The table (without its length) for a header `body` whose tensors are `entries` (their absolute
    offsets), padded with spaces to `data_offset - 8` bytes; longer if it does not fit (the writer
    then moves the data offset)."""
    meta = {"format": "kvmlx", "version": str(VERSION), "header": body.decode("ascii"), "header_blake3": header_digest.hex()}
    if signature is not None:
        meta["signature"] = signature.hex()
    listed: dict = {"__metadata__": meta}
    for e in entries:
        begin = e["offset"] - data_offset
        raw = e["encoding"] == "raw"
        listed[e["name"]] = {"data_offsets": [begin, begin + e["nbytes"]],
                             "dtype": ST_DTYPES[e["dtype"]] if raw else "U8",
                             "shape": list(e["shape"]) if raw else [e["nbytes"]]}
    text = json.dumps(listed, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    return text + b" " * max(0, data_offset - LENGTH.size - len(text))


def read_table(fd: int, size: int, name: str, first: bytes, max_header: int) -> tuple[bytes, int]:
    """A version-3 container's table bytes (bounded, inside the file) and its data offset, from the
    file's first 8 bytes. The caller parses it (`parse_table`), checks the header body against its
    digest, validates the header, then calls `check_table`."""
    (n,) = LENGTH.unpack(first)
    if n > 4 * max_header or n < 2 or os.pread(fd, 1, LENGTH.size) != b"{":
        raise ArtifactError(f"{name}: not a kvmlx artifact (bad magic bytes)")
    data_offset = LENGTH.size + n
    if data_offset > size:
        raise ArtifactError(f"{name}: truncated (the table needs {data_offset} bytes, file has {size})")
    raw = os.pread(fd, n, LENGTH.size)
    if len(raw) != n:
        raise ArtifactError(f"{name}: truncated while reading the table")
    return raw, data_offset


def parse_table(raw: bytes, name: str, max_header: int) -> tuple[bytes, bytes, bytes | None]:
    """(header body, header digest, public key + signature or None) from a table's metadata, checked."""
    try:
        listed = json.loads(raw.decode("ascii"), parse_constant=reject_constant)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{name}: safetensors table is not valid JSON ({type(e).__name__})") from None
    meta = listed.get("__metadata__") if isinstance(listed, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != "kvmlx":
        raise ArtifactError(f"{name}: not a kvmlx artifact (a safetensors file without kvmlx metadata; "
                            "an mlx-lm prompt cache becomes one with `kvmlx import`)")
    version = meta.get("version")
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 6 and int(version) > VERSION:
        raise UnsupportedVersionError(f"{name}: format version {int(version)} is newer than this kvmlx reads ({VERSION}); upgrade kvmlx")
    if version != str(VERSION):
        raise ArtifactError(f"{name}: invalid format version {str(version)[:20]!r} in the safetensors metadata")
    if not set(meta) <= _META_KEYS or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"{name}: unexpected fields in the safetensors metadata")
    body, digest, signature = meta.get("header", ""), meta.get("header_blake3", ""), meta.get("signature")
    if not body.isascii():  # canonical JSON is ASCII (and \u escapes in the table could say anything)
        raise ArtifactError(f"{name}: the header in the safetensors metadata is not ASCII (not canonical JSON)")
    if len(body) > max_header:
        raise ArtifactError(f"{name}: declared header of {len(body)} bytes exceeds the {max_header}-byte limit")
    if len(digest) != 64 or not _HEX.fullmatch(digest):
        raise ArtifactError(f"{name}: malformed header digest in the safetensors metadata")
    if signature is not None and (len(signature) != 192 or not _HEX.fullmatch(signature)):
        raise ArtifactError(f"{name}: malformed signature in the safetensors metadata")
    return body.encode("ascii"), bytes.fromhex(digest), None if signature is None else bytes.fromhex(signature)


def check_table(raw: bytes, header: dict, body: bytes, data_offset: int, header_digest: bytes,
                signature: bytes | None, name: str, align: int) -> None:
    """The table must be exactly the one the validated header makes (nothing else for `mx.load` to
    follow), and its padding end at the first `align`-byte boundary after it."""
    if table(body, header["tensors"], data_offset, header_digest, signature) != raw:
        raise ArtifactError(f"{name}: the safetensors table does not match the kvmlx header (tensors listed differently, or bytes hidden in it)")
    if -(-(LENGTH.size + len(raw.rstrip(b" "))) // align) * align != data_offset:
        raise ArtifactError(f"{name}: data offset {data_offset} is not the first {align}-byte boundary after the table")


def reject_constant(token: str) -> None:
    """`json.loads`'s `parse_constant`: NaN and Infinity are no JSON number kvmlx accepts."""
    raise ValueError(f"non-finite number {token}")
