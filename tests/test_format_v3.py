"""Format version 3: a safetensors file whose `__metadata__` carries the kvmlx header (artifact/envelope.py).

Round trip (any safetensors reader, `mx.load` among them, reads exactly the header's tensors, each
16 KiB-aligned), versions 1 and 2 still read and load to the same KV, the loader's `native` path,
and hostile version-3 files: a table that lists the tensors otherwise than the header (what `mx.load`
would follow), lying metadata and length fields, plain safetensors files, non-canonical headers,
truncations, tampered tensors and signatures, and every single bit flip in the table. Each is
refused with a typed one-line kvmlx error by `Artifact(path)` before `mx.load` reads anything, or
(tampered tensors, signatures) by a verifying load or `check_signature`. Model-free except the
loader tests (the tiny model, 12 tokens).
"""

from __future__ import annotations

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from fuzz_corpus import boundaries, corpus_v3, header_of, rebuild_v3, split_v3, v3_raw

from kvmlx.artifact import envelope
from kvmlx.artifact import format as fmt
from kvmlx.artifact.encodings import encode
from kvmlx.artifact.format import (
    ALIGN,
    MAGIC,
    Artifact,
    TensorData,
    canonical_json,
    read_header,
    write_artifact,
)
from kvmlx.artifact.trust import check_signature, generate_key, public_key_id, signer
from kvmlx.errors import (
    ArtifactError,
    BadSignatureError,
    IntegrityError,
    KvmlxError,
    UnsupportedVersionError,
)

LAYERS, HEADS, TOKENS, HEAD_DIM, VOCAB = 2, 2, 5, 8, 16
MX = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32, "uint32": mx.uint32}


def _header(tokens: int = TOKENS, layers: int = LAYERS, encoding: str = "raw") -> dict:
    kv = {"dtype": "bfloat16", "layout": "BHLD", "num_tokens": tokens, "chunk_size": 4}
    if encoding != "raw":
        kv.update(encoding=encoding, lossless=True)
    return {
        "model": {"id": "test", "fingerprint": "blake3:00", "model_type": "qwen3", "num_layers": layers,
                  "num_kv_heads": HEADS, "head_dim": HEAD_DIM, "rope": {"rope_theta": 10000.0}},
        "tokenizer": {"fingerprint": "blake3:11"},
        "kv": kv,
        "document": {"tokens": list(range(tokens)), "text_blake3": None},
    }


def synthetic(path, *, version: int = fmt.VERSION, sign=None, encoding: str = "raw", layers: int = LAYERS,
              tokens: int = TOKENS, seed: int = 0) -> dict[str, bytes]:
    """A model-free artifact (bfloat16 KV, float32 logits); returns each tensor's stored bytes by name."""
    rng = np.random.default_rng(seed)
    tensors, stored = [], {}
    for i in range(layers):
        for kind in ("keys", "values"):
            x = mx.array(rng.standard_normal((1, HEADS, tokens, HEAD_DIM)).astype(np.float32)).astype(mx.bfloat16)
            mx.eval(x)
            if encoding == "raw":
                blob, params = bytes(np.array(x.view(mx.uint16)).tobytes()), {}
            else:
                blob, params = encode(x, encoding)
            name = f"layers.{i}.{kind}"
            tensors.append(TensorData(name, "bfloat16", tuple(x.shape), memoryview(blob), encoding, params))
            stored[name] = bytes(blob)
    logits = rng.standard_normal(VOCAB).astype(np.float32)
    tensors.append(TensorData("logits", "float32", logits.shape, memoryview(logits).cast("B")))
    stored["logits"] = logits.tobytes()
    write_artifact(path, _header(tokens, layers, encoding), tensors, sign=sign, version=version)
    return stored


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture(scope="module")
def bases(tmp_path_factory, key):
    """(unsigned, signed) bytes of the same small version-3 artifact."""
    d = tmp_path_factory.mktemp("v3")
    synthetic(d / "base.kvmlx")
    synthetic(d / "signed.kvmlx", sign=signer(key))
    return (d / "base.kvmlx").read_bytes(), (d / "signed.kvmlx").read_bytes()


@pytest.fixture
def no_mx_load(monkeypatch):
    """Fails the test if anything calls `mx.load` (a refused file must never reach it)."""
    monkeypatch.setattr(mx, "load", lambda *a, **k: pytest.fail(f"mx.load called on {a}"))


def _one_line(e: BaseException) -> None:
    msg = str(e)
    assert isinstance(e, KvmlxError) and msg and "\n" not in msg and msg.isprintable(), repr(e)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("encoding", ["raw", "bytesplit-zstd"])
def test_a_version_3_file_is_a_safetensors_file_mx_load_reads(tmp_path, encoding):
    path = tmp_path / "a.kvmlx"
    stored = synthetic(path, encoding=encoding)
    raw = path.read_bytes()
    assert raw[:8] != MAGIC
    with Artifact(path) as art:
        assert art.version == 3 and art.header["version"] == 3 and "caches" not in art.header
        assert art.size == len(raw) == art.header["file_bytes"] and art.size % ALIGN == 0
        (n,) = envelope.LENGTH.unpack_from(raw, 0)
        assert art.data_offset == 8 + n and art.data_offset % ALIGN == 0
        assert art.signature is None
        body, digest, data_offset = canonical_json(art.header), art.header_digest, art.data_offset
        entries = dict(art.tensors)
        for name, blob in stored.items():
            assert entries[name].offset % ALIGN == 0 and bytes(art.tensor_bytes(name)) == blob
        art.verify_all()
    # the table: canonical JSON, space-padded up to the data offset, exactly what envelope.table makes
    table = raw[8:data_offset]
    text = table.rstrip(b" ")
    assert table == text + b" " * (len(table) - len(text)) and envelope.LENGTH.size + len(text) > data_offset - ALIGN
    listed = json.loads(text)
    assert text == json.dumps(listed, sort_keys=True, separators=(",", ":")).encode()
    assert listed["__metadata__"] == {"format": "kvmlx", "version": "3", "header": body.decode(), "header_blake3": digest.hex()}
    assert set(listed) == {"__metadata__", *stored}
    for name, e in entries.items():
        assert listed[name]["data_offsets"] == [e.offset - data_offset, e.offset - data_offset + e.nbytes]
    # any safetensors reader: mx.load gives every tensor with the header's dtype and shape (encoded ones as
    # their stored bytes), bit for bit, and the same metadata
    arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    assert metadata == listed["__metadata__"] and set(arrays) == set(stored)
    for name, e in entries.items():
        a = arrays[name]
        if e.encoding == "raw":
            assert a.dtype == MX[e.dtype] and tuple(a.shape) == e.shape, name
        else:
            assert a.dtype == mx.uint8 and tuple(a.shape) == (e.nbytes,), name
        assert bytes(np.array(a.view(mx.uint8)).tobytes()) == stored[name], name


def test_a_signed_version_3_file_carries_key_and_signature_in_its_metadata(tmp_path, key):
    path = tmp_path / "s.kvmlx"
    synthetic(path, sign=signer(key))
    meta = split_v3(path.read_bytes())["meta"]
    with Artifact(path) as art:
        public, signature = art.signature
        assert meta["signature"] == (public + signature).hex() and len(meta["signature"]) == 192
        assert meta["header_blake3"] == art.header_digest.hex()
    status = check_signature(path)
    assert status.signed and status.public_key == public_key_id(key)
    # the signature's fixed-length hex was counted when the layout was fixed: same data offset unsigned
    synthetic(tmp_path / "u.kvmlx")
    with Artifact(path) as a, Artifact(tmp_path / "u.kvmlx") as b:
        assert a.data_offset == b.data_offset and a.header == b.header


def test_legacy_versions_are_still_written_on_request_and_read(tmp_path):
    stored = synthetic(tmp_path / "v1.kvmlx", version=1)
    synthetic(tmp_path / "v3.kvmlx")
    for asked in (1, 2):  # 1 or 2: the legacy container, version 2 only when the header has caches
        synthetic(tmp_path / f"asked{asked}.kvmlx", version=asked)
        assert (tmp_path / f"asked{asked}.kvmlx").read_bytes() == (tmp_path / "v1.kvmlx").read_bytes()
    raw = (tmp_path / "v1.kvmlx").read_bytes()
    assert raw[:8] == MAGIC
    with Artifact(tmp_path / "v1.kvmlx") as old, Artifact(tmp_path / "v3.kvmlx") as new:
        assert old.version == 1 and old.header["version"] == 1 and new.version == 3
        assert old.native_source() is None
        assert {k: v for k, v in old.header.items() if k != "version"} == {k: v for k, v in new.header.items() if k != "version"}
        for name, blob in stored.items():
            assert bytes(old.tensor_bytes(name)) == bytes(new.tensor_bytes(name)) == blob
    with pytest.raises(ArtifactError, match="cannot write format version 4"):
        synthetic(tmp_path / "v4.kvmlx", version=4)
    assert not (tmp_path / "v4.kvmlx").exists()


# ---------------------------------------------------------------- loading: native, copy, legacy


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny):
    """The same 12 tokens published as plain KV (versions 1 and 3) and with --kv-bits 8 (2 and 3)."""
    from kvmlx.caches import KVQuantization
    from kvmlx.runtime.publish import publish

    d = tmp_path_factory.mktemp("v3-load")
    tokens = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over.")[:12]
    out = {}
    for name, version, quant in (("v1", 1, None), ("v3", 3, None), ("q-v2", 2, KVQuantization(8, 32, 0)),
                                 ("q-v3", 3, KVQuantization(8, 32, 0))):
        out[name] = publish(tiny, tokens, d / f"{name}.kvmlx", chunk_size=8, kv_quant=quant, format_version=version).path
    return out


def _kv(loaded) -> list[np.ndarray]:
    """Every cache's keys and values (quantized: their packed words, scales and biases) up to its
    offset, as bytes-exact numpy arrays."""
    from mlx.utils import tree_flatten

    out = []
    for c in loaded.caches:
        for _, a in tree_flatten([c.keys, c.values]):
            a = a[..., : c.offset, :]
            out.append(np.array(a.view(mx.uint8) if a.dtype != mx.uint32 else a))
    return out


def _same(a, b) -> None:
    x, y = _kv(a), _kv(b)
    assert len(x) == len(y) and all(u.shape == v.shape and np.array_equal(u, v) for u, v in zip(x, y))
    assert np.array_equal(np.array(a.logits.astype(mx.float32)), np.array(b.logits.astype(mx.float32)))
    assert a.tokens == b.tokens


@pytest.fixture
def settled(monkeypatch):
    """Files written by the test itself can be recorded as verified (a re-load then has nothing to hash)."""
    from kvmlx.artifact import verified

    monkeypatch.setattr(verified, "SETTLED_SECONDS", -1.0)
    fmt.forget_verified()
    yield
    fmt.forget_verified()


def test_version_3_loads_natively_to_the_same_kv_as_version_1(published, tiny, monkeypatch):
    from kvmlx.artifact import verified
    from kvmlx.runtime.generate import continue_from
    from kvmlx.runtime.load import load_artifact, zero_copy_available

    from kvmlx.runtime import buffers
    from kvmlx.runtime import load as load_mod

    few = load_artifact(published["v3"], tiny, verify_digests=False)  # builtin:tiny: 8 tensors of < 1 MB
    assert few.load_path == ("zero-copy" if zero_copy_available() else "copy")  # reads beat mx.load's fixed cost
    monkeypatch.setattr(load_mod, "FEW_TENSORS", 0)  # as for a real model's 48+ tensors,
    monkeypatch.setattr(buffers, "HOST_BUILT", 0)  # whose destinations need an mx.eval
    auto = "zero-copy" if zero_copy_available() else "native"  # what "auto" picks for v3 with nothing to hash
    with Artifact(published["v1"]) as old, Artifact(published["v3"]) as new:
        assert (old.version, old.header["version"], new.version, new.header["version"]) == (1, 1, 3, 3)
        assert "caches" not in old.header and "caches" not in new.header
        assert old.native_source() is None and new.native_source() is not None
    legacy = load_artifact(published["v1"], tiny)
    assert legacy.load_path == "copy"
    asked = load_artifact(published["v3"], tiny, load_path="native")  # mx.load; digests hashed from the loaded arrays
    assert asked.load_path == "native" and asked.digests != "skipped"
    _same(legacy, asked)
    n = asked.header["kv"]["num_tokens"]
    assert all(c.keys.shape[2] == n for c in asked.caches)  # mlx-lm's load_prompt_cache shape: no spare slots
    unhashed = load_artifact(published["v3"], tiny, verify_digests=False)
    assert unhashed.load_path == auto and unhashed.digests == "skipped"
    _same(legacy, unhashed)
    with_room = load_artifact(published["v3"], tiny, headroom=8)  # spare slots asked for: the copy path
    assert with_room.load_path == "copy" and all(c.keys.shape[2] >= n + 8 for c in with_room.caches)
    _same(legacy, with_room)
    monkeypatch.setattr(verified, "SETTLED_SECONDS", -1.0)  # files written just now may be remembered as verified
    fmt.forget_verified()
    try:
        real_cached = Artifact.cached
        monkeypatch.setattr(Artifact, "cached", lambda self, samples=16: False)  # as if read from a disk
        from_disk = load_artifact(published["v3"], tiny)  # hashes each tensor as it reads it
        assert from_disk.load_path == ("zero-copy" if auto == "zero-copy" else "copy") and from_disk.digests == "hashed"
        _same(legacy, from_disk)
        fmt.forget_verified()
        monkeypatch.setattr(Artifact, "cached", lambda self, samples=16: True)  # in the page cache
        first = load_artifact(published["v3"], tiny)  # mx.load, then every digest hashed in memory (remembered)
        assert first.load_path == auto and first.digests == "hashed"
        _same(legacy, first)
        monkeypatch.setattr(Artifact, "cached", real_cached)
        again = load_artifact(published["v3"], tiny)  # nothing left to hash
        assert again.load_path == auto and again.digests == "remembered"
        _same(legacy, again)
    finally:
        fmt.forget_verified()
    tokens = [continue_from(tiny, loaded, [5, 6], max_tokens=4, stop_at_eos=False).tokens
              for loaded in (legacy, asked, with_room, again)]
    assert tokens[0] == tokens[1] == tokens[2] == tokens[3]


def test_cache_families_load_alike_from_version_2_and_3(published, tiny):
    from kvmlx.runtime.load import load_artifact

    with Artifact(published["q-v2"]) as old, Artifact(published["q-v3"]) as new:
        assert (old.version, new.version, new.header["version"]) == (2, 3, 3)
        assert old.header["caches"] == new.header["caches"] and old.header["kv"]["quantization"]
        for name in new.tensors:
            assert bytes(old.tensor_bytes(name)) == bytes(new.tensor_bytes(name)), name
    arrays = mx.load(str(published["q-v3"]), format="safetensors")
    assert any(a.dtype == mx.uint32 for a in arrays.values())  # the packed words, as U32
    _same(load_artifact(published["q-v2"], tiny), load_artifact(published["q-v3"], tiny))


def test_a_tensor_bit_flip_is_caught_by_a_verifying_native_load(tmp_path):
    from kvmlx.runtime.load import read_caches, zero_copy_available

    path = tmp_path / "a.kvmlx"
    synthetic(path)
    with Artifact(path) as art:
        t = art.tensors["layers.1.values"]
    raw = bytearray(path.read_bytes())
    raw[t.offset + 5] ^= 0x04
    path.write_bytes(bytes(raw))
    with Artifact(path) as art:  # the header and table are intact: it opens
        assert art.native_source() is not None
        with pytest.raises(IntegrityError, match="layers.1.values does not match its digest") as e:
            read_caches(art, verify_digests=True, load_path="zero-copy" if zero_copy_available() else "native")
        _one_line(e.value)


# ---------------------------------------------------------------- hostile version-3 files

# where each corpus_v3 case is refused: "open" (Artifact(path)), "signature" (check_signature), "verify"
# (a verifying read of its tensors), and the error class and message
T = (ArtifactError, "the safetensors table does not match the kvmlx header")
JSON = (ArtifactError, "safetensors table is not valid JSON")
NOT_KVMLX = (ArtifactError, "not a kvmlx artifact")
EXPECTED = {
    "table: data_offsets moved": ("open", *T),
    "table: data_offsets shortened": ("open", *T),
    "table: dtype changed": ("open", *T),
    "table: shape changed, same bytes": ("open", *T),
    "table: extra entry": ("open", *T),
    "table: entry removed": ("open", *T),
    "table: entry renamed": ("open", *T),
    "table: keys reordered": ("open", *T),
    "table: whitespace inside": ("open", *T),
    "table: padding past the first boundary": ("open", ArtifactError, "truncated or padded"),
    "table: a page of padding, header moved with it": ("open", ArtifactError, "is not the first 16384-byte boundary after the table"),
    "table: newline padding": ("open", *T),
    "table: NUL padding": ("open", *JSON),
    "table: one NUL at the end of the padding": ("open", *JSON),
    "table: one tab in the padding": ("open", *T),
    "table: non-ASCII byte in the padding": ("open", *JSON),
    "table: a JSON list": ("open", *NOT_KVMLX),
    "table: NaN": ("open", *JSON),
    "table: deep JSON (100k levels)": ("open", *JSON),
    "table: '{}'": ("open", ArtifactError, "without kvmlx metadata"),
    "metadata: header_blake3 wrong": ("open", IntegrityError, "header does not match its digest"),
    "metadata: header_blake3 missing": ("open", ArtifactError, "malformed header digest"),
    "metadata: header_blake3 uppercase": ("open", ArtifactError, "malformed header digest"),
    "metadata: header_blake3 short": ("open", ArtifactError, "malformed header digest"),
    "metadata: header edited, not re-digested": ("open", IntegrityError, "header does not match its digest"),
    "metadata: header missing": ("open", IntegrityError, "header does not match its digest"),
    "metadata: header an object": ("open", ArtifactError, "unexpected fields in the safetensors metadata"),
    "metadata: header not ASCII": ("open", ArtifactError, "header in the safetensors metadata is not ASCII"),
    "metadata: version 4": ("open", UnsupportedVersionError, r"format version 4 is newer than this kvmlx reads \(3\)"),
    "metadata: version 2": ("open", ArtifactError, "invalid format version '2' in the safetensors metadata"),
    "metadata: version 1": ("open", ArtifactError, "invalid format version '1'"),
    "metadata: version 03": ("open", ArtifactError, "invalid format version '03'"),
    "metadata: version 3 as a number": ("open", ArtifactError, "invalid format version"),
    "metadata: version missing": ("open", ArtifactError, "invalid format version 'None'"),
    "metadata: version 99999999999": ("open", ArtifactError, "invalid format version"),
    "metadata: version superscript 3": ("open", ArtifactError, "invalid format version"),
    "metadata: version fullwidth 4": ("open", ArtifactError, "invalid format version"),
    "metadata: unknown key": ("open", ArtifactError, "unexpected fields in the safetensors metadata"),
    "metadata: non-string value": ("open", ArtifactError, "unexpected fields in the safetensors metadata"),
    "metadata: format gguf": ("open", *NOT_KVMLX),
    "metadata: format missing": ("open", *NOT_KVMLX),
    "metadata: signature not hex": ("open", ArtifactError, "malformed signature"),
    "metadata: signature short": ("open", ArtifactError, "malformed signature"),
    "metadata: signature by the zero key": ("signature", BadSignatureError, "holds no key"),
    "metadata: a signature added to an unsigned file": ("signature", BadSignatureError, "does not verify"),
    "metadata missing": ("open", *NOT_KVMLX),
    "metadata a string": ("open", *NOT_KVMLX),
    "plain safetensors": ("open", *NOT_KVMLX),
    "plain safetensors with other metadata": ("open", *NOT_KVMLX),
    "length 0": ("open", *NOT_KVMLX),
    "length 1": ("open", *NOT_KVMLX),
    "length 2^64-1": ("open", *NOT_KVMLX),
    "length 2^40": ("open", *NOT_KVMLX),
    "length past the end of the file": ("open", ArtifactError, "truncated"),
    "length one short (unaligned)": ("open", *T),
    "length one long (unaligned)": ("open", *JSON),
    "length half a page short": ("open", *T),
    "length one page long": ("open", *JSON),
    "length the text only": ("open", *T),
    "header not canonical (whitespace)": ("open", ArtifactError, "header is not canonical JSON"),
    "header with a duplicate key": ("open", ArtifactError, "header is not canonical JSON"),
    "header 1.0 for 1": ("open", ArtifactError, "header is not canonical JSON"),
    "header version 2": ("open", ArtifactError, "version 2 differs from the container's 3"),
    "header version 1": ("open", ArtifactError, "version 1 differs from the container's 3"),
    "header version 4": ("open", ArtifactError, "version 4 differs from the container's 3"),
    "header file_bytes one page more": ("open", ArtifactError, "truncated or padded"),
    "header tensor offset a page late": ("open", ArtifactError, "overlaps|past the end|not right after|truncated or padded"),
    "header tensor dtype float32": ("open", ArtifactError, "nbytes does not match shape and dtype"),
    "empty": ("open", ArtifactError, "truncated"),
    "7 bytes": ("open", ArtifactError, "truncated"),
    "length only": ("open", *NOT_KVMLX),
    "cut in the table": ("open", ArtifactError, "truncated"),
    "cut after the table text": ("open", ArtifactError, "truncated"),
    "cut at the data offset": ("open", ArtifactError, "truncated or padded"),
    "cut in the first tensor": ("open", ArtifactError, "truncated or padded"),
    "last byte cut": ("open", ArtifactError, "truncated or padded"),
    "page appended": ("open", ArtifactError, "truncated or padded"),
    "byte appended": ("open", ArtifactError, "truncated or padded"),
    "tensor bit flipped": ("verify", IntegrityError, "does not match its digest"),
    "tensor padding not zero": ("verify", IntegrityError, "non-zero bytes in the padding"),
    "signed: signature altered": ("signature", BadSignatureError, "signature does not verify"),
    "signed: public key altered": ("signature", BadSignatureError, "signature does not verify"),
    "signed: header changed, old signature kept": ("signature", BadSignatureError, "signature does not verify"),
}


def _extra_cases(base: bytes) -> dict[str, bytes]:
    """Cases that only make sense here (the corpus builds the rest)."""
    p = split_v3(base)
    payload = base[p["data_offset"]:]

    def meta(**fields) -> bytes:
        listed = json.loads(json.dumps(p["listed"]))
        listed["__metadata__"].update(fields)
        return v3_raw(json.dumps(listed, sort_keys=True, separators=(",", ":")).encode(), payload, data_offset=p["data_offset"])

    return {
        "metadata: header not ASCII": meta(header=p["meta"]["header"].replace("test", "t\u00e9st", 1)),
        "metadata: version superscript 3": meta(version="\u00b3"),
        "metadata: version fullwidth 4": meta(version="\uff14"),
    }


@pytest.fixture(scope="module")
def hostile(bases):
    return {**corpus_v3(*bases), **_extra_cases(bases[0])}


def test_the_hand_made_corpus_matches_the_expectations(hostile):
    assert set(hostile) == set(EXPECTED)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_hostile_version_3_files_are_refused(tmp_path, bases, hostile, no_mx_load, case):
    for valid in bases:  # the valid files' headers are in the cache of checked headers: a hostile twin is checked again
        (tmp_path / "valid.kvmlx").write_bytes(valid)
        with Artifact(tmp_path / "valid.kvmlx") as art:
            art.verify_all()
    raw = hostile[case]
    stage, error, message = EXPECTED[case]
    path = tmp_path / "case.kvmlx"
    path.write_bytes(raw)
    if stage == "open":
        with pytest.raises(error, match=message) as e:
            Artifact(path)
        _one_line(e.value)
        assert type(e.value) is error, type(e.value)
        return
    with Artifact(path) as art:  # well formed: refused by what follows
        if stage == "signature":
            with pytest.raises(error, match=message) as e:
                check_signature(art)
        else:
            check_signature(art)
            with pytest.raises(error, match=message) as e:
                art.verify_all()
    _one_line(e.value)
    assert type(e.value) is error, type(e.value)


def test_mx_save_safetensors_files_are_not_kvmlx_artifacts(tmp_path):
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"layers.0.keys": mx.zeros((1, 2, 3, 4))})
    for path, meta in ((plain, None), (tmp_path / "meta.safetensors", {"format": "kvmlx"}),
                       (tmp_path / "other.safetensors", {"format": "mlx"})):
        if meta is not None:
            mx.save_safetensors(str(path), {"a": mx.ones((3,))}, metadata=meta)
        with pytest.raises(ArtifactError, match="not a kvmlx artifact|invalid format version") as e:
            read_header(path)
        _one_line(e.value)
    with pytest.raises(ArtifactError, match="mlx-lm prompt cache becomes one with `kvmlx import`"):
        read_header(plain)  # the likely mix-up: an mlx-lm prompt cache given where an artifact goes


def test_truncation_at_every_section_boundary(tmp_path, bases):
    raw = bases[1]
    path = tmp_path / "cut.kvmlx"
    cuts = sorted({c + d for c in boundaries(raw) for d in (-1, 0, 1) if 0 <= c + d < len(raw)})
    assert len(cuts) > 20
    for cut in cuts:
        path.write_bytes(raw[:cut])
        with pytest.raises(ArtifactError, match="truncated|not a kvmlx artifact|not valid JSON") as e:
            Artifact(path)
        _one_line(e.value)


def test_a_non_canonical_header_is_refused_even_with_a_matching_table(tmp_path, bases):
    """Valid JSON, the right digest, a table made from it as a writer would: only canonical bytes pass."""
    h = header_of(bases[0])
    for i, body in enumerate([json.dumps(h, sort_keys=True).encode(), json.dumps(dict(reversed(h.items())), separators=(",", ":")).encode(),
                              canonical_json(h).replace(b'"tokens":[0,', b'"tokens":[0.0e0,', 1),
                              canonical_json(h).replace(b'"id":"test"', b'"id":"t\\u0065st"', 1)]):
        path = tmp_path / f"{i}.kvmlx"
        path.write_bytes(rebuild_v3(bases[0], body))
        assert json.loads(body) == h
        with pytest.raises(ArtifactError, match="not canonical JSON") as e:
            Artifact(path)
        _one_line(e.value)
    # the control: the canonical header rebuilt is the very same file
    assert rebuild_v3(bases[0], h) == bases[0]


def test_a_parallel_object_in_a_header_with_caches_is_invalid(tmp_path, published):
    from kvmlx.artifact.layout import tensor_layout

    raw = published["q-v3"].read_bytes()
    h = header_of(raw)
    m = h["model"]
    h["parallel"] = {**tensor_layout(2, m["num_layers"], m["num_kv_heads"]).to_json(), "part": 0}
    path = tmp_path / "p.kvmlx"
    path.write_bytes(rebuild_v3(raw, h))
    with pytest.raises(ArtifactError, match="parallel artifacts hold plain KV") as e:
        Artifact(path)
    _one_line(e.value)


def test_every_single_bit_flip_in_the_table_is_refused(tmp_path):
    """All bits of the length field and the table text, and a sample of the padding's, of a small file:
    each is refused when opened (the checked-headers cache is keyed by the table's digest)."""
    path = tmp_path / "small.kvmlx"
    synthetic(path, layers=1, tokens=2)
    raw = path.read_bytes()
    p = split_v3(raw)
    text_end = 8 + len(p["text"])
    rng = random.Random(0)
    at = [*range(text_end), *rng.sample(range(text_end, p["data_offset"]), 48), p["data_offset"] - 1]
    Artifact(path).close()  # the valid header is now cached as checked
    seen = set()
    with open(path, "r+b", buffering=0) as f:
        for i in at:
            for bit in range(8):
                f.seek(i)
                f.write(bytes([raw[i] ^ (1 << bit)]))
                try:
                    Artifact(path).close()
                except ArtifactError as e:  # UnsupportedVersionError and IntegrityError are ArtifactErrors
                    msg = str(e)
                    assert msg and "\n" not in msg and msg.isprintable(), (i, bit, msg)
                    seen.add(type(e))
                else:
                    pytest.fail(f"flipping bit {bit} of byte {i} (of {text_end} in the table) was not noticed")
            f.seek(i)
            f.write(raw[i : i + 1])
    assert seen == {ArtifactError, IntegrityError, UnsupportedVersionError}
    Artifact(path).close()  # restored: valid again


def test_the_page_cache_probe_tells_a_cached_file_from_an_evicted_one(published):
    """`Artifact.cached` (Linux preadv2 RWF_NOWAIT): True for a file just written (its pages are in
    the page cache), False once they are dropped; False where the system cannot tell."""
    import os

    from kvmlx.measure.bench.machine import can_evict, evict

    path = published["v3"]
    with Artifact(path) as art:
        for name in art.tensors:  # read it all once: every page is now cached
            art.tensor_bytes(name, verify=False).release()
        expected = hasattr(os, "RWF_NOWAIT")
        assert art.cached() is expected
    if not (expected and can_evict()):
        pytest.skip("no per-file page-cache eviction here")
    evict(path)
    with Artifact(path) as art:
        assert art.cached() is False
        assert art.cached() is False  # asked once per Artifact
    with Artifact(path) as art:
        art.verify_all()  # reads every page back in
    with Artifact(path) as art:
        assert art.cached() is True
