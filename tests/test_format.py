"""The artifact format alone: layout, round trip, and refusals of broken or hostile files (no model).

These tests read and patch the bytes of kvmlx's own container (versions 1 and 2: the 64-byte preamble),
which every reader keeps reading: `synthetic` writes that container explicitly. Version 3 (a
safetensors file, the writer's default) has its own tests in test_format_v3.py."""

import json
import os
import struct
import time

import numpy as np
import pytest

from kvmlx.errors import ArtifactError, IntegrityError, KvmlxError, UnsupportedVersionError
from kvmlx.artifact.format import ALIGN, MAGIC, PREAMBLE, Artifact, TensorData, canonical_json, read_header, write_artifact

LAYERS, HEADS, TOKENS, HEAD_DIM, VOCAB = 2, 2, 5, 8, 16


def synthetic(tmp_path, name="a.kvmlx", tokens=TOKENS, version=1):
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(LAYERS):
        for kind in ("keys", "values"):
            arrays[f"layers.{i}.{kind}"] = rng.standard_normal((1, HEADS, tokens, HEAD_DIM)).astype(np.float16)
    arrays["logits"] = rng.standard_normal(VOCAB).astype(np.float16)
    header = {
        "model": {"id": "test", "fingerprint": "blake3:00", "model_type": "qwen3", "num_layers": LAYERS,
                  "num_kv_heads": HEADS, "head_dim": HEAD_DIM, "rope": {"rope_theta": 10000.0}},
        "tokenizer": {"fingerprint": "blake3:11"},
        "kv": {"dtype": "float16", "layout": "BHLD", "num_tokens": tokens, "chunk_size": 4},
        "document": {"tokens": list(range(tokens)), "text_blake3": None},
    }
    tensors = [TensorData(k, "float16", v.shape, memoryview(v).cast("B")) for k, v in arrays.items()]
    path = tmp_path / name
    write_artifact(path, header, tensors, version=version)
    return path, arrays


def rewrite_header(path, mutate):
    """Re-encode the header after `mutate(header)`, with a valid digest, so only the structure is wrong."""
    import blake3

    raw = bytearray(path.read_bytes())
    magic, version, flags, hlen, data_offset, _ = PREAMBLE.unpack_from(raw, 0)
    header = json.loads(raw[64 : 64 + hlen])
    mutate(header)
    body = canonical_json(header)
    assert 64 + len(body) <= data_offset, "mutated header no longer fits"
    raw[64:data_offset] = body + bytes(data_offset - 64 - len(body))
    PREAMBLE.pack_into(raw, 0, magic, version, flags, len(body), data_offset, blake3.blake3(body).digest())
    path.write_bytes(bytes(raw))


def test_round_trip_and_alignment(tmp_path):
    path, arrays = synthetic(tmp_path)
    with Artifact(path) as art:
        assert art.size == path.stat().st_size == art.header["file_bytes"]
        assert art.size % ALIGN == 0 and art.version == 1
        for name, arr in arrays.items():
            entry = art.tensors[name]
            assert entry.offset % ALIGN == 0
            assert bytes(art.tensor_bytes(name)) == arr.tobytes()
    assert path.read_bytes()[:8] == MAGIC
    assert read_header(path)["document"]["tokens"] == list(range(TOKENS))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    good, _ = synthetic(tmp_path, "keep.kvmlx")
    before = good.read_bytes()
    import kvmlx.artifact.format as fmt

    def boom(f, data):
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "_write_all", boom)
    with pytest.raises(OSError):
        synthetic(tmp_path, "keep.kvmlx")
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.kvmlx"]


@pytest.mark.parametrize("cut", [0, 10, 63, 64, 100, ALIGN, ALIGN + 1, -ALIGN, -1])
def test_truncation_is_refused(tmp_path, cut):
    path, _ = synthetic(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(ArtifactError, match="truncated|magic"):
        read_header(path)


def test_a_header_checked_before_is_checked_again_beside_another_file_size(tmp_path):
    """Re-opening a file skips re-validating a header this process validated (same digest, file size,
    data offset and version), but the same header bytes in a file of another size are checked again."""
    from kvmlx.artifact import format as fmt

    path, _ = synthetic(tmp_path)
    first = read_header(path)
    assert read_header(path) == first and read_header(path) is not first  # a fresh dict every time
    again = read_header(path)  # a copy of the cached parse: what one caller changes, the next never sees
    again["document"]["tokens"].append(-1)
    again["tensors"][0]["shape"][0] = 99
    assert read_header(path) == first and json.dumps(read_header(path), sort_keys=True) == json.dumps(first, sort_keys=True)
    data = path.read_bytes()
    for size in (len(data) - ALIGN, len(data) + ALIGN):
        bad = tmp_path / f"{size}.kvmlx"
        bad.write_bytes(data[:size] + bytes(max(size - len(data), 0)))
        with pytest.raises(ArtifactError, match="truncated|padded"):
            read_header(bad)
    calls = []
    real = fmt.validate
    fmt._VALID_HEADERS.clear()
    try:
        fmt.validate = lambda *a, **k: calls.append(1) or real(*a, **k)
        read_header(path), read_header(path)
    finally:
        fmt.validate = real
    assert calls == [1]


def _xor(offset, mask):
    def patch(data):
        data[offset] ^= mask
    return patch


def _pack(fmt, offset, value):
    def patch(data):
        struct.pack_into(fmt, data, offset, value)
    return patch


@pytest.mark.parametrize(
    "patch, error, message",
    [
        (_xor(1, 0xFF), ArtifactError, "not a kvmlx artifact"),
        (_pack("<I", 8, 4), UnsupportedVersionError, "format version 4 is newer than this kvmlx reads \\(3\\)"),
        (_pack("<I", 8, 3), ArtifactError, "invalid format version 3 in a kvmlx preamble"),  # 3 is safetensors only
        (_pack("<I", 8, 2), ArtifactError, "caches must list one cache per layer"),  # a v1 header relabelled v2
        (_pack("<I", 8, 0), ArtifactError, "invalid format version"),
        (_pack("<I", 12, 4), ArtifactError, "unknown flags"),
        (_pack("<Q", 16, 1 << 60), ArtifactError, "exceeds"),  # refused before allocating anything
        (_pack("<Q", 24, 1 << 40), ArtifactError, "data starts at"),
        (_xor(80, 0x01), IntegrityError, "header does not match its digest"),
    ],
)
def test_patched_preamble_or_header_is_refused(tmp_path, patch, error, message):
    path, _ = synthetic(tmp_path)
    data = bytearray(path.read_bytes())
    patch(data)
    path.write_bytes(bytes(data))
    with pytest.raises(error, match=message):
        read_header(path)


def test_payload_bit_flip_fails_tensor_digest(tmp_path):
    path, _ = synthetic(tmp_path)
    with Artifact(path) as art:
        off = art.tensors["layers.1.values"].offset
    data = bytearray(path.read_bytes())
    data[off + 3] ^= 0x40
    path.write_bytes(bytes(data))
    with Artifact(path) as art:
        art.tensor_bytes("layers.0.keys")  # untouched tensors still verify
        with pytest.raises(IntegrityError, match="layers.1.values"):
            art.tensor_bytes("layers.1.values")


def _set_tensor(field, value, name="layers.0.keys"):
    def mutate(h):
        for t in h["tensors"]:
            if t["name"] == name:
                t[field] = value
    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set_tensor("offset", 1 << 50), "past the end"),
        (_set_tensor("offset", ALIGN + 8), "aligned"),
        (_set_tensor("offset", 0), "overlaps"),
        (_set_tensor("dtype", "int64"), "unsupported dtype"),
        (_set_tensor("dtype", "float32"), "nbytes does not match"),
        (_set_tensor("shape", [1, HEADS, TOKENS + 1, HEAD_DIM]), "nbytes does not match"),
        (_set_tensor("shape", [-1]), "invalid shape"),
        (_set_tensor("encoding", "pickle"), "unknown encoding"),
        (_set_tensor("digest", "zz"), "malformed digest"),
        (_set_tensor("name", "layers.1.keys"), "twice"),
        (lambda h: h["tensors"].pop(0), "missing"),
        (lambda h: h.update(file_bytes=h["file_bytes"] + 1), "truncated or padded"),
        (lambda h: h["kv"].update(num_tokens=TOKENS + 1), "token ids"),
        (lambda h: h["kv"].update(dtype="float64"), "unsupported KV dtype"),
        (lambda h: h["document"].update(tokens=[-1] * TOKENS), "non-negative"),
        (lambda h: h["model"].update(num_layers="2"), "wrong type"),
        (lambda h: h["model"].update(num_layers=True), "wrong type"),
        (lambda h: h.pop("model"), "missing field 'model'"),
        (lambda h: h.update(format="gguf"), "format"),
        (lambda h: h["model"].update(num_kv_heads=HEADS + 1), "shape"),
    ],
)
def test_structural_lies_are_refused(tmp_path, mutate, message):
    path, _ = synthetic(tmp_path)
    rewrite_header(path, mutate)
    with pytest.raises(ArtifactError, match=message):
        read_header(path)


@pytest.mark.parametrize("body", [b"[" * 100000 + b"]" * 100000, b"\xff\xfe", b"{\"a\": NaN}", b"[]"])
def test_hostile_json_is_refused(tmp_path, body):
    import blake3

    path = tmp_path / "hostile.kvmlx"
    data_offset = -(-(64 + len(body)) // ALIGN) * ALIGN
    pre = PREAMBLE.pack(MAGIC, 1, 0, len(body), data_offset, blake3.blake3(body).digest())
    path.write_bytes(pre + body + bytes(data_offset - 64 - len(body)))
    with pytest.raises(ArtifactError):
        read_header(path)


def test_every_error_is_a_one_line_kvmlx_error(tmp_path):
    path, _ = synthetic(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KvmlxError) as info:
        read_header(path)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_kvmlx_error(tmp_path):
    with pytest.raises(ArtifactError, match="cannot open"):
        read_header(tmp_path / "nope.kvmlx")


def test_signature_block_round_trip(tmp_path):
    path, arrays = synthetic(tmp_path)
    with Artifact(path) as art:
        assert art.signature is None
    tensors = [TensorData(k, "float16", v.shape, memoryview(v).cast("B")) for k, v in arrays.items()]
    seen = []

    def sign(header_digest):
        seen.append(header_digest)
        return b"K" * 32, b"S" * 64

    signed = tmp_path / "signed.kvmlx"
    write_artifact(signed, read_header(path) | {}, tensors, sign=sign, version=1)
    with Artifact(signed) as art:
        assert art.signature == (b"K" * 32, b"S" * 64)
        assert seen == [art.header_digest]


@pytest.mark.parametrize("where", ["signature block", "padding"])
def test_hidden_bytes_after_the_header_are_refused(tmp_path, where):
    path, _ = synthetic(tmp_path)
    raw = bytearray(path.read_bytes())
    hlen = struct.unpack_from("<Q", raw, 16)[0]
    raw[64 + hlen + (0 if where == "signature block" else 200)] = 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="non-zero bytes"):
        read_header(path)


# -- verifying once: a re-load of the same unchanged file skips re-hashing ------------------------------

class _NoHashing:
    """Stands in for the blake3 module: any attempt to hash fails the test."""

    class blake3:  # noqa: N801 - the module's own name
        AUTO = -1

        def __init__(self, *args, **kwargs):
            raise AssertionError("hashed a file that was verified before")


def _load_kv(path, verify=True):
    from kvmlx.runtime.load import read_caches

    art = Artifact(path)
    try:
        return read_caches(art, verify_digests=verify, load_path="copy")
    finally:
        art.close()


@pytest.fixture
def settled(monkeypatch):
    """Treat every file as settled, so files written by the test itself can be recorded as verified."""
    import kvmlx.artifact.format as fmt
    import kvmlx.artifact.verified as verified

    monkeypatch.setattr(verified, "SETTLED_SECONDS", -1.0)
    fmt.forget_verified()
    yield fmt
    fmt.forget_verified()


def test_reload_of_a_verified_file_skips_hashing(tmp_path, settled, monkeypatch):
    from kvmlx.runtime.load import read_caches

    path, arrays = synthetic(tmp_path)
    with Artifact(path) as art:
        assert not art.verified_before
    _load_kv(path)
    again, control = Artifact(path), Artifact(path)  # opened (header digests checked) before hashing is disabled
    assert again.verified_before
    monkeypatch.setattr(settled, "blake3", _NoHashing())
    caches, _, _ = read_caches(again, verify_digests=True, load_path="copy")
    again.close()
    assert np.array_equal(np.array(caches[1].keys)[:, :, :TOKENS], arrays["layers.1.keys"])
    settled.forget_verified()  # the control: a file not known to be verified is hashed
    with control, pytest.raises(AssertionError, match="verified before"):
        read_caches(control, verify_digests=True, load_path="copy")


def test_recent_files_are_not_recorded(tmp_path):
    import kvmlx.artifact.format as fmt

    fmt.forget_verified()
    path, _ = synthetic(tmp_path)  # written just now: its change time could still repeat
    _load_kv(path)
    with Artifact(path) as art:
        assert not art.verified_before


def test_a_file_modified_after_verification_is_hashed_again(tmp_path, settled):
    path, _ = synthetic(tmp_path)
    _load_kv(path)
    with Artifact(path) as art:
        assert art.verified_before
        off = art.tensors["layers.1.values"].offset
    time.sleep(0.05)  # past the file system clock's tick
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.seek(off + 3)
        byte = f.read(1)
        f.seek(off + 3)
        f.write(bytes([byte[0] ^ 0x40]))
    with Artifact(path) as art:
        assert not art.verified_before
    with pytest.raises(IntegrityError, match="layers.1.values"):
        _load_kv(path)


def test_a_file_changed_during_an_unhashed_reload_is_refused(tmp_path, settled):
    path, _ = synthetic(tmp_path)
    _load_kv(path)
    from kvmlx.runtime.load import read_caches

    with Artifact(path) as art:
        assert art.verified_before
        time.sleep(0.05)
        os.utime(path)  # any change to the file after it was opened
        with pytest.raises(IntegrityError, match="changed on disk while it was being loaded"):
            read_caches(art, verify_digests=True, load_path="copy")
