"""What a kvmlx header may say: the dtypes, encodings and limits of the format, and `validate`, the
structural checks of a parsed header against its file (types, ranges, and tensors that fit the file
exactly). No I/O: format.py reads the container and calls `validate`; layers.py checks cache families.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from ..errors import ArtifactError
from . import layers
from .layout import kv_plan

ALIGN = 16384  # Apple Silicon page size: tensors can be handed to Metal without a copy
MAX_TOKENS = 1 << 24
DIGEST = "blake3"

# dtype name -> bytes per element. KV and logits are floating; nothing else is accepted in v1.
DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}
# any tensor of version 2 may also be packed words (quantized KV: layers.py says where)
TENSOR_DTYPES = {**DTYPE_SIZES, "uint32": 4}
# encoding name -> lossless? The arithmetic lives in kvmlx/artifact/encodings.py; raw tensors can be mapped as-is.
ENCODINGS = {"raw": True, "bytesplit-zstd": True, "expsplit-zstd": True, "int8-tensor": False, "q8": False, "q4": False}
MAX_EXPANSION = 64  # an encoded tensor may decode to at most this many times its stored bytes (+1 MiB)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def kv_tensor_names(num_layers: int, first: int = 0) -> list[str]:
    """The KV tensors a version-1 artifact holds, in file order: layers.{i}.keys, layers.{i}.values
    (for i in [first, num_layers): a pipeline stage's part holds only its layers)."""
    return [f"layers.{i}.{kind}" for i in range(first, num_layers) for kind in ("keys", "values")]


def align(n: int) -> int:
    """Round n up to the next multiple of ALIGN."""
    return -(-n // ALIGN) * ALIGN


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _require(cond: bool, name: str, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{name}: invalid header: {what}")


def _printable(s: Any, limit: int = 1024) -> bool:
    return isinstance(s, str) and len(s) <= limit and s.isprintable()


def _is_int(x: Any, lo: int = 0, hi: int = 1 << 62) -> bool:
    return type(x) is int and lo <= x <= hi


def _get(d: Any, key: str, typ: type | tuple[type, ...], name: str) -> Any:
    _require(isinstance(d, dict) and key in d, name, f"missing field {key!r}")
    _require(isinstance(d[key], typ) and not (typ is int and isinstance(d[key], bool)), name, f"field {key!r} has the wrong type")
    return d[key]


def validate(h: Any, size: int, data_offset: int, name: str, version: int = 1) -> None:
    """Structural checks on a header: types, ranges, and tensors that fit the file exactly.

    A version-2 header, and a version-3 header with `caches`, is checked as cache families (layers.py);
    a version-1 header, and a version-3 header without, as plain KV."""
    _require(isinstance(h, dict), name, "not a JSON object")
    layered = version == 2 or (version > 2 and "caches" in h)
    _require(h.get("format") == "kvmlx", name, "format is not 'kvmlx'")
    _require(h.get("digest") == DIGEST, name, f"unknown digest algorithm {h.get('digest')!r}")
    file_bytes = _get(h, "file_bytes", int, name)
    if file_bytes != size:
        raise ArtifactError(f"{name}: truncated or padded (header declares {file_bytes} bytes, file has {size})")
    model = _get(h, "model", dict, name)
    for key in ("id", "fingerprint", "model_type"):
        _require(_printable(_get(model, key, str, name)), name, f"model.{key} is not a printable one-line string")
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        _require(_is_int(_get(model, key, int, name), 1, 1 << 20), name, f"model.{key} out of range")
    _get(model, "rope", dict, name)
    _require(_printable(_get(_get(h, "tokenizer", dict, name), "fingerprint", str, name)), name, "tokenizer.fingerprint is not printable")
    _require(_printable(h.get("created_by", "")), name, "created_by is not a printable one-line string")
    kv = _get(h, "kv", dict, name)
    kv_dtype = _get(kv, "dtype", str, name)
    _require(kv_dtype in DTYPE_SIZES, name, f"unsupported KV dtype {kv_dtype!r}")
    _require(_get(kv, "layout", str, name) == "BHLD", name, "unknown KV layout")
    n_tokens = _get(kv, "num_tokens", int, name)
    _require(_is_int(n_tokens, 1, MAX_TOKENS), name, "kv.num_tokens out of range")
    _require(_is_int(_get(kv, "chunk_size", int, name), 1, MAX_TOKENS), name, "kv.chunk_size out of range")
    tokens = _get(_get(h, "document", dict, name), "tokens", list, name)
    _require(len(tokens) == n_tokens, name, f"{len(tokens)} token ids for kv.num_tokens={n_tokens}")
    _require(set(map(type, tokens)) <= {int} and (not tokens or 0 <= min(tokens) and max(tokens) < 1 << 31), name,
             "token ids must be non-negative integers")

    entries = _get(h, "tensors", list, name)
    (first, end_layer), heads, has_logits = kv_plan(h, name)  # a parallel part or manifest holds less (layout.py)
    _require(not layered or "parallel" not in h, name,
             "parallel artifacts hold plain KV: cache families and --kv-bits are single-process only")
    expected = kv_tensor_names(end_layer, first)
    _require(layered or len(entries) == len(expected) + has_logits, name,
             f"{len(entries)} tensors for {model['num_layers']} layers (tensors missing or extra)")
    seen: set[str] = set()
    end, gap = data_offset, None
    for e in sorted(entries, key=lambda e: e["offset"] if isinstance(e, dict) and _is_int(e.get("offset")) else -1):
        tname = _get(e, "name", str, name)
        _require(tname not in seen, name, f"tensor {tname!r} listed twice")
        seen.add(tname)
        dtype = _get(e, "dtype", str, name)
        _require(dtype in (TENSOR_DTYPES if layered else DTYPE_SIZES), name, f"tensor {tname!r} has unsupported dtype {dtype!r}")
        _require(_get(e, "encoding", str, name) in ENCODINGS, name, f"tensor {tname!r} has unknown encoding {e['encoding']!r}")
        shape = _get(e, "shape", list, name)
        _require(len(shape) <= 8 and all(_is_int(s, 0, 1 << 40) for s in shape), name, f"tensor {tname!r} has an invalid shape")
        nbytes, offset = _get(e, "nbytes", int, name), _get(e, "offset", int, name)
        decoded = _prod(shape) * TENSOR_DTYPES[dtype]
        if e["encoding"] == "raw":
            _require(nbytes == decoded, name, f"tensor {tname!r}: nbytes does not match shape and dtype")
        else:
            _require(0 < nbytes and decoded <= MAX_EXPANSION * nbytes + (1 << 20), name, f"tensor {tname!r}: implausible encoded size")
            _require(isinstance(e.get("params", {}), dict), name, f"tensor {tname!r}: params must be an object")
        _require(offset % ALIGN == 0, name, f"tensor {tname!r} is not {ALIGN}-byte aligned")
        _require(offset >= end, name, f"tensor {tname!r} overlaps the header or another tensor")
        _require(offset + nbytes <= size, name, f"tensor {tname!r} extends past the end of the file")
        gap = gap or (tname if offset != align(end) else None)
        d = _get(e, "digest", str, name)
        _require(_HEX64.fullmatch(d) is not None, name, f"tensor {tname!r} has a malformed digest")
        end = offset + nbytes

    _require(gap is None, name, f"tensor {gap!r} is not right after the previous one (the layout has no gaps)")
    _require(file_bytes == align(end), name, "bytes after the last tensor")
    head_dim = model["head_dim"]
    by_name = {e["name"]: e for e in entries}
    if has_logits:  # a parallel manifest holds no tensors at all
        _require("logits" in by_name and len(by_name["logits"]["shape"]) == 1, name, "tensor 'logits' is missing or not a vector")
        _require(by_name["logits"]["encoding"] == "raw" and by_name["logits"]["dtype"] in DTYPE_SIZES, name,
                 "tensor 'logits' must be raw floats")
    kv_encoding = kv.get("encoding", "raw")
    _require(isinstance(kv_encoding, str) and kv_encoding in ENCODINGS, name, f"unknown KV encoding {kv_encoding!r}")
    _require(kv.get("lossless", ENCODINGS[kv_encoding]) is ENCODINGS[kv_encoding], name, "kv.lossless contradicts kv.encoding")
    if layered:
        layers.validate(h, by_name, name)
        return
    for tname in expected:
        _require(tname in by_name, name, f"tensor {tname!r} is missing")
        e = by_name[tname]
        _require(e["shape"] == [1, heads, n_tokens, head_dim], name, f"tensor {tname!r} has shape {e['shape']}, expected {[1, heads, n_tokens, head_dim]}")
        _require(e["dtype"] == kv_dtype, name, f"tensor {tname!r} is {e['dtype']}, the header says KV is {kv_dtype}")
    _require(all(by_name[t]["encoding"] == kv_encoding for t in expected), name, "KV tensors' encodings differ from kv.encoding")
    _require(len(entries) == len(expected) + has_logits, name, "unexpected extra tensors")
