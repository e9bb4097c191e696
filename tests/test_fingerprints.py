"""Model and tokenizer fingerprints: computed from the weight files, the same whatever the file
layout, remembered across processes keyed by the files' identities, and legacy artifacts still bind."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from kvmlx.artifact import fingerprints, identity
from kvmlx.artifact.fingerprints import forget_fingerprints, weights_fingerprint
from kvmlx.artifact.identity import legacy_model_fingerprint, model_fingerprint, tokenizer_fingerprint
from kvmlx.errors import ModelLoadError, ModelMismatchError
from kvmlx.models import load_model
from kvmlx.runtime.generate import verify
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import publish


def _read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {name: (info, raw[8 + n + info["data_offsets"][0] : 8 + n + info["data_offsets"][1]]) for name, info in header.items()}


def _write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, (info, data) in tensors.items():
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(data for _, data in tensors.values()))


@pytest.fixture()
def copy(tmp_path, tiny):
    """A private copy of the tiny model's directory."""
    d = tmp_path / "model"
    shutil.copytree(tiny.path, d)
    return d


@pytest.fixture()
def settled(monkeypatch):
    """Files count as settled at once (the real rule waits 2 s after a change before remembering)."""
    monkeypatch.setattr(fingerprints, "SETTLED_SECONDS", -1.0)


def test_same_weights_in_other_files_same_fingerprint(copy, tiny):
    before = weights_fingerprint(copy, tiny.config)
    assert before.startswith("fp2:blake3:") and before == model_fingerprint(tiny)
    tensors = _read_safetensors(copy / "model.safetensors")
    names = sorted(tensors)
    (copy / "model.safetensors").unlink()
    # another layout: two shards, tensors in reverse order inside each, plus an index (as HF writes them)
    _write_safetensors(copy / "model-00001-of-00002.safetensors", {n: tensors[n] for n in reversed(names[::2])})
    _write_safetensors(copy / "model-00002-of-00002.safetensors", {n: tensors[n] for n in reversed(names[1::2])})
    assert weights_fingerprint(copy, tiny.config) == before
    # one changed bit of one weight is another model
    info, data = tensors[names[3]]
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 1
    mutated = {**tensors, names[3]: (info, bytes(flipped))}
    _write_safetensors(copy / "model-00001-of-00002.safetensors", {n: mutated[n] for n in reversed(names[::2])})
    _write_safetensors(copy / "model-00002-of-00002.safetensors", {n: mutated[n] for n in reversed(names[1::2])})
    assert weights_fingerprint(copy, tiny.config) != before
    # and so is another config
    assert weights_fingerprint(copy, {**tiny.config, "rms_norm_eps": 1e-5}) != weights_fingerprint(copy, tiny.config)


def test_malformed_weights_are_a_model_error(copy, tiny):
    (copy / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        weights_fingerprint(copy, tiny.config)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        weights_fingerprint(copy, tiny.config)


def test_remembered_until_a_file_changes(copy, settled, monkeypatch):
    lm = load_model(str(copy))
    first = model_fingerprint(lm), tokenizer_fingerprint(lm)
    computed = []
    real = fingerprints.weights_fingerprint
    monkeypatch.setattr(identity, "weights_fingerprint", lambda *a: computed.append("model") or real(*a))
    monkeypatch.setattr(identity, "_tokenizer_fingerprint", lambda *a: computed.append("tokenizer") or first[1])
    identity._memo.clear()
    forget_fingerprints()  # as a new process starts: only the file under $KVMLX_HOME remains
    assert (model_fingerprint(lm), tokenizer_fingerprint(lm)) == first and computed == []
    w = copy / "model.safetensors"
    w.write_bytes(w.read_bytes())  # same bytes, new identity: fingerprinted again
    forget_fingerprints()
    assert model_fingerprint(lm) == first[0] and computed == ["model"]
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    forget_fingerprints()
    assert model_fingerprint(lm) == first[0] and computed == ["model"]  # the model's files did not change
    tokenizer_fingerprint(lm)
    assert computed == ["model", "tokenizer"]
    (copy / "extra.safetensors").write_bytes(b"")  # a file added to the weights is noticed too
    forget_fingerprints()
    with pytest.raises(ModelLoadError):
        model_fingerprint(lm)


def test_recently_changed_files_are_not_remembered(copy, monkeypatch):
    monkeypatch.setattr(fingerprints, "SETTLED_SECONDS", 3600.0)
    lm = load_model(str(copy))
    model_fingerprint(lm)
    computed = []
    real = fingerprints.weights_fingerprint
    monkeypatch.setattr(identity, "weights_fingerprint", lambda *a: computed.append(1) or real(*a))
    forget_fingerprints()
    model_fingerprint(lm)
    assert computed == [1]


def test_a_new_process_computes_nothing(copy, settled):
    lm = load_model(str(copy))
    expected = model_fingerprint(lm), tokenizer_fingerprint(lm)
    script = (
        "import sys, kvmlx.artifact.identity as i, kvmlx.artifact.fingerprints as f\n"
        "from kvmlx.models import load_model\n"
        "def boom(*a): raise SystemExit('recomputed')\n"
        "i.weights_fingerprint = i._tokenizer_fingerprint = boom\n"
        f"lm = load_model({str(copy)!r})\n"
        "print(i.model_fingerprint(lm), i.tokenizer_fingerprint(lm))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == list(expected)


def test_an_unwritable_cache_only_costs_a_recomputation(copy, monkeypatch, tmp_path):
    blocker = tmp_path / "home"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KVMLX_HOME", str(blocker))
    forget_fingerprints()
    lm = load_model(str(copy))
    assert model_fingerprint(lm).startswith("fp2:blake3:")


def test_legacy_fingerprint_artifacts_still_bind(tmp_path, tiny, document, monkeypatch):
    """An artifact published before scheme 2 names the parameters' fingerprint: it still loads, exactly."""
    path = tmp_path / "legacy.kvmlx"
    monkeypatch.setattr("kvmlx.runtime.publish.model_fingerprint", legacy_model_fingerprint)
    publish(tiny, tiny.tokenizer.encode(document)[:40], path, chunk_size=16)
    monkeypatch.undo()
    loaded = load_artifact(path, tiny)
    assert loaded.header["model"]["fingerprint"].startswith("blake3:")
    assert verify(path, tiny, " and then", max_tokens=8).token_exact
    other = load_model(str(tiny.path), "float32")
    other.dtype = "bfloat16"  # pretend: the dtype check passes, the parameters' fingerprint must not
    with pytest.raises(ModelMismatchError, match="another model"):
        load_artifact(path, other)


def test_a_loaded_model_keeps_the_fingerprint_of_what_it_loaded(copy, settled):
    """The weights in memory do not change when their files do: a loaded model binds to what it loaded,
    looked up once (no stat per load), while a model loaded from the changed files gets their fingerprint."""
    lm = load_model(str(copy))
    first = model_fingerprint(lm)
    tensors = _read_safetensors(copy / "model.safetensors")
    name = sorted(tensors)[0]
    info, data = tensors[name]
    flipped = bytearray(data)
    flipped[0] ^= 1
    _write_safetensors(copy / "model.safetensors", {**tensors, name: (info, bytes(flipped))})
    assert model_fingerprint(lm) == first
    assert model_fingerprint(load_model(str(copy))) != first
