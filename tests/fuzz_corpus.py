"""Valid and hostile `.kvmlx` files for the fuzz, trust and crash tests, and the loader they are fed to.

Most helpers that take files apart (`split`, `set_preamble`, `raw_file`, `corpus`, `corpus_v2`) work
on kvmlx's own container (versions 1 and 2: the 64-byte preamble), which every reader still reads:
the bases they are given are written with `format_version=1` (or 2). `header_of`, `rebuild`,
`boundaries` and `with_tensor_bytes` also take version 3 (a safetensors file: `split_v3`,
`rebuild_v3`, `v3_raw`), whose hostile files are `corpus_v3` (test_format_v3.py says how each is refused).

`attempt(path, lm)` does what a loader does with a file, stage by stage, and returns the outcome:
"accepted" or "<stage>:<ErrorClass>". Any exception that is not a `KvmlxError`, or a message that is not
one printable line, propagates as a test failure. `python tests/fuzz_corpus.py worker MANIFEST` runs
the same stages in a separate process (see test_fuzz.py), so a segfault or an abort is caught too.
"""

from __future__ import annotations

import json
import resource
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import blake3
import numpy as np

from kvmlx.errors import KvmlxError
from kvmlx.artifact import envelope
from kvmlx.artifact.format import ALIGN, DTYPE_SIZES, MAGIC, PREAMBLE, SIGNATURE_BLOCK, Artifact, TensorData, align, canonical_json, read_header, write_artifact

FLAG_SIGNED = 1


# ---------------------------------------------------------------- valid artifacts


def synthetic_header(layers: int, heads: int, tokens: int, head_dim: int, dtype: str = "float16") -> dict:
    return {
        "model": {"id": "test", "fingerprint": "blake3:00", "model_type": "qwen3", "num_layers": layers,
                  "num_kv_heads": heads, "head_dim": head_dim, "rope": {"rope_theta": 10000.0}},
        "tokenizer": {"fingerprint": "blake3:11"},
        "kv": {"dtype": dtype, "layout": "BHLD", "num_tokens": tokens, "chunk_size": 4},
        "document": {"tokens": list(range(tokens)), "text_blake3": None},
    }


def synthetic_artifact(path: Path, *, layers: int = 2, heads: int = 2, tokens: int = 5, head_dim: int = 8,
                       vocab: int = 16, dtype: str = "float16", sign=None, seed: int = 0) -> Path:
    """A model-free artifact of random KV (for format-level tests and large synthetic benchmarks)."""
    rng = np.random.default_rng(seed)
    np_dtype = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}[dtype]
    tensors = []
    for i in range(layers):
        for kind in ("keys", "values"):
            a = rng.standard_normal((1, heads, tokens, head_dim)).astype(np.float32).astype(np_dtype) if dtype != "bfloat16" \
                else rng.integers(0, 1 << 16, (1, heads, tokens, head_dim), dtype=np.uint16)
            tensors.append(TensorData(f"layers.{i}.{kind}", dtype, a.shape, memoryview(a).cast("B")))
    logits = rng.standard_normal(vocab).astype(np.float16)
    tensors.append(TensorData("logits", "float16", logits.shape, memoryview(logits).cast("B")))
    write_artifact(path, synthetic_header(layers, heads, tokens, head_dim, dtype), tensors, sign=sign)
    return path


# ---------------------------------------------------------------- taking files apart


def split(raw: bytes) -> dict:
    """The preamble fields, header bytes and signature block of a (valid) artifact's bytes."""
    magic, version, flags, hlen, data_offset, hdigest = PREAMBLE.unpack_from(raw, 0)
    return {"magic": magic, "version": version, "flags": flags, "header_len": hlen, "data_offset": data_offset,
            "digest": hdigest, "body": raw[64 : 64 + hlen], "block": raw[64 + hlen : 64 + hlen + SIGNATURE_BLOCK.size]}


class Bases(tuple):
    """(unsigned, signed) artifact bytes, with a short repr for Hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"Bases({', '.join(f'<{len(b)} bytes>' for b in self)})"


def is_v3(raw: bytes) -> bool:
    """True for version 3 (a safetensors file), False for kvmlx's own container (versions 1 and 2)."""
    return raw[:8] != MAGIC


def split_v3(raw: bytes) -> dict:
    """The parts of a (valid) version-3 artifact's bytes: the table (padded, and its JSON text without
    the padding), its parsed contents and metadata, the header bytes, the signature and the data offset."""
    (n,) = envelope.LENGTH.unpack_from(raw, 0)
    table = bytes(raw[8 : 8 + n])
    listed = json.loads(table)
    meta = listed["__metadata__"]
    sig = meta.get("signature")
    return {"table_len": n, "table": table, "text": table.rstrip(b" "), "data_offset": 8 + n, "listed": listed,
            "meta": meta, "body": meta["header"].encode("ascii"), "signature": None if sig is None else bytes.fromhex(sig)}


def header_of(raw: bytes) -> dict:
    return json.loads(split_v3(raw)["body"] if is_v3(raw) else split(raw)["body"])


def v3_raw(text: bytes, payload: bytes, *, data_offset: int | None = None, length: int | None = None, pad: bytes = b" ") -> bytes:
    """A version-3 file from scratch: the table `text` padded with `pad` up to `data_offset` (default:
    the first aligned boundary after it), then `payload`; the length field says `length` if given."""
    do = align(8 + len(text)) if data_offset is None else data_offset
    table = text + (pad * (do - 8 - len(text)))[: max(0, do - 8 - len(text))]
    return envelope.LENGTH.pack(len(table) if length is None else length) + table + payload


def rebuild_v3(raw: bytes, header: dict | bytes, *, sign=None, keep_signature: bool = False,
               data_offset: int | None = None) -> bytes:
    """`rebuild` for a version-3 artifact: the header replaced and re-digested, the table made from it
    as a writer would (so only the header's content can be wrong). A dict's tensors must be objects
    with the fields the table lists; a dict moves the data (and every tensor offset and `file_bytes`
    with it) to the first aligned boundary after the new table, or to `data_offset` if given.
    Bytes are used as they are (the table lists the tensors they parse to, else the old header's)."""
    old = split_v3(raw)
    payload = raw[old["data_offset"]:]
    signed = sign is not None or (keep_signature and old["signature"] is not None)
    placeholder = bytes(SIGNATURE_BLOCK.size) if signed else None
    if not isinstance(header, (bytes, bytearray, dict)):
        header = canonical_json(header)
    if isinstance(header, dict):
        header = json.loads(json.dumps(header))
        do = old["data_offset"]
        while True:
            body = canonical_json(header)
            needed = data_offset or align(8 + len(envelope.table(body, header["tensors"], do, bytes(32), placeholder).rstrip(b" ")))
            if needed == do:
                break
            for t in header["tensors"]:
                t["offset"] += needed - do
            header["file_bytes"] += needed - do
            do = needed
        entries = header["tensors"]
    else:
        body = bytes(header)
        try:
            entries = json.loads(body)["tensors"]
        except (ValueError, KeyError, TypeError):
            entries = header_of(raw)["tensors"]
        do = data_offset or align(8 + len(envelope.table(body, entries, old["data_offset"], bytes(32), placeholder).rstrip(b" ")))
    hdigest = blake3.blake3(body).digest()
    signature = SIGNATURE_BLOCK.pack(*sign(hdigest)) if sign is not None else old["signature"] if signed else None
    listed = envelope.table(body, entries, do, hdigest, signature)
    assert 8 + len(listed) == do, "the table does not fit before the data offset"
    return envelope.LENGTH.pack(len(listed)) + listed + payload


def boundaries(raw: bytes) -> list[int]:
    """Every section boundary of a valid artifact: preamble fields (or the length field), header (or
    table), signature, data, tensors, padding."""
    if is_v3(raw):
        p = split_v3(raw)
        cuts = {0, 8, 9, 8 + len(p["text"]), p["data_offset"], len(raw)}
        for t in header_of(raw)["tensors"]:
            cuts |= {t["offset"], t["offset"] + t["nbytes"], align(t["offset"] + t["nbytes"])}
        return sorted(cuts)
    parts = split(raw)
    cuts = {0, 8, 12, 16, 24, 32, 64, 64 + parts["header_len"], 64 + parts["header_len"] + SIGNATURE_BLOCK.size,
            parts["data_offset"], len(raw)}
    for t in header_of(raw)["tensors"]:
        cuts |= {t["offset"], t["offset"] + t["nbytes"], align(t["offset"] + t["nbytes"])}
    return sorted(cuts)


def rebuild(raw: bytes, header: dict | bytes, *, sign=None, keep_block: bool = False, flags: int | None = None) -> bytes:
    """`raw` with its header replaced and re-digested, so that only the header's *content* can be wrong.

    A dict is encoded canonically, and if it no longer fits before the data it moves the data (and
    shifts every integer tensor offset and `file_bytes` by the same amount, so lies stay relative).
    Bytes are used as they are. With `sign`, the new digest is signed; with `keep_block`, the old
    signature block is kept (a re-digested but not re-signed header); else the file is unsigned.
    A version-3 `raw` is rebuilt as one (`rebuild_v3`).
    """
    if is_v3(raw):
        assert flags is None, "version 3 has no flags"
        return rebuild_v3(raw, header, sign=sign, keep_signature=keep_block)
    old = split(raw)
    payload = raw[old["data_offset"]:]
    if not isinstance(header, (bytes, bytearray, dict)):  # any other JSON value in place of the header
        header = canonical_json(header)
    if isinstance(header, dict):
        header = json.loads(json.dumps(header))
        shift = 0
        while True:
            body = canonical_json(header)
            data_offset = align(64 + len(body) + SIGNATURE_BLOCK.size)
            delta = data_offset - old["data_offset"] - shift
            if delta == 0:
                break
            shift += delta
            for t in header.get("tensors", []) if isinstance(header.get("tensors"), list) else []:
                if isinstance(t, dict) and type(t.get("offset")) is int:
                    t["offset"] += delta
            if type(header.get("file_bytes")) is int:
                header["file_bytes"] += delta
    else:
        body = header
        data_offset = align(64 + len(body) + SIGNATURE_BLOCK.size)
    hdigest = blake3.blake3(body).digest()
    if sign is not None:
        block, fl = SIGNATURE_BLOCK.pack(*sign(hdigest)), FLAG_SIGNED
    elif keep_block:
        block, fl = old["block"], old["flags"]
    else:
        block, fl = bytes(SIGNATURE_BLOCK.size), 0
    fl = fl if flags is None else flags
    head = PREAMBLE.pack(MAGIC, old["version"], fl, len(body), data_offset, hdigest) + body + block
    return head + bytes(data_offset - len(head)) + payload


def with_tensor_bytes(raw: bytes, name: str, blob: bytes) -> tuple[bytes, dict]:
    """`raw` with tensor `name`'s stored bytes replaced by `blob` (same length) and its digest updated:
    what a malicious publisher can make. Returns (file bytes with the old header, the new header)."""
    h = header_of(raw)
    t = next(t for t in h["tensors"] if t["name"] == name)
    assert len(blob) == t["nbytes"]
    out = bytearray(raw)
    out[t["offset"] : t["offset"] + t["nbytes"]] = blob
    t["digest"] = blake3.blake3(blob).hexdigest()
    return bytes(out), h


def zstd_bomb(encoded: bytes, decoded_bytes: int = 256 << 20) -> bytes:
    """An artifact like `encoded` (a *-zstd one) whose first KV tensor's planes are zstd frames that
    declare and hold `decoded_bytes` of zeros each: ~10 KB on disk per 256 MB decoded. Well formed,
    correctly digested: only the decoder can refuse it, and it must do so without decoding it.
    Written in the legacy container, like `encoded`."""
    import tempfile

    import zstandard

    h = header_of(encoded)
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(decoded_bytes))
    tensors = []
    for t in sorted(h["tensors"], key=lambda t: t["offset"]):
        data = encoded[t["offset"] : t["offset"] + t["nbytes"]]
        params = t.get("params", {})
        if t["name"] == "layers.0.keys":
            planes = len(params["frames"])
            data, params = frame * planes, {**params, "frames": [len(frame)] * planes}
        tensors.append(TensorData(t["name"], t["dtype"], tuple(t["shape"]), memoryview(data), t["encoding"], params))
    header = {k: v for k, v in h.items() if k not in ("tensors", "file_bytes", "format", "version", "digest")}
    with tempfile.TemporaryDirectory() as d:
        write_artifact(Path(d) / "bomb.kvmlx", header, tensors, version=h["version"])
        return (Path(d) / "bomb.kvmlx").read_bytes()


def raw_file(body: bytes, *, header_len: int | None = None, data_offset: int | None = None, flags: int = 0,
             version: int = 1, payload: bytes = b"", digest: bytes | None = None) -> bytes:
    """A file made from scratch around arbitrary header bytes, with a correct digest unless told otherwise."""
    hl = len(body) if header_len is None else header_len
    do = align(64 + len(body) + SIGNATURE_BLOCK.size) if data_offset is None else data_offset
    pre = PREAMBLE.pack(MAGIC, version, flags, hl, do, blake3.blake3(body).digest() if digest is None else digest)
    head = pre + body
    return head + bytes(max(0, do - len(head))) + payload


def set_preamble(raw: bytes, field: str, value: int) -> bytes:
    offsets = {"version": ("<I", 8), "flags": ("<I", 12), "header_len": ("<Q", 16), "data_offset": ("<Q", 24)}
    fmt, at = offsets[field]
    out = bytearray(raw)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def paths_in(obj: Any, prefix: tuple = (), limit_list: int = 3) -> Iterator[tuple]:
    """Every path to a value in a JSON document (dict keys, and the first few indices of each list)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_in(v, prefix + (k,), limit_list)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:limit_list]):
            yield from paths_in(v, prefix + (i,), limit_list)


def replace_at(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = replace_at(obj[path[0]], path[1:], value)
    return obj


# ---------------------------------------------------------------- the hand-made corpus


def corpus(base: bytes, signed: bytes | None = None) -> dict[str, bytes]:
    """Hand-made hostile variants of a valid unsigned artifact `base` and of `signed`, the same artifact
    signed (name -> file bytes)."""
    h = header_of(base)
    parts = split(base)
    first = min(h["tensors"], key=lambda t: t["offset"])
    second = sorted(h["tensors"], key=lambda t: t["offset"])[1]

    def lie(mutate: Callable[[dict], Any]) -> bytes:
        hh = json.loads(json.dumps(h))
        mutate(hh)
        return rebuild(base, hh)

    def tensor(which: str, **fields):
        def mutate(hh):
            for t in hh["tensors"]:
                if t["name"] == which:
                    t.update(fields)
        return mutate

    deep = b"[" * 100_000 + b"]" * 100_000
    c: dict[str, bytes] = {
        "empty": b"",
        "magic only": MAGIC,
        "preamble only": base[:64],
        "text mangled CRLF->LF": base.replace(b"\r\n", b"\n", 1),
        "zip file": b"PK\x03\x04" + bytes(60),
        "newer version": set_preamble(base, "version", 4),
        "version 3 in a preamble (3 is safetensors only)": set_preamble(base, "version", 3),
        "v1 file labelled version 2": set_preamble(base, "version", 2),
        "version 0": set_preamble(base, "version", 0),
        "version 2^32-1": set_preamble(base, "version", 0xFFFFFFFF),
        "unknown flag": set_preamble(base, "flags", 2),
        "signed flag without signature": set_preamble(base, "flags", 1),
        "header length 2^64-1": set_preamble(base, "header_len", (1 << 64) - 1),
        "header length 64 MiB": set_preamble(base, "header_len", 64 << 20),
        "header length 0": set_preamble(base, "header_len", 0),
        "header length past the file": set_preamble(base, "header_len", len(base)),
        "data offset 0": set_preamble(base, "data_offset", 0),
        "data offset 2^63": set_preamble(base, "data_offset", 1 << 63),
        "data offset unaligned": set_preamble(base, "data_offset", parts["data_offset"] + 1),
        "data offset one page late": set_preamble(base, "data_offset", parts["data_offset"] + ALIGN),
        "header digest zeroed": base[:32] + bytes(32) + base[64:],
        "deep JSON (100k levels)": raw_file(deep),
        "deep JSON in a field (900 levels)": lie(lambda hh: hh["model"].update(rope={"x": json.loads("[" * 900 + "]" * 900)})),
        "huge JSON string (8 MB)": lie(lambda hh: hh.update(created_by="x" * (8 << 20))),
        "huge token list (1M ids, wrong count)": lie(lambda hh: hh["document"].update(tokens=[7] * 1_000_000)),
        "200k keys": raw_file(canonical_json({f"k{i}": i for i in range(200_000)})),
        "JSON NaN": raw_file(b'{"a":NaN}'),
        "JSON 1e999 (inf)": rebuild(base, canonical_json(h).replace(b'"head_dim":', b'"x":1e999,"head_dim":', 1)),
        "JSON duplicate key": rebuild(base, canonical_json(h).replace(b'"head_dim":', b'"head_dim":1,"head_dim":', 1)),
        "JSON whitespace": rebuild(base, json.dumps(h, sort_keys=True).encode()),
        "JSON 1.0 for 1": rebuild(base, canonical_json(h).replace(b'"head_dim":', b'"x":1.0e0,"head_dim":', 1)),
        "JSON not UTF-8": raw_file(b'{"a":"\xff\xfe"}'),
        "JSON top-level list": raw_file(b"[]"),
        "JSON huge integer": raw_file(b'{"file_bytes":' + b"9" * 5000 + b"}"),
        "num_layers 2^20": lie(lambda hh: hh["model"].update(num_layers=1 << 20)),
        "num_kv_heads 2^20": lie(lambda hh: hh["model"].update(num_kv_heads=1 << 20)),
        "num_tokens 2^24": lie(lambda hh: hh["kv"].update(num_tokens=1 << 24)),
        "num_tokens 0": lie(lambda hh: hh["kv"].update(num_tokens=0)),
        "file_bytes 2^62": lie(lambda hh: hh.update(file_bytes=1 << 62)),
        "file_bytes negative": lie(lambda hh: hh.update(file_bytes=-1)),
        "tensor nbytes 2^62": lie(tensor(first["name"], nbytes=1 << 62)),
        "tensor shape 2^40 x 2^40": lie(tensor(first["name"], shape=[1 << 40, 1 << 40])),
        "tensor shape negative": lie(tensor(first["name"], shape=[1, -2, 3, 4])),
        "tensor shape 100 dims": lie(tensor(first["name"], shape=[1] * 100)),
        "tensor offset past the end": lie(tensor(first["name"], offset=1 << 50)),
        "tensor offset unaligned": lie(tensor(first["name"], offset=first["offset"] + 2)),
        "tensor offset into the header": lie(tensor(first["name"], offset=0)),
        "tensors overlapping": lie(tensor(second["name"], offset=first["offset"])),
        "tensor gap": lie(tensor(second["name"], offset=second["offset"] + ALIGN)),
        "tensor dtype int64": lie(tensor(first["name"], dtype="int64")),
        "tensor dtype object": lie(tensor(first["name"], dtype={"a": 1})),
        "tensor encoding pickle": lie(tensor(first["name"], encoding="pickle")),
        "tensor encoding list": lie(tensor(first["name"], encoding=["raw"])),
        "tensor name path": lie(tensor(first["name"], name="../../etc/passwd")),
        "tensor listed twice": lie(lambda hh: hh["tensors"].append(dict(hh["tensors"][0]))),
        "tensors empty": lie(lambda hh: hh.update(tensors=[])),
        "tensor digest wrong": lie(tensor(first["name"], digest="0" * 64)),
        "tensor digest uppercase": lie(tensor(first["name"], digest=first["digest"].upper())),
        "kv dtype float64": lie(lambda hh: hh["kv"].update(dtype="float64")),
        "kv layout BLHD": lie(lambda hh: hh["kv"].update(layout="BLHD")),
        "kv encoding list": lie(lambda hh: hh["kv"].update(encoding=["raw"])),
        "kv encoding unknown": lie(lambda hh: hh["kv"].update(encoding="gzip")),
        "token id negative": lie(lambda hh: hh["document"]["tokens"].__setitem__(0, -1)),
        "token id 2^31": lie(lambda hh: hh["document"]["tokens"].__setitem__(0, 1 << 31)),
        "token id past the vocabulary": lie(lambda hh: hh["document"]["tokens"].__setitem__(0, 5_000_000)),
        "token id a float": lie(lambda hh: hh["document"]["tokens"].__setitem__(0, 1.5)),
        "model id with newline": lie(lambda hh: hh["model"].update(id="builtin:tiny\nError: all good")),
        "model id with escape codes": lie(lambda hh: hh["model"].update(id="\x1b[2K\x1b[1Gtrusted")),
        "model id absolute path": lie(lambda hh: hh["model"].update(id="/etc")),
        "model fingerprint with newline": lie(lambda hh: hh["model"].update(fingerprint="blake3:\n")),
        "logits missing": lie(lambda hh: hh.update(tensors=[t for t in hh["tensors"] if t["name"] != "logits"])),
        "logits wrong length": lie(tensor("logits", shape=[3], nbytes=3 * DTYPE_SIZES[_tensor(h, "logits")["dtype"]])),
        "signature block garbage": _with_block(base, b"\x01" * 96),
        "signature by the zero key": _with_block(base, bytes(96)),
        "tensor padding not zero": _poke(base, first["offset"] + first["nbytes"]),
        "bytes appended": base + b"\0",
        "page appended": base + bytes(ALIGN),
        "last byte cut": base[:-1],
    }
    if signed is not None:
        hs = header_of(signed)
        hs["kv"]["chunk_size"] += 1
        c.update({
            "signed: header changed, old signature kept": rebuild(signed, hs, keep_block=True),
            "signed: signature bit flipped": _poke(signed, 64 + split(signed)["header_len"] + 40),
            "signed: public key bit flipped": _poke(signed, 64 + split(signed)["header_len"] + 3),
            "signed: signed flag cleared": set_preamble(signed, "flags", 0),
        })
    return c


def corpus_v2(base: bytes) -> dict[str, bytes]:
    """Hand-made hostile variants of a valid version-2 artifact with state checkpoints (a hybrid or a
    sliding-window model's): lies in the per-layer cache metadata, the checkpoints and the KV
    quantization settings, each in a re-digested header (name -> file bytes)."""
    h = header_of(base)
    fam = {c["family"] for c in h["caches"]}
    odd = next(i for i, c in enumerate(h["caches"]) if c["family"] in ("arrays", "rotating"))
    kv_layer = next(i for i, c in enumerate(h["caches"]) if c["family"] == "kv")

    def lie(mutate: Callable[[dict], Any]) -> bytes:
        hh = json.loads(json.dumps(h))
        mutate(hh)
        return rebuild(base, hh)

    def layer(i, **fields):
        return lambda hh: hh["caches"][i].update(fields)

    def cp(k, **fields):
        return lambda hh: hh["checkpoints"][k].update(fields)

    c = {
        "caches missing": lie(lambda hh: hh.pop("caches")),
        "caches one short": lie(lambda hh: hh["caches"].pop()),
        "caches not a list": lie(lambda hh: hh.update(caches={"0": 1})),
        "family unknown": lie(layer(odd, family="mamba2")),
        "family not a string": lie(layer(odd, family=7)),
        "family kv with no offset": lie(lambda hh: hh["caches"].__setitem__(kv_layer, {"family": "kv"})),
        "extra metadata key": lie(layer(kv_layer, python="__import__('os')")),
        "offset negative": lie(layer(kv_layer, offset=-1)),
        "offset not the document length": lie(layer(kv_layer, offset=h["kv"]["num_tokens"] - 1)),
        "offset a bool": lie(layer(kv_layer, offset=True)),
        "nested cache list": lie(lambda hh: hh["caches"].__setitem__(kv_layer, {"family": "list", "caches": [
            {"family": "list", "caches": [hh["caches"][kv_layer]]}]})),
        "empty cache list": lie(lambda hh: hh["caches"].__setitem__(kv_layer, {"family": "list", "caches": []})),
        "kv layer's keys uint32": lie(lambda hh: [t.update(dtype="uint32") for t in hh["tensors"]
                                                  if t["name"] == f"layers.{kv_layer}.keys"]),
        "kv layer's keys encoded": lie(lambda hh: [t.update(encoding="bytesplit-zstd") for t in hh["tensors"]
                                                   if t["name"] == f"layers.{kv_layer}.keys"]),
        "kv.encoding zstd on version 2": lie(lambda hh: hh["kv"].update(encoding="bytesplit-zstd")),
        "kv.quantization 7 bits": lie(lambda hh: hh["kv"].update(quantization={"bits": 7, "group_size": 64, "start": 0})),
        "kv.quantization extra key": lie(lambda hh: hh["kv"].update(quantization={"bits": 8, "group_size": 64, "start": 0, "x": 1})),
        "kv.quantization a string": lie(lambda hh: hh["kv"].update(quantization="q8")),
        "checkpoint_every not a chunk multiple": lie(lambda hh: hh["kv"].update(checkpoint_every=hh["kv"]["chunk_size"] + 1)),
        "checkpoint off a chunk boundary": lie(cp(0, tokens=h["checkpoints"][0]["tokens"] + 1)),
        "checkpoint at 0": lie(cp(0, tokens=0)),
        "checkpoint at the document's end": lie(cp(-1, tokens=h["kv"]["num_tokens"])),
        "checkpoints out of order": lie(lambda hh: hh["checkpoints"].reverse()),
        "checkpoint missing a layer": lie(lambda hh: hh["checkpoints"][0]["caches"].pop(str(odd))),
        "checkpoint with an extra layer": lie(lambda hh: hh["checkpoints"][0]["caches"].update(
            {str(kv_layer): hh["caches"][kv_layer]})),
        "checkpoint layer of another family": lie(lambda hh: hh["checkpoints"][0]["caches"].update(
            {str(odd): {"family": "kv", "offset": hh["checkpoints"][0]["tokens"]}})),
        "checkpoint tensor missing": lie(lambda hh: hh.update(tensors=[t for t in hh["tensors"]
                                                                       if not t["name"].startswith("checkpoints.0.")])),
        "checkpoints 70k": lie(lambda hh: hh.update(checkpoints=[hh["checkpoints"][0]] * 70_000)),
        "tensor not named by any layer": lie(lambda hh: [t.update(name="layers.99.keys") for t in hh["tensors"]
                                                         if t["name"] == f"layers.{kv_layer}.keys"]),
        "v2 artifact labelled version 1": set_preamble(base, "version", 1),
    }
    if "rotating" in fam:
        c.update({
            "window smaller than the model's": lie(lambda hh: [m.update(max_size=16) for m in hh["caches"] if m["family"] == "rotating"]
                                                   and [m.update(max_size=16) for p in hh["checkpoints"] for m in p["caches"].values()]),
            "rotation index past the buffer": lie(layer(odd, idx=h["caches"][odd]["idx"] + 10_000)),
            "keep not below the window": lie(layer(odd, keep=h["caches"][odd]["max_size"])),
        })
    if "arrays" in fam:
        c.update({
            "state slots 65": lie(layer(odd, size=65, present=[True] * 65)),
            "state slot flags not bools": lie(layer(odd, present=[1, 1])),
            "state tensor of batch 2": lie(lambda hh: [t.update(shape=[2, *t["shape"][1:]], nbytes=t["nbytes"] * 2)
                                                       for t in hh["tensors"] if t["name"] == f"layers.{odd}.state.1"]),
        })
    return c


def corpus_v3(base: bytes, signed: bytes | None = None) -> dict[str, bytes]:
    """Hand-made hostile variants of a valid version-3 artifact `base` (a safetensors file) and of
    `signed`, the same artifact signed (name -> file bytes): a table that says something other than
    the header (what `mx.load` would follow), lying metadata and length fields, plain safetensors
    files, non-canonical headers, truncations, tampered tensors and signatures. test_format_v3.py
    says where and how each is refused."""
    p = split_v3(base)
    h = header_of(base)
    payload = base[p["data_offset"]:]
    names = [k for k in p["listed"] if k != "__metadata__"]
    raw_name = next(t["name"] for t in h["tensors"] if t["encoding"] == "raw" and len(t["shape"]) > 1)
    first = min(h["tensors"], key=lambda t: t["offset"])

    def retable(mutate: Callable[[dict], Any], *, reverse: bool = False, separators=(",", ":"), pad: bytes = b" ",
                data_offset: int | None = None) -> bytes:
        """The table's contents changed by `mutate` (or its keys in reverse order), re-encoded and padded."""
        listed = json.loads(json.dumps(p["listed"]))
        mutate(listed)
        if reverse:
            listed = dict(reversed(listed.items()))
        text = json.dumps(listed, sort_keys=not reverse, separators=separators, ensure_ascii=True).encode()
        do = data_offset or max(p["data_offset"], align(8 + len(text)))
        return v3_raw(text, payload, data_offset=do, pad=pad)

    def entry(name: str, **fields):
        return lambda listed: listed[name].update(fields)

    def meta(**fields):
        def mutate(listed):
            for k, v in fields.items():
                if v is None:
                    listed["__metadata__"].pop(k, None)
                else:
                    listed["__metadata__"][k] = v
        return mutate

    def lie(mutate: Callable[[dict], Any]) -> bytes:
        hh = json.loads(json.dumps(h))
        mutate(hh)
        return rebuild_v3(base, hh)

    e = p["listed"][raw_name]
    begin, end = e["data_offsets"]
    other_dtype = "F16" if e["dtype"] != "F16" else "BF16"
    body = p["body"]
    edited = body.replace(b'"chunk_size":', b'"chunk_size":1', 1)
    c: dict[str, bytes] = {
        # the table lists the tensors differently from the (intact) header
        "table: data_offsets moved": retable(entry(raw_name, data_offsets=[begin + ALIGN, end + ALIGN])),
        "table: data_offsets shortened": retable(entry(raw_name, data_offsets=[begin, end - 2])),
        "table: dtype changed": retable(entry(raw_name, dtype=other_dtype)),
        "table: shape changed, same bytes": retable(entry(raw_name, shape=list(reversed(e["shape"])))),
        "table: extra entry": retable(lambda listed: listed.update(extra={"data_offsets": [0, 0], "dtype": "U8", "shape": [0]})),
        "table: entry removed": retable(lambda listed: listed.pop(names[-1])),
        "table: entry renamed": retable(lambda listed: listed.update(renamed=listed.pop(raw_name))),
        "table: keys reordered": retable(lambda listed: None, reverse=True),
        "table: whitespace inside": retable(lambda listed: None, separators=(", ", ": ")),
        "table: padding past the first boundary": retable(lambda listed: None, data_offset=p["data_offset"] + ALIGN),
        "table: a page of padding, header moved with it": rebuild_v3(base, h, data_offset=p["data_offset"] + ALIGN),
        "table: newline padding": retable(lambda listed: None, pad=b"\n"),
        "table: NUL padding": retable(lambda listed: None, pad=b"\0"),
        "table: one NUL at the end of the padding": base[: p["data_offset"] - 1] + b"\0" + payload,
        "table: one tab in the padding": base[: 8 + len(p["text"]) + 5] + b"\t" + base[8 + len(p["text"]) + 6 :],
        "table: non-ASCII byte in the padding": base[: p["data_offset"] - 1] + b"\xff" + payload,
        "table: a JSON list": v3_raw(b"[]", payload, data_offset=p["data_offset"]),
        "table: NaN": v3_raw(b'{"__metadata__":{"format":"kvmlx"},"a":NaN}', payload, data_offset=p["data_offset"]),
        "table: deep JSON (100k levels)": v3_raw(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
        "table: '{}'": envelope.LENGTH.pack(2) + b"{}",
        # lying metadata
        "metadata: header_blake3 wrong": retable(meta(header_blake3="0" * 64)),
        "metadata: header_blake3 missing": retable(meta(header_blake3=None)),
        "metadata: header_blake3 uppercase": retable(meta(header_blake3=p["meta"]["header_blake3"].upper())),
        "metadata: header_blake3 short": retable(meta(header_blake3=p["meta"]["header_blake3"][:-2])),
        "metadata: header edited, not re-digested": retable(meta(header=edited.decode())),
        "metadata: header missing": retable(meta(header=None)),
        "metadata: header an object": retable(meta(header=h)),
        "metadata: version 4": retable(meta(version="4")),
        "metadata: version 2": retable(meta(version="2")),
        "metadata: version 1": retable(meta(version="1")),
        "metadata: version 03": retable(meta(version="03")),
        "metadata: version 3 as a number": retable(meta(version=3)),
        "metadata: version missing": retable(meta(version=None)),
        "metadata: version 99999999999": retable(meta(version="9" * 11)),
        "metadata: unknown key": retable(meta(python="__import__('os')")),
        "metadata: non-string value": retable(meta(header_blake3=[p["meta"]["header_blake3"]])),
        "metadata: format gguf": retable(meta(format="gguf")),
        "metadata: format missing": retable(meta(format=None)),
        "metadata: signature not hex": retable(meta(signature="zz" * 96)),
        "metadata: signature short": retable(meta(signature="00" * 95)),
        "metadata: signature by the zero key": retable(meta(signature="00" * 96)),
        "metadata: a signature added to an unsigned file": retable(meta(signature="11" * 96)),
        "metadata missing": retable(lambda listed: listed.pop("__metadata__")),
        "metadata a string": retable(lambda listed: listed.update(__metadata__="kvmlx")),
        # a plain safetensors file (the same tensors, no kvmlx metadata)
        "plain safetensors": _plain_safetensors(p["listed"], payload),
        "plain safetensors with other metadata": retable(lambda listed: listed.update(__metadata__={"format": "pt"})),
        # the length field
        "length 0": envelope.LENGTH.pack(0) + base[8:],
        "length 1": envelope.LENGTH.pack(1) + base[8:],
        "length 2^64-1": envelope.LENGTH.pack((1 << 64) - 1) + base[8:],
        "length 2^40": envelope.LENGTH.pack(1 << 40) + base[8:],
        "length past the end of the file": envelope.LENGTH.pack(len(base)) + base[8:],
        "length one short (unaligned)": envelope.LENGTH.pack(p["table_len"] - 1) + base[8:],
        "length one long (unaligned)": envelope.LENGTH.pack(p["table_len"] + 1) + base[8:],
        "length half a page short": envelope.LENGTH.pack(p["table_len"] - ALIGN // 2) + base[8:],
        "length one page long": envelope.LENGTH.pack(p["table_len"] + ALIGN) + base[8:],
        "length the text only": envelope.LENGTH.pack(len(p["text"])) + base[8:],
        # a re-digested header (and a table made from it) that lies
        "header not canonical (whitespace)": rebuild_v3(base, json.dumps(h, sort_keys=True).encode()),
        "header with a duplicate key": rebuild_v3(base, body.replace(b'"head_dim":', b'"head_dim":1,"head_dim":', 1)),
        "header 1.0 for 1": rebuild_v3(base, body.replace(b'"head_dim":', b'"x":1.0e0,"head_dim":', 1)),
        "header version 2": lie(lambda hh: hh.update(version=2)),
        "header version 1": lie(lambda hh: hh.update(version=1)),
        "header version 4": lie(lambda hh: hh.update(version=4)),
        "header file_bytes one page more": lie(lambda hh: hh.update(file_bytes=hh["file_bytes"] + ALIGN)),
        "header tensor offset a page late": lie(lambda hh: [t.update(offset=t["offset"] + ALIGN)
                                                            for t in hh["tensors"] if t["name"] == first["name"]]),
        "header tensor dtype float32": lie(lambda hh: [t.update(dtype="float32") for t in hh["tensors"] if t["name"] == raw_name]),
        # truncated, extended, tampered
        "empty": b"",
        "7 bytes": base[:7],
        "length only": base[:8],
        "cut in the table": base[: 8 + len(p["text"]) // 2],
        "cut after the table text": base[: 8 + len(p["text"])],
        "cut at the data offset": base[: p["data_offset"]],
        "cut in the first tensor": base[: first["offset"] + max(1, first["nbytes"] // 2)],
        "last byte cut": base[:-1],
        "page appended": base + bytes(ALIGN),
        "byte appended": base + b"\0",
        "tensor bit flipped": _poke(base, first["offset"] + first["nbytes"] // 2),
        "tensor padding not zero": _poke(base, first["offset"] + first["nbytes"]),
    }
    if signed is not None:
        ps = split_v3(signed)
        hs = header_of(signed)
        hs["kv"]["chunk_size"] += 1
        sig_hex = ps["meta"]["signature"]

        def resig(at: int) -> bytes:  # one hex digit of the signature field changed (still valid hex)
            hexed = sig_hex[:at] + ("1" if sig_hex[at] == "0" else "0") + sig_hex[at + 1 :]
            return signed.replace(sig_hex.encode(), hexed.encode(), 1)

        c.update({
            "signed: signature altered": resig(64 + 40),
            "signed: public key altered": resig(3),
            "signed: header changed, old signature kept": rebuild_v3(signed, hs, keep_signature=True),
        })
    return c


def _plain_safetensors(listed: dict, payload: bytes) -> bytes:
    """The same tensors as a plain safetensors file, as most writers make it: no metadata, the table
    padded to 8 bytes (a valid file for any safetensors reader, `mx.load` among them)."""
    text = json.dumps({k: v for k, v in listed.items() if k != "__metadata__"}, separators=(",", ":")).encode()
    return v3_raw(text, payload, data_offset=8 + -(-len(text) // 8) * 8)


def _tensor(h: dict, name: str) -> dict:
    return next(t for t in h["tensors"] if t["name"] == name)


def _with_block(base: bytes, block: bytes) -> bytes:
    parts = split(base)
    out = bytearray(set_preamble(base, "flags", FLAG_SIGNED))
    out[64 + parts["header_len"] : 64 + parts["header_len"] + SIGNATURE_BLOCK.size] = block
    return bytes(out)


def _poke(raw: bytes, at: int) -> bytes:
    out = bytearray(raw)
    out[at] ^= 0x5A
    return bytes(out)


# ---------------------------------------------------------------- the loader's stages


def _typed(stage: str, e: BaseException) -> str:
    """The outcome for an error; anything untyped or multi-line is re-raised as a failure."""
    if not isinstance(e, KvmlxError):
        raise AssertionError(f"{stage}: untyped {type(e).__name__}: {e}") from e
    msg = str(e)
    if not msg or "\n" in msg or not msg.isprintable():
        raise AssertionError(f"{stage}: {type(e).__name__} message is not one printable line: {msg!r}")
    return f"{stage}:{type(e).__name__}"


def attempt(path: Path, lm=None, *, deep: bool = False) -> str:
    """Do with `path` what a loader may do; return "accepted" or "<stage>:<ErrorClass>".

    Stages: `read_header`; open and verify every tensor (`tensor_bytes(verify=True)`); with `lm`,
    `load_artifact` (signature, binding, digests, copies). With `deep` also what an agent or a
    checker does next with a loaded artifact: continue it, `--verify` against prefill of its tokens,
    and a spot check. Returns at the first refusal.
    """
    try:
        read_header(path)
    except BaseException as e:  # noqa: BLE001 - classified (or re-raised) by _typed
        return _typed("read", e)
    try:
        with Artifact(path) as art:
            for name in art.tensors:
                art.tensor_bytes(name, verify=True).release()
    except BaseException as e:  # noqa: BLE001
        return _typed("verify", e)
    if lm is None:
        return "accepted"
    from kvmlx.runtime.load import load_artifact

    try:
        loaded = load_artifact(path, lm)
    except BaseException as e:  # noqa: BLE001
        return _typed("load", e)
    if not deep:
        return "accepted"
    from kvmlx.runtime.generate import continue_from, verify
    from kvmlx.measure.spotcheck import spot_check

    try:
        continue_from(lm, loaded, [1, 2], max_tokens=2)
        verify(path, lm, "", max_tokens=2)
        spot_check(path, lm, recompute=4, probe=2, seed=0)
    except BaseException as e:  # noqa: BLE001
        return _typed("use", e)
    return "accepted"


# ---------------------------------------------------------------- the subprocess worker


def worker(manifest: str) -> None:
    """Run `attempt(..., deep=True)` on every file listed in `manifest` (JSON: {"files": [...], "start": i}).

    Prints `start I`, then `end I OUTCOME GROWTH_BYTES` per file (flushed), so the parent knows which
    file a crash happened on and how much each file grew the peak memory.
    """
    from kvmlx.models import load_model

    spec = json.loads(Path(manifest).read_text())
    lm = load_model("builtin:tiny", "bfloat16")
    for _ in range(3):  # warm up: the first loads allocate MLX's buffer cache
        attempt(Path(spec["warmup"]), lm, deep=True)
    for i in range(spec.get("start", 0), len(spec["files"])):
        path = Path(spec["files"][i])
        print(f"start {i}", flush=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:
            outcome = attempt(path, lm, deep=True)
        except AssertionError as e:
            outcome = "UNTYPED " + " ".join(str(e).split())[:300]
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(f"end {i} {growth} {outcome}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2])
