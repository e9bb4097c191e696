"""Publisher keys, signatures, the trust list, spot verification, and their CLI.

The CLI tests at the end exercise the commands `kvmlx keygen`, `kvmlx trust add|ls|rm`,
`kvmlx publish --sign`, `kvmlx generate --require-signed` and `kvmlx verify` (kvmlx/cli.py).
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from fuzz_corpus import header_of, rebuild
from kvmlx.errors import (
    ArtifactError,
    BadSignatureError,
    IntegrityError,
    KeyFileError,
    ModelMismatchError,
    RecomputeMismatchError,
    TrustListError,
    UnsignedArtifactError,
    UntrustedPublisherError,
)
from kvmlx.artifact.format import Artifact, TensorData, write_artifact
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import prefill, publish
from kvmlx.measure.spotcheck import spot_check
from kvmlx.artifact.trust import (
    KEY_PREFIX,
    TrustList,
    check_signature,
    generate_key,
    load_private_key,
    model_spec_from_header,
    parse_public_key,
    public_key_id,
    signer,
    verify_signature,
    write_private_key,
)

N_TOKENS, CHUNK = 48, 16


@pytest.fixture(scope="module")
def publisher():
    return generate_key()


@pytest.fixture(scope="module")
def doc_tokens(tiny, document):
    return tiny.tokenizer.encode(document)[:N_TOKENS]


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny, doc_tokens, publisher):
    """The same document published unsigned and signed by `publisher`, in kvmlx's own container (version 1:
    the forgeries below patch its preamble; `cli_artifacts` are version 3, test_format_v3.py has its forgeries)."""
    d = tmp_path_factory.mktemp("trust")
    publish(tiny, doc_tokens, d / "unsigned.kvmlx", chunk_size=CHUNK, format_version=1)
    publish(tiny, doc_tokens, d / "signed.kvmlx", chunk_size=CHUNK, sign=signer(publisher), format_version=1)
    return {"unsigned": d / "unsigned.kvmlx", "signed": d / "signed.kvmlx"}


def copy(src: Path, dst: Path, raw: bytes | None = None) -> Path:
    dst.write_bytes(src.read_bytes() if raw is None else raw)
    return dst


def trusting(tmp_path, *keys) -> TrustList:
    trust = TrustList(tmp_path / "trust.json")
    for i, k in enumerate(keys):
        trust.add(public_key_id(k), f"publisher{i}")
    return TrustList.load(tmp_path / "trust.json")


# ---------------------------------------------------------------- keys


def test_public_key_ids_round_trip_and_refuse_garbage():
    key = generate_key()
    raw = key.public_key().public_bytes_raw()
    kid = public_key_id(key)
    assert kid.startswith(KEY_PREFIX) and len(kid) == len(KEY_PREFIX) + 43
    assert parse_public_key(kid) == raw
    assert parse_public_key(KEY_PREFIX + raw.hex()) == raw  # hex is accepted too
    assert parse_public_key(f"  {kid}\n") == raw
    for bad in ["", kid[len(KEY_PREFIX):], "ed448:" + kid[8:], kid[:-1], kid + "AA", KEY_PREFIX + "!" * 43,
                KEY_PREFIX + "00" * 32, "ed25519:" + "x" * 64]:
        with pytest.raises(KeyFileError):
            parse_public_key(bad)


def test_private_key_files(tmp_path, monkeypatch):
    key = generate_key()
    pem = write_private_key(key, tmp_path / "k.pem")
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k.pem.pub").read_text().strip() == public_key_id(key)
    assert public_key_id(load_private_key(pem)) == public_key_id(key)
    raw = write_private_key(key, tmp_path / "k.raw", encoding="raw")
    assert raw.stat().st_size == 32 and public_key_id(load_private_key(raw)) == public_key_id(key)

    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(generate_key(), pem)
    assert public_key_id(load_private_key(pem)) == public_key_id(key)  # untouched
    other = generate_key()
    write_private_key(other, pem, overwrite=True)
    assert public_key_id(load_private_key(pem)) == public_key_id(other)

    enc = write_private_key(key, tmp_path / "enc.pem", passphrase="correct horse")
    assert b"ENCRYPTED" in enc.read_bytes()
    monkeypatch.delenv("KVMLX_KEY_PASSPHRASE", raising=False)
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        load_private_key(enc)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(enc, "battery staple")
    assert public_key_id(load_private_key(enc, lambda: "correct horse")) == public_key_id(key)
    monkeypatch.setenv("KVMLX_KEY_PASSPHRASE", "correct horse")
    assert public_key_id(load_private_key(enc)) == public_key_id(key)
    with pytest.raises(KeyFileError, match="cannot be passphrase-protected"):
        write_private_key(key, tmp_path / "enc.raw", encoding="raw", passphrase="x")


def test_bad_key_files_are_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cases = {"ec.pem": (ec_pem, "not an Ed25519 key"), "garbage": (b"hello", "not an Ed25519 key file"),
             "bad.pem": (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a readable PEM"),
             "huge": (bytes(1 << 20), "is not an Ed25519 key file")}
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(0o600)
        with pytest.raises(KeyFileError, match=message):
            load_private_key(path)
    open_key = write_private_key(generate_key(), tmp_path / "open.pem")
    open_key.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_private_key(open_key)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_private_key(tmp_path / "missing.pem")


def test_signatures_verify_and_bind_the_digest():
    key = generate_key()
    public, signature = signer(key)(b"d" * 32)
    verify_signature(public, signature, b"d" * 32)
    with pytest.raises(BadSignatureError):
        verify_signature(public, signature, b"e" * 32)
    with pytest.raises(BadSignatureError):
        verify_signature(generate_key().public_key().public_bytes_raw(), signature, b"d" * 32)
    with pytest.raises(BadSignatureError):
        verify_signature(public, bytes(64), b"d" * 32)


# ---------------------------------------------------------------- the trust list


def test_trust_list_add_list_remove(tmp_path):
    a, b = generate_key(), generate_key()
    trust = TrustList(tmp_path / "t" / "trust.json")
    entry = trust.add(public_key_id(a), "alice")
    assert trust.add(public_key_id(a), "alice") == entry  # idempotent
    trust.add(KEY_PREFIX + b.public_key().public_bytes_raw().hex(), "bob")  # hex form, stored canonically
    loaded = TrustList.load(tmp_path / "t" / "trust.json")
    assert [e.name for e in loaded.entries] == ["alice", "bob"]
    assert loaded.find(a.public_key().public_bytes_raw()).name == "alice"
    assert loaded.resolve("bob").key == public_key_id(b)
    data = json.loads((tmp_path / "t" / "trust.json").read_text())
    assert data["version"] == 1 and {e["key"] for e in data["keys"]} == {public_key_id(a), public_key_id(b)}
    with pytest.raises(TrustListError, match="already used"):
        trust.add(public_key_id(generate_key()), "alice")
    for bad in ["", " lead", "x" * 65, "a\nb", "ed25519:x"]:
        with pytest.raises(TrustListError, match="invalid name"):
            trust.add(public_key_id(generate_key()), bad)
    assert trust.remove("alice").key == public_key_id(a)
    assert trust.remove(public_key_id(b)).name == "bob"
    assert TrustList.load(tmp_path / "t" / "trust.json").entries == []
    with pytest.raises(TrustListError, match="not in the trust list"):
        trust.remove("alice")
    assert [p.name for p in (tmp_path / "t").iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"version": 2, "keys": []}', b'{"version": 1, "keys": [{"key": "x"}]}',
                                     b'{"version": 1, "keys": [{"key": "ed25519:AAAA", "name": "a", "added": "t"}]}'])
def test_a_malformed_trust_list_fails_closed(tmp_path, arts, content):
    (tmp_path / "trust.json").write_bytes(content)
    with pytest.raises(TrustListError):
        TrustList.load(tmp_path / "trust.json")
    with pytest.raises(TrustListError):
        TrustList(tmp_path / "trust.json").add(public_key_id(generate_key()), "x")


def test_concurrent_trust_adds_lose_nothing(tmp_path):
    """Two processes adding 8 keys each to one trust list: all 16 are there (lock + atomic rename)."""
    path = tmp_path / "trust.json"
    script = ("import sys; from kvmlx.artifact.trust import TrustList, generate_key, public_key_id\n"
              "for i in range(8): TrustList(sys.argv[1]).add(public_key_id(generate_key()), f'{sys.argv[2]}{i}')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), tag]) for tag in ("p", "q")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(TrustList.load(path).entries) == 16


# ---------------------------------------------------------------- checking signatures


def test_check_signature_matrix(tmp_path, arts, publisher):
    trusted, empty = trusting(tmp_path / "t", publisher), trusting(tmp_path / "e")
    assert check_signature(arts["unsigned"]).signed is False
    with pytest.raises(UnsignedArtifactError, match="not signed"):
        check_signature(arts["unsigned"], True, trusted)
    status = check_signature(arts["signed"])
    assert status.signed and status.public_key == public_key_id(publisher) and status.trusted is None
    assert check_signature(arts["signed"], False, empty).trusted is False
    with pytest.raises(UntrustedPublisherError, match="not in your trust list"):
        check_signature(arts["signed"], True, empty)
    ok = check_signature(arts["signed"], True, trusted)
    assert ok.trusted and ok.name == "publisher0" and "trusted as 'publisher0'" in ok.describe()


def test_the_signature_covers_the_whole_artifact(tmp_path, arts, publisher, tiny):
    trusted = trusting(tmp_path, publisher)
    raw = arts["signed"].read_bytes()
    h = header_of(raw)
    h["document"]["tokens"][3] += 1  # a different claim, re-digested: the old signature no longer fits
    forged = copy(arts["signed"], tmp_path / "redigested.kvmlx", rebuild(raw, h, keep_block=True))
    with pytest.raises(BadSignatureError, match="does not verify"):
        check_signature(forged)  # refused even when signatures are not required
    with pytest.raises(BadSignatureError):
        load_artifact(forged, tiny)
    # the attacker signs with their own key: valid, but not a publisher you trust
    resigned = copy(arts["signed"], tmp_path / "resigned.kvmlx", rebuild(raw, h, sign=signer(generate_key())))
    assert check_signature(resigned).signed
    with pytest.raises(UntrustedPublisherError):
        load_artifact(resigned, tiny, require_signed=True, trust_list=trusted)
    # tampering with tensor bytes keeps the signature valid but breaks the digest it signs
    with Artifact(arts["signed"]) as art:
        off = art.tensors["layers.1.keys"].offset
    tampered = bytearray(raw)
    tampered[off] ^= 1
    bad = copy(arts["signed"], tmp_path / "tampered.kvmlx", bytes(tampered))
    assert check_signature(bad, True, trusted).trusted
    with pytest.raises(IntegrityError, match="layers.1.keys"):
        load_artifact(bad, tiny, require_signed=True, trust_list=trusted)
    # a zeroed signature block with the signed flag set (one flipped flag bit of an unsigned file)
    unsigned = bytearray(arts["unsigned"].read_bytes())
    unsigned[12] |= 1
    with pytest.raises(BadSignatureError, match="no key"):
        check_signature(copy(arts["unsigned"], tmp_path / "flag.kvmlx", bytes(unsigned)))


def test_load_requires_a_trusted_signature_when_asked(tmp_path, arts, publisher, tiny):
    trusted = trusting(tmp_path, publisher)
    loaded = load_artifact(arts["signed"], tiny, require_signed=True, trust_list=trusted)
    assert loaded.signature.trusted and loaded.signature.public_key == public_key_id(publisher)
    assert load_artifact(arts["unsigned"], tiny).signature.signed is False
    with pytest.raises(UnsignedArtifactError):
        load_artifact(arts["unsigned"], tiny, require_signed=True, trust_list=trusted)
    trusted.remove("publisher0")
    with pytest.raises(UntrustedPublisherError):
        load_artifact(arts["signed"], tiny, require_signed=True, trust_list=TrustList.load(trusted.path))


def test_model_ids_from_untrusted_headers():
    for ok in ["builtin:tiny", "Qwen/Qwen3-4B", "mlx-community/Qwen3-4B-bf16"]:
        assert model_spec_from_header({"model": {"id": ok}}) == ok
    for bad in ["/etc", "~/models/x", "../x/y", "a/../b", "./local", "a/b/c", "x" * 300, "builtin:../../x"]:
        with pytest.raises(ArtifactError, match="pass --model"):
            model_spec_from_header({"model": {"id": bad}})


def test_an_agent_requiring_signatures_skips_other_publishers_without_discarding(tmp_path, tiny, document, publisher):
    """Automatic reuse from the store (kvmlx.runtime.agent) only uses trusted publishers' entries; an entry
    from anyone else is skipped for this agent, not quarantined as broken."""
    import kvmlx.runtime.agent as agent_mod
    from kvmlx.runtime.store import Store

    store = Store(tmp_path / "store")
    doc = document.strip()[:400]
    unsigned = agent_mod.Agent(tiny, store, cache=False).publish(doc)
    prompt = doc + "\n\nQuestion: what is it about?\nAnswer:"
    careful = agent_mod.Agent(tiny, store, require_signed=True, trust_list=trusting(tmp_path, publisher), cache=False)
    out = careful.generate(prompt, max_tokens=2)
    assert out.reused_tokens == 0 and out.key is None
    assert unsigned.key in store and agent_mod.Agent(tiny, store, cache=False).generate(prompt, max_tokens=2).key == unsigned.key
    signed = agent_mod.Agent(tiny, Store(tmp_path / "signed"), cache=False).publish(doc, sign=signer(publisher))
    trusted = agent_mod.Agent(tiny, Store(tmp_path / "signed"), require_signed=True, trust_list=trusting(tmp_path / "t", publisher), cache=False)
    assert trusted.generate(prompt, max_tokens=2).key == signed.key


# ---------------------------------------------------------------- spot verification


def _kv_of(lm, tokens, chunks) -> tuple[list, mx.array]:
    """Prefill `tokens` split at `chunks` boundaries; return per-layer (keys, values) and the last logits."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm.model)
    bounds = [0, *chunks, len(tokens)]
    logits = None
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            logits = prefill(lm.model, tokens[a:b], cache, b - a)
    n = len(tokens)
    return [(c.keys[..., :n, :], c.values[..., :n, :]) for c in cache], logits


def _write_forged(path: Path, honest: Path, kv, logits, claimed_tokens, sign=None) -> Path:
    """An artifact with the honest one's header (claiming `claimed_tokens`) around KV `kv`, correctly
    digested and signed: what a malicious publisher can produce."""
    h = header_of(honest.read_bytes())
    h["document"]["tokens"] = list(claimed_tokens)
    header = {k: v for k, v in h.items() if k not in ("tensors", "file_bytes", "format", "version", "digest")}
    tensors = []
    for i, (k, v) in enumerate(kv):
        for kind, x in (("keys", k), ("values", v)):
            x = mx.contiguous(x)
            mx.eval(x)
            tensors.append(TensorData(f"layers.{i}.{kind}", h["kv"]["dtype"], tuple(x.shape), memoryview(x).cast("B")))
    mx.eval(logits)
    tensors.append(TensorData("logits", str(logits.dtype).split(".")[-1], tuple(logits.shape), memoryview(logits).cast("B")))
    write_artifact(path, header, tensors, sign=sign)
    return path


def test_an_honest_artifact_passes_every_spot_check_bit_exactly(arts, tiny):
    report = spot_check(arts["signed"], tiny, recompute=20, sample=3, probe=6, seed=7)
    assert report.ok and report.digests_verified == 9 and report.signature.signed
    assert {c.kind for c in report.checks} == {"prefix", "sample", "probe"}
    assert all(c.max_abs_diff == 0.0 for c in report.checks)
    probes = [c for c in report.checks if c.kind == "probe"]
    assert len(probes) == 6 and probes[-1].start == N_TOKENS - 1 and probes[-1].logits_diff == 0.0
    full = spot_check(arts["signed"], tiny, recompute=N_TOKENS, probe=0)
    assert full.ok and full.tokens_run == N_TOKENS and full.checks[0].logits_diff == 0.0
    out = report.to_json()
    assert out["ok"] and out["seed"] == 7 and 0 < out["fraction_of_full_prefill"] <= 1
    assert json.loads(json.dumps(out)) == out
    assert "verdict    OK" in report.describe()
    report.raise_if_failed()


def test_kv_of_other_text_under_claimed_tokens_is_caught(tmp_path, arts, tiny, doc_tokens, publisher):
    """A malicious publisher: the KV encodes another text; the header claims the document's tokens."""
    other = [(t * 7 + 3) % 1000 + 3 for t in doc_tokens]
    kv, logits = _kv_of(tiny, other, range(CHUNK, N_TOKENS, CHUNK))
    forged = _write_forged(tmp_path / "lie.kvmlx", arts["signed"], kv, logits, doc_tokens, sign=signer(publisher))
    load_artifact(forged, tiny)  # every digest and the signature are fine: only recomputation can tell
    report = spot_check(forged, tiny, recompute=1, probe=0)
    assert not report.ok and report.checks[0].max_abs_diff > 0
    with pytest.raises(RecomputeMismatchError, match="position 0: max .diff. .* it does not encode its claimed tokens") as e:
        report.raise_if_failed()
    assert "\n" not in str(e.value)
    assert not spot_check(forged, tiny, recompute=0, sample=1, probe=0, seed=1).ok
    assert not spot_check(forged, tiny, recompute=0, probe=1).ok  # the last position alone already fails


def test_a_consistent_forgery_in_the_middle(tmp_path, arts, tiny, doc_tokens):
    """KV of other tokens at [q, r), then the claimed tokens recomputed honestly on top: the prefix check
    finds it only if it reaches q, probes only if one lands in [q, r). This is the documented limit."""
    q, r = 20, 30
    kv_tokens = doc_tokens[:q] + [(t + 11) % 1000 + 3 for t in doc_tokens[q:r]] + doc_tokens[r:]
    kv, logits = _kv_of(tiny, kv_tokens, [q, r])
    forged = _write_forged(tmp_path / "middle.kvmlx", arts["signed"], kv, logits, doc_tokens)
    assert spot_check(forged, tiny, recompute=q, probe=0).ok  # the honest prefix passes
    beyond = spot_check(forged, tiny, recompute=q + 1, probe=0)
    assert not beyond.ok and beyond.checks[0].max_abs_diff > 0
    tail = spot_check(forged, tiny, recompute=0, probe=0, probe_at=[q - 1, r, r + 5, N_TOKENS - 1])
    assert tail.ok, "positions outside [q, r) are self-consistent: probes there cannot see the forgery"
    inside = spot_check(forged, tiny, recompute=0, probe=0, probe_at=[q, r - 1])
    assert [c.ok for c in inside.checks] == [False, False]


def test_tolerance(tmp_path, arts, tiny):
    """One stored value off by a little: bit-exact checking fails, a loose tolerance accepts it."""
    with Artifact(arts["unsigned"]) as art:
        keys = np.frombuffer(art.tensor_bytes("layers.3.values"), dtype=np.uint16).copy()
    kv, logits = _kv_of(tiny, header_of(arts["unsigned"].read_bytes())["document"]["tokens"], range(CHUNK, N_TOKENS, CHUNK))
    keys[-1] ^= 1  # lowest mantissa bit of the last position's last value of layer 3
    kv[3] = (kv[3][0], mx.array(keys).view(mx.bfloat16).reshape(kv[3][1].shape))
    nudged = _write_forged(tmp_path / "nudged.kvmlx", arts["unsigned"], kv, logits,
                           header_of(arts["unsigned"].read_bytes())["document"]["tokens"])
    strict = spot_check(nudged, tiny, recompute=0, probe=0, probe_at=[N_TOKENS - 1])
    assert not strict.ok and 0 < strict.checks[0].max_abs_diff < 0.1 and strict.checks[0].worst == "layers.3.values"
    assert spot_check(nudged, tiny, recompute=0, probe=0, probe_at=[N_TOKENS - 1], tolerance=0.1).ok


def test_spot_check_refuses_like_a_load(tmp_path, arts, tiny, publisher):
    from kvmlx.models import build_builtin, load_model

    other = load_model(str(build_builtin(tmp_path / "seed1", "tiny", seed=1)))
    with pytest.raises(ModelMismatchError, match="another model"):
        spot_check(arts["signed"], other)
    with pytest.raises(UnsignedArtifactError):
        spot_check(arts["unsigned"], tiny, require_signed=True, trust_list=trusting(tmp_path, publisher))
    raw = arts["unsigned"].read_bytes()
    h = header_of(raw)
    h["document"]["tokens"][5] = 5_000_000  # past the embedding table: a prefill would read out of bounds
    oob = copy(arts["unsigned"], tmp_path / "oob.kvmlx", rebuild(raw, h))
    with pytest.raises(ModelMismatchError, match="outside this model's vocabulary"):
        spot_check(oob, tiny)
    with Artifact(arts["unsigned"]) as art:
        off = art.tensors["layers.0.values"].offset
    tampered = bytearray(raw)
    tampered[off + 5] ^= 4
    bad = copy(arts["unsigned"], tmp_path / "bad.kvmlx", bytes(tampered))
    with pytest.raises(IntegrityError, match="layers.0.values"):
        spot_check(bad, None)  # without a model: structure, digests and signature
    skipped = spot_check(bad, tiny, verify_digests=False, recompute=N_TOKENS, probe=0)
    assert not skipped.ok and skipped.digests_verified == 0  # recomputation still sees the change
    assert spot_check(arts["signed"], None).digests_verified == 9


# ---------------------------------------------------------------- CLI (the commands added to kvmlx/cli.py)


@pytest.fixture
def runner(kvmlx_home):
    from click.testing import CliRunner

    trust_file = Path(kvmlx_home) / "trust.json"
    saved = trust_file.read_bytes() if trust_file.exists() else None
    yield CliRunner()
    if saved is None:
        trust_file.unlink(missing_ok=True)
    else:
        trust_file.write_bytes(saved)


def cli(runner, *args, **kw):
    from kvmlx.cli import main

    return runner.invoke(main, [str(a) for a in args], **kw)


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def cli_keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-keys")
    key = generate_key()
    write_private_key(key, d / "publisher.pem")
    return d / "publisher.pem", public_key_id(key)


@pytest.mark.parametrize("command", [["keygen"], ["trust"], ["trust", "add"], ["trust", "ls"], ["trust", "rm"], ["verify"]])
def test_cli_help(runner, command):
    result = cli(runner, *command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_cli_keygen(runner, tmp_path, monkeypatch):
    result = cli(runner, "keygen", "--out", tmp_path / "k.pem", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["public_key"].startswith(KEY_PREFIX) and not out["encrypted"]
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert (tmp_path / "k.pem.pub").read_text().strip() == out["public_key"]
    assert public_key_id(load_private_key(tmp_path / "k.pem")) == out["public_key"]
    one_line_error(cli(runner, "keygen", "--out", tmp_path / "k.pem"), "already exists")
    plain = cli(runner, "keygen", "--out", tmp_path / "k2.pem")
    assert plain.exit_code == 0 and plain.stdout.strip().startswith(KEY_PREFIX)
    monkeypatch.setenv("KVMLX_KEY_PASSPHRASE", "s3cret")
    enc = json.loads(cli(runner, "keygen", "--out", tmp_path / "enc.pem", "--encrypt", "--json").output)
    assert enc["encrypted"] and public_key_id(load_private_key(tmp_path / "enc.pem", "s3cret")) == enc["public_key"]
    assert cli(runner, "keygen", "--out", tmp_path / "r", "--raw").exit_code == 0 and (tmp_path / "r").stat().st_size == 32
    assert cli(runner, "keygen", "--out", tmp_path / "x", "--raw", "--encrypt").exit_code == 2


def test_cli_trust_add_ls_rm(runner, cli_keys):
    key_file, key_id = cli_keys
    assert cli(runner, "trust", "add", key_id, "--name", "alice").exit_code == 0
    other = public_key_id(generate_key())
    assert cli(runner, "trust", "add", other, "--name", "bob").exit_code == 0
    listed = json.loads(cli(runner, "trust", "ls", "--json").output)
    assert {(e["key"], e["name"]) for e in listed["keys"]} >= {(key_id, "alice"), (other, "bob")}
    text = cli(runner, "trust", "ls").output
    assert "alice" in text and key_id in text
    assert json.loads(cli(runner, "trust", "rm", "bob", "--json").output)["key"] == other
    assert cli(runner, "trust", "rm", key_id).exit_code == 0
    one_line_error(cli(runner, "trust", "rm", "alice"), "not in the trust list")
    one_line_error(cli(runner, "trust", "add", "ed25519:nope"), "malformed public key id")
    assert cli(runner, "trust", "add", f"{key_file}.pub", "--name", "fromfile").exit_code == 0  # a .pub file works
    assert cli(runner, "trust", "rm", "fromfile").exit_code == 0


@pytest.fixture(scope="module")
def cli_artifacts(tmp_path_factory, cli_keys, document):
    from click.testing import CliRunner

    d = tmp_path_factory.mktemp("cli-arts")
    (d / "doc.txt").write_text(document[:300], encoding="utf-8")
    runner = CliRunner()
    signed = cli(runner, "publish", d / "doc.txt", "--out", d / "signed.kvmlx", "--chunk-size", 32,
                 "--sign", cli_keys[0], "--json")
    assert signed.exit_code == 0, signed.output
    assert json.loads(signed.output)["signed_by"] == cli_keys[1]
    assert cli(runner, "publish", d / "doc.txt", "--out", d / "unsigned.kvmlx", "--chunk-size", 32).exit_code == 0
    return {"signed": d / "signed.kvmlx", "unsigned": d / "unsigned.kvmlx", "dir": d}


def test_cli_generate_require_signed(runner, cli_keys, cli_artifacts, tmp_path):
    key_file, key_id = cli_keys
    signed, unsigned = cli_artifacts["signed"], cli_artifacts["unsigned"]
    args = ["-n", 2, "--prompt", " x", "--require-signed"]
    one_line_error(cli(runner, "generate", unsigned, *args), "not signed")
    one_line_error(cli(runner, "generate", signed, *args), "not in your trust list", key_id)
    assert cli(runner, "trust", "add", key_id, "--name", "pub").exit_code == 0
    ok = cli(runner, "generate", signed, *args, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["signature"] == {"signed": True, "public_key": key_id, "trusted": True, "name": "pub"}
    # wrongly signed: the header changed after signing (re-digested, old signature kept)
    raw = signed.read_bytes()
    h = header_of(raw)
    h["document"]["tokens"][0] = h["document"]["tokens"][1]
    one_line_error(cli(runner, "generate", copy(signed, tmp_path / "w.kvmlx", rebuild(raw, h, keep_block=True)), "-n", 2),
                   "signature does not verify")
    # tampered tensor: the signature is fine, the digest it covers is not
    with Artifact(signed) as art:
        off = art.tensors["layers.0.keys"].offset
    tampered = bytearray(raw)
    tampered[off] ^= 0x10
    one_line_error(cli(runner, "generate", copy(signed, tmp_path / "t.kvmlx", bytes(tampered)), *args),
                   "does not match its digest")
    one_line_error(cli(runner, "generate", copy(signed, tmp_path / "c.kvmlx", raw[:-100]), *args), "truncated")


def test_cli_refuses_the_wrong_model_and_path_model_ids(runner, cli_artifacts, tmp_path):
    from kvmlx.models import build_builtin

    other = build_builtin(tmp_path / "seed2", "tiny", seed=2)
    one_line_error(cli(runner, "generate", cli_artifacts["unsigned"], "--model", other, "-n", 2), "another model")
    raw = cli_artifacts["unsigned"].read_bytes()
    h = header_of(raw)
    h["model"]["id"] = str(other)  # an artifact naming a local path as its model
    named = copy(cli_artifacts["unsigned"], tmp_path / "named.kvmlx", rebuild(raw, h))
    one_line_error(cli(runner, "generate", named, "-n", 2), "pass --model")
    one_line_error(cli(runner, "verify", named), "pass --model")


def test_cli_verify(runner, cli_keys, cli_artifacts, tmp_path, tiny):
    signed = cli_artifacts["signed"]
    ok = cli(runner, "verify", signed, "--recompute", 16, "--sample", 2, "--probe", 4, "--seed", 3, "--json")
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["ok"] and report["signature"]["public_key"] == cli_keys[1] and report["signature"]["trusted"] is False
    assert {c["kind"] for c in report["checks"]} == {"prefix", "sample", "probe"}
    assert all(c["max_abs_diff"] == 0 for c in report["checks"])
    text = cli(runner, "verify", signed)
    assert text.exit_code == 0 and "verdict" in text.output and "OK" in text.output
    one_line_error(cli(runner, "verify", signed, "--require-signed", "--no-model"), "not in your trust list")
    assert cli(runner, "verify", signed, "--no-model", "--json").exit_code == 0
    # a lying publisher: the KV of other text under the document's tokens, correctly digested and signed
    h = header_of(signed.read_bytes())
    other = [(t * 5 + 1) % 1000 + 3 for t in h["document"]["tokens"]]
    kv, logits = _kv_of(tiny, other, range(32, len(other), 32))
    forged = _write_forged(tmp_path / "forged.kvmlx", signed, kv, logits, h["document"]["tokens"],
                           sign=signer(load_private_key(cli_keys[0])))
    bad = cli(runner, "verify", forged, "--recompute", 8, "--json")
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)["ok"] is False
    assert bad.stderr.strip().startswith("Error:") and "recomputed KV differs" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert cli(runner, "generate", forged, "-n", 2).exit_code == 0  # loading alone cannot tell (see docs/SECURITY.md)


def test_cli_publish_with_an_encrypted_key(runner, cli_artifacts, tmp_path, monkeypatch):
    key = generate_key()
    write_private_key(key, tmp_path / "enc.pem", passphrase="pw")
    doc = cli_artifacts["dir"] / "doc.txt"
    monkeypatch.delenv("KVMLX_KEY_PASSPHRASE", raising=False)
    one_line_error(cli(runner, "publish", doc, "--out", tmp_path / "a.kvmlx", "--sign", tmp_path / "enc.pem"), "passphrase")
    assert not (tmp_path / "a.kvmlx").exists()
    monkeypatch.setenv("KVMLX_KEY_PASSPHRASE", "pw")
    result = cli(runner, "publish", doc, "--out", tmp_path / "a.kvmlx", "--sign", tmp_path / "enc.pem", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["signed_by"] == public_key_id(key)
    assert check_signature(tmp_path / "a.kvmlx").public_key == public_key_id(key)
