"""Hostile files: every malformed artifact is refused with a typed, one-line kvmlx error.

Nothing crashes the process, hangs, or allocates far beyond the file's size. Property-based
(Hypothesis) over a small valid artifact of the tiny model: bit flips anywhere, truncation at every
section boundary and at random lengths, lying preamble fields, lying structural fields in a header
that is re-digested (so the structure checks, not the digest, must catch them), random JSON values
in every header field; plus a hand-made corpus (tests/fuzz_corpus.py). Most classes take apart
kvmlx's own container (versions 1 and 2); bit flips, truncation and the hand-made corpus also run on
version 3 (a safetensors file: test_format_v3.py has its own exhaustive checks). Files go through what a
loader does: `read_header`, `Artifact.tensor_bytes(verify=True)` and `load_artifact` with the tiny
model; a sample runs in a subprocess that also continues, `--verify`s and spot-checks each file, so
a segfault or an abort is a failure, not a dead test run.

CI runs a few hundred examples per class in about a minute; `KVMLX_FUZZ=long` runs ~20x more.
`KVMLX_FUZZ_REPORT=FILE` writes the cases tried and their outcomes per class as JSON.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from itertools import count
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_corpus import (
    Bases,
    corpus_v2,
    corpus_v3,
    is_v3,
    split_v3,
    zstd_bomb,
    attempt,
    boundaries,
    corpus,
    header_of,
    paths_in,
    rebuild,
    replace_at,
    set_preamble,
    split,
)
from kvmlx.artifact.format import ALIGN, SIGNATURE_BLOCK, align

LONG = os.environ.get("KVMLX_FUZZ") == "long"
settings.register_profile("kvmlx-fuzz-ci", max_examples=1, deadline=10_000, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("kvmlx-fuzz-long", max_examples=1, deadline=30_000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile("kvmlx-fuzz-long" if LONG else "kvmlx-fuzz-ci")
SCALE = 20 if LONG else 1


def fuzz(n: int):
    """Hypothesis settings for one property: `n` examples in CI, 20x with KVMLX_FUZZ=long."""
    return settings(PROFILE, max_examples=n * SCALE)


RESULTS: Counter = Counter()  # (class, outcome) -> cases
ACCEPTED_FIELDS: Counter = Counter()  # header field -> random JSON values there that were accepted
_names = count()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    table: dict[str, dict[str, int]] = {}
    for (cls, outcome), n in sorted(RESULTS.items()):
        table.setdefault(cls, {})[outcome] = n
    if path := os.environ.get("KVMLX_FUZZ_REPORT"):
        Path(path).write_text(json.dumps({"mode": "long" if LONG else "ci", "total": sum(RESULTS.values()),
                                          "classes": table, "accepted random JSON by field": dict(ACCEPTED_FIELDS)},
                                         indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def signing_key():
    from kvmlx.artifact.trust import generate_key

    return generate_key()


@pytest.fixture(scope="module")
def bases(work, tiny, signing_key):
    """A small valid artifact of the tiny model (12 tokens, 9 tensors, 160 KiB), unsigned and signed, in
    kvmlx's own container (version 1: the preamble these tests take apart)."""
    from kvmlx.runtime.publish import publish
    from kvmlx.artifact.trust import signer

    tokens = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over.")[:12]
    publish(tiny, tokens, work / "base.kvmlx", chunk_size=8, format_version=1)
    publish(tiny, tokens, work / "signed.kvmlx", chunk_size=8, sign=signer(signing_key), format_version=1)
    return Bases(((work / "base.kvmlx").read_bytes(), (work / "signed.kvmlx").read_bytes()))


@pytest.fixture(scope="module")
def v3_bases(work, tiny, signing_key):
    """The same document as `bases` in version 3 (the writer's default), unsigned and signed."""
    from kvmlx.runtime.publish import publish
    from kvmlx.artifact.trust import signer

    tokens = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over.")[:12]
    publish(tiny, tokens, work / "base-v3.kvmlx", chunk_size=8)
    publish(tiny, tokens, work / "signed-v3.kvmlx", chunk_size=8, sign=signer(signing_key))
    return Bases(((work / "base-v3.kvmlx").read_bytes(), (work / "signed-v3.kvmlx").read_bytes()))


def run(work: Path, raw: bytes, lm, cls: str) -> str:
    """Write `raw` to a fresh file, do what a loader does with it, count and return the outcome."""
    path = work / f"case{next(_names)}.kvmlx"
    path.write_bytes(raw)
    try:
        outcome = attempt(path, lm)
    finally:
        path.unlink()
    RESULTS[(cls, outcome)] += 1
    return outcome


def regions(raw: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of every kind of byte in a valid artifact."""
    if is_v3(raw):
        p = split_v3(raw)
        out = [("length", 0, 8), ("table", 8, 8 + len(p["text"])), ("table padding", 8 + len(p["text"]), p["data_offset"])]
    else:
        p = split(raw)
        head_end = 64 + p["header_len"] + SIGNATURE_BLOCK.size
        out = [("preamble", 0, 64), ("header", 64, 64 + p["header_len"]), ("signature block", 64 + p["header_len"], head_end),
               ("header padding", head_end, p["data_offset"])]
    for t in header_of(raw)["tensors"]:
        out.append(("tensor data", t["offset"], t["offset"] + t["nbytes"]))
        if align(t["offset"] + t["nbytes"]) > t["offset"] + t["nbytes"]:
            out.append(("tensor padding", t["offset"] + t["nbytes"], align(t["offset"] + t["nbytes"])))
    return [r for r in out if r[2] > r[1]]


# ---------------------------------------------------------------- bit flips


@pytest.mark.parametrize("which", ["unsigned", "signed", "v3 unsigned", "v3 signed"])
def test_every_single_bit_flip_is_refused(work, tiny, bases, v3_bases, which):
    """No byte of an artifact is unchecked: a flip anywhere is refused (header or table, signature, padding, data)."""
    raw = (v3_bases if which.startswith("v3") else bases)[which.endswith(" signed") or which == "signed"]

    @fuzz(300)
    @given(st.data())
    def prop(data):
        name, lo, hi = data.draw(st.sampled_from(regions(raw)), label="region")
        at = data.draw(st.integers(lo, hi - 1), label="offset")
        bit = data.draw(st.integers(0, 7), label="bit")
        flipped = bytearray(raw)
        flipped[at] ^= 1 << bit
        outcome = run(work, bytes(flipped), tiny, f"bit flip ({which})")
        assert outcome != "accepted", f"flipping bit {bit} of byte {at} ({name}) was not noticed"

    prop()


@pytest.mark.parametrize("which", ["unsigned", "signed"])
def test_every_preamble_and_signature_bit(work, tiny, bases, which):
    """Exhaustively: all 8 x (64 + 96) bits of the preamble and the signature block."""
    raw = bases[which == "signed"]
    hlen = split(raw)["header_len"]
    for at in [*range(64), *range(64 + hlen, 64 + hlen + SIGNATURE_BLOCK.size)]:
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[at] ^= 1 << bit
            assert run(work, bytes(flipped), tiny, f"preamble/signature bit flips ({which})") != "accepted", (at, bit)


# ---------------------------------------------------------------- truncation and extension


@pytest.mark.parametrize("version", [1, 3])
def test_truncation_at_every_section_boundary(work, tiny, bases, v3_bases, version):
    raw = (bases if version == 1 else v3_bases)[1]
    cuts = sorted({c + d for c in boundaries(raw) for d in (-1, 0, 1) if 0 <= c + d < len(raw)})
    for cut in cuts:
        assert run(work, raw[:cut], tiny, "truncation at a boundary").startswith("read:"), cut


@fuzz(100)
@given(st.data())
def test_truncation_and_extension_at_random_lengths(work, tiny, bases, v3_bases, data):
    raw = data.draw(st.sampled_from([bases[0], v3_bases[0]]), label="base")
    if data.draw(st.booleans(), label="extend"):
        tail = data.draw(st.binary(min_size=1, max_size=3 * ALIGN), label="tail")
        outcome = run(work, raw + tail, tiny, "extension")
    else:
        outcome = run(work, raw[: data.draw(st.integers(0, len(raw) - 1), label="length")], tiny, "truncation")
    assert outcome.startswith("read:")


# ---------------------------------------------------------------- lying preamble fields


@fuzz(150)
@given(st.data())
def test_lying_preamble_fields(work, tiny, bases, data):
    raw = bases[0]
    p = split(raw)
    field = data.draw(st.sampled_from(["version", "flags", "header_len", "data_offset"]), label="field")
    bits = 32 if field in ("version", "flags") else 64
    special = [0, 1, 2, 63, 64, ALIGN - 1, ALIGN, ALIGN + 1, (1 << 31), (1 << bits) - 1, 64 << 20, len(raw), len(raw) + 1,
               p["header_len"] - 1, p["header_len"] + 1, p["data_offset"] - ALIGN, p["data_offset"] + ALIGN]
    value = data.draw(st.sampled_from([v for v in special if 0 <= v < 1 << bits]) | st.integers(0, (1 << bits) - 1), label="value")
    original = {"version": 1, "flags": 0, "header_len": p["header_len"], "data_offset": p["data_offset"]}[field]
    outcome = run(work, set_preamble(raw, field, value), tiny, "lying preamble field")
    assert outcome != "accepted" or value == original


# ---------------------------------------------------------------- lying structure in a re-digested header

STRUCTURAL = [
    ("tensor", "offset"), ("tensor", "nbytes"), ("tensor", "shape"), ("tensor", "dtype"), ("tensor", "encoding"),
    ("tensor", "digest"), ("tensor", "name"), ("model", "num_layers"), ("model", "num_kv_heads"), ("model", "head_dim"),
    ("kv", "num_tokens"), ("kv", "dtype"), ("kv", "layout"), ("kv", "encoding"), ("top", "file_bytes"),
    ("top", "format"), ("top", "version"), ("top", "digest"), ("tensors", "list"),
]


def lie_values(original):
    ints = st.sampled_from([0, 1, -1, 2, ALIGN, ALIGN - 1, ALIGN + 1, 1 << 20, 1 << 31, 1 << 40, 1 << 62, 1 << 63, 1 << 64])
    near = st.integers(-3 * ALIGN, 3 * ALIGN).map(lambda d: original + d) if type(original) is int else st.nothing()
    words = st.sampled_from(["raw", "float16", "bfloat16", "float32", "float64", "int8", "q4", "q8", "bytesplit-zstd",
                             "layers.0.keys", "layers.0.values", "logits", "BHLD", "kvmlx", "blake3", "", "0" * 64])
    shapes = st.lists(st.integers(-1, 40), max_size=5) | st.lists(st.sampled_from([0, 1, 2, 12, 32, 1 << 40]), max_size=5)
    other = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8) | st.just([]) | st.just({})
    return ints | near | words | shapes | st.integers() | other


@fuzz(500)
@given(st.data())
def test_lying_structure_in_a_redigested_header(work, tiny, bases, data):
    """Only the structure checks can catch these: the digest is right. Anything accepted must load the
    very same KV as the original."""
    raw = bases[0]
    h = header_of(raw)
    where, field = data.draw(st.sampled_from(STRUCTURAL), label="field")
    if where == "tensor":
        target = data.draw(st.sampled_from(h["tensors"]), label="tensor")
    else:
        target = {"model": h["model"], "kv": h["kv"], "top": h, "tensors": h}[where]
    if where == "tensors":
        op = data.draw(st.sampled_from(["drop", "duplicate", "swap", "reverse"]), label="op")
        ts = h["tensors"]
        i, j = data.draw(st.integers(0, len(ts) - 1)), data.draw(st.integers(0, len(ts) - 1))
        if op == "drop":
            ts.pop(i)
        elif op == "duplicate":
            ts.append(dict(ts[i]))
        elif op == "swap":
            ts[i]["offset"], ts[j]["offset"] = ts[j]["offset"], ts[i]["offset"]
        else:
            ts.reverse()
    else:
        target[field] = data.draw(lie_values(target.get(field)), label="value")
    outcome = run(work, rebuild(raw, h), tiny, "lying structure (re-digested)")
    if outcome == "accepted":
        _assert_same_kv(work, raw, rebuild(raw, h), tiny)


def _assert_same_kv(work, original: bytes, changed: bytes, lm) -> None:
    import mlx.core as mx
    import numpy as np

    from kvmlx.runtime.load import load_artifact

    a, b = work / "same-a.kvmlx", work / "same-b.kvmlx"
    a.write_bytes(original)
    b.write_bytes(changed)
    x, y = load_artifact(a, lm), load_artifact(b, lm)
    assert x.tokens == y.tokens and len(x.caches) == len(y.caches)
    for cx, cy in zip(x.caches, y.caches):
        for u, v in ((cx.keys, cy.keys), (cx.values, cy.values)):
            n = x.header["kv"]["num_tokens"]
            bits = mx.uint16 if u.dtype.size == 2 else mx.uint32
            assert np.array_equal(np.array(u[..., :n, :].view(bits)), np.array(v[..., :n, :].view(bits)))


# ---------------------------------------------------------------- random JSON anywhere in the header

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@fuzz(500)
@given(st.data())
def test_random_json_in_every_header_field(work, tiny, bases, data):
    """Replace any value (or delete any key, or add one) anywhere in the header; re-digest and sign."""
    from kvmlx.artifact.trust import generate_key, signer

    raw = bases[1]
    h = header_of(raw)
    path = data.draw(st.sampled_from(list(paths_in(h))), label="path")
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "add key"]), label="op")
    if op == "replace" or not path:
        h = replace_at(h, path, data.draw(json_values, label="value"))
    elif op == "delete":
        parent = h
        for k in path[:-1]:
            parent = parent[k]
        parent.pop(path[-1])
    else:
        parent = h
        for k in path:
            parent = parent[k]
        if isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8), label="key")] = data.draw(json_values, label="value")
    resign = data.draw(st.booleans(), label="re-sign")
    sign = signer(generate_key()) if resign else None
    if run(work, rebuild(raw, h, sign=sign), tiny, "random JSON value in a header field") == "accepted":
        ACCEPTED_FIELDS[".".join(str(k) for k in path[:2]) + (f" ({op})" if op != "replace" else "")] += 1


# ---------------------------------------------------------------- encoded (compressed, quantised) tensors

ENCODED = ["expsplit-zstd", "bytesplit-zstd", "q4", "q8", "int8-tensor"]


@pytest.fixture(scope="module")
def encoded_bases(work, tiny):
    from kvmlx.artifact.format import ENCODINGS
    from kvmlx.runtime.publish import publish

    tokens = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over.")[:12]
    out = {}
    for encoding in ENCODED:
        if encoding in ENCODINGS:
            publish(tiny, tokens, work / f"{encoding}.kvmlx", chunk_size=8, encoding=encoding, format_version=1)
            out[encoding] = (work / f"{encoding}.kvmlx").read_bytes()
    return out


@fuzz(200)
@given(st.data())
def test_hostile_encoded_tensors(work, tiny, encoded_bases, data):
    """A malicious publisher controls an encoded tensor's bytes and parameters and digests them
    correctly: decoding must refuse (typed) or produce a tensor of the declared shape, never crash."""
    import blake3

    assert encoded_bases, "every encoding of kvmlx.artifact.format.ENCODINGS must have a base artifact"
    encoding = data.draw(st.sampled_from(sorted(encoded_bases)), label="encoding")
    raw = encoded_bases[encoding]
    h = header_of(raw)
    t = data.draw(st.sampled_from([t for t in h["tensors"] if t["name"] != "logits"]), label="tensor")
    blob = bytearray(raw[t["offset"] : t["offset"] + t["nbytes"]])
    op = data.draw(st.sampled_from(["flip", "random bytes", "params", "zero"]), label="op")
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "random bytes":
        blob[:] = data.draw(st.binary(min_size=len(blob), max_size=len(blob)), label="blob")
    elif op == "zero":
        blob[:] = bytes(len(blob))
    if op == "params" or data.draw(st.booleans(), label="also params"):
        entry = next(e for e in h["tensors"] if e["name"] == t["name"])
        params = entry.get("params") or {}
        keys = sorted(params) + [data.draw(st.text(max_size=6), label="new key")]
        key = data.draw(st.sampled_from(keys), label="param")
        params[key] = data.draw(json_values | st.sampled_from([0, -1, 1 << 70, 1e308, -1e308, 1e-320, [0], [1 << 40], ""]), label="value")
        entry["params"] = params
    for e in h["tensors"]:
        if e["name"] == t["name"]:
            e["digest"] = blake3.blake3(bytes(blob)).hexdigest()
    out = bytearray(raw)
    out[t["offset"] : t["offset"] + t["nbytes"]] = blob
    run(work, rebuild(bytes(out), h), tiny, f"hostile encoded tensor ({encoding})")


def test_zstd_decompression_bomb_is_refused(work, tiny, encoded_bases):
    """Frames declaring 256 MB each behind a 1.5 KB tensor: refused before anything is decoded (the
    subprocess test checks the memory too)."""
    zstd = [e for e in encoded_bases if e.endswith("-zstd")]
    assert zstd, "bytesplit-zstd and expsplit-zstd exist"
    for encoding in zstd:
        assert run(work, zstd_bomb(encoded_bases[encoding]), tiny, "zstd decompression bomb") == "load:ArtifactError"


# ---------------------------------------------------------------- the hand-made corpus, in process


def test_hand_made_corpus(work, tiny, bases):
    outcomes = {name: run(work, raw, tiny, "hand-made corpus") for name, raw in corpus(*bases).items()}
    # every entry is hostile except these, which are well-formed: accepted by the API (the CLI refuses
    # a path as a model id, and the signature status of a zero-signature file is refused separately)
    harmless = {"deep JSON in a field (900 levels)", "model id absolute path"}
    accepted = {n for n, o in outcomes.items() if o == "accepted"}
    assert accepted <= harmless, sorted(accepted - harmless)
    assert outcomes["token id past the vocabulary"] == "load:ModelMismatchError"
    assert outcomes["num_layers 2^20"].startswith("read:")


def test_hand_made_v3_corpus(work, tiny, v3_bases):
    """Version 3's hostile files (tables that list the tensors otherwise than the header, lying metadata
    and length fields, plain safetensors, ...) through the loader with the tiny model: none accepted."""
    assert run(work, v3_bases[0], tiny, "v3 corpus (valid base)") == "accepted"
    outcomes = {name: run(work, raw, tiny, "v3 hand-made corpus") for name, raw in corpus_v3(*v3_bases).items()}
    accepted = sorted(n for n, o in outcomes.items() if o == "accepted")
    assert not accepted, accepted
    assert outcomes["table: dtype changed"] == "read:ArtifactError"
    assert outcomes["signed: signature altered"] == "load:BadSignatureError"
    assert outcomes["tensor bit flipped"] == "verify:IntegrityError"


# ---------------------------------------------------------------- version 2: cache families, checkpoints, --kv-bits


@pytest.fixture(scope="module")
def v2_bases(work, preset, tiny):
    """Valid version-2 artifacts: hybrid (recurrent state) and sliding-window (past its 32-token window)
    documents with state checkpoints, and a --kv-bits 8 one: name -> (bytes, model)."""
    from kvmlx.caches import KVQuantization
    from kvmlx.runtime.publish import publish

    out = {}
    for name, n in (("hybrid", 40), ("sliding", 48)):
        lm = preset(name)
        tokens = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over. " * 4)[:n]
        publish(lm, tokens, work / f"{name}.kvmlx", chunk_size=8, checkpoint_every=16, format_version=2)
        out[name] = ((work / f"{name}.kvmlx").read_bytes(), lm)
    tokens = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over.")[:12]
    publish(tiny, tokens, work / "q8.kvmlx", chunk_size=8, kv_quant=KVQuantization(8, 32, 0), format_version=2)
    out["q8"] = ((work / "q8.kvmlx").read_bytes(), tiny)
    return out


@pytest.mark.parametrize("name", ["hybrid", "sliding"])
def test_hand_made_v2_corpus(work, v2_bases, name):
    raw, lm = v2_bases[name]
    assert run(work, raw, lm, "v2 corpus (valid base)") == "accepted"
    outcomes = {case: run(work, bad, lm, "v2 hand-made corpus") for case, bad in corpus_v2(raw).items()}
    accepted = sorted(n for n, o in outcomes.items() if o == "accepted")
    assert not accepted, accepted
    assert outcomes["checkpoint off a chunk boundary"] == "read:ArtifactError"
    if name == "sliding":
        assert outcomes["window smaller than the model's"] == "load:CacheMismatchError"


V2_FIELDS = ("caches", "checkpoints", "kv")


@fuzz(300)
@given(st.data())
def test_random_json_in_the_v2_fields(work, v2_bases, data):
    """Any value (or a deleted or added key) anywhere under caches, checkpoints or kv of a version-2
    header, re-digested: refused with a typed one-line error, or loaded and continued without a crash."""
    name = data.draw(st.sampled_from(sorted(v2_bases)), label="base")
    raw, lm = v2_bases[name]
    h = header_of(raw)
    path = data.draw(st.sampled_from([p for p in paths_in(h, limit_list=4) if p and p[0] in V2_FIELDS]), label="path")
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "add key"]), label="op")
    if op == "replace":
        h = replace_at(h, path, data.draw(json_values | st.integers(-2, 70), label="value"))
    else:
        parent = h
        for k in path[:-1] if op == "delete" else path:
            parent = parent[k]
        if op == "delete" and isinstance(parent, dict):
            parent.pop(path[-1])
        elif op == "delete" and isinstance(parent, list):
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8), label="key")] = data.draw(json_values, label="value")
    bad = work / f"v2case{next(_names)}.kvmlx"
    bad.write_bytes(rebuild(raw, h))
    try:
        outcome = attempt(bad, lm, deep=True)
    finally:
        bad.unlink()
    RESULTS[("random JSON in a v2 field", outcome)] += 1


# ---------------------------------------------------------------- a sample in a separate process


def mutants(raw: bytes, signed: bytes, rng: random.Random, n: int,
            kinds: tuple[str, ...] = ("bit flip", "truncation", "structure lie", "random JSON")) -> list[tuple[str, bytes]]:
    """Random hostile variants for the subprocess run (same classes as the properties above)."""
    out = []
    h0 = header_of(raw)
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "bit flip":
            base = rng.choice([raw, signed])
            name, lo, hi = rng.choice(regions(base))
            b = bytearray(base)
            b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
            out.append((kind, bytes(b)))
        elif kind == "truncation":
            out.append((kind, raw[: rng.randrange(len(raw))]))
        else:
            h = json.loads(json.dumps(h0))
            if kind == "structure lie":
                t = rng.choice(h["tensors"])
                field = rng.choice(["offset", "nbytes", "shape", "dtype", "encoding", "name"])
                t[field] = rng.choice([0, -1, 1 << 62, ALIGN + 2, t.get("offset", 0) + ALIGN, [1, 1 << 40], "int8", "q4",
                                       "bytesplit-zstd", "logits", None])
            else:
                path = rng.choice(list(paths_in(h)))
                h = replace_at(h, path, rng.choice([None, True, 0, -1, 1 << 70, 1.5, "", "x" * 1000, [], {}, [[[]]], {"a": [1]}]))
            out.append((kind, rebuild(raw, h)))
    return out


def test_hostile_files_in_a_subprocess(work, tiny, bases, v3_bases, encoded_bases):
    """Load a sample in a child process doing everything a loader and an agent might (continue,
    --verify, spot check): a segfault, abort, hang or memory blow-up fails the test, naming the file."""
    rng = random.Random()
    seed = rng.randrange(1 << 32)
    rng.seed(seed)
    cases = list(corpus(*bases).items()) + mutants(*bases, rng, 200 * SCALE)
    cases += list(corpus_v3(*v3_bases).items()) + mutants(*v3_bases, rng, 50 * SCALE, kinds=("bit flip", "truncation"))
    cases += [(f"zstd bomb ({e})", zstd_bomb(raw)) for e, raw in encoded_bases.items() if e.endswith("-zstd")]
    folder = work / "subprocess"
    folder.mkdir(exist_ok=True)
    files, labels = [], []
    for i, (label, raw) in enumerate(cases):
        path = folder / f"{i:05d}.kvmlx"
        path.write_bytes(raw)
        files.append(str(path))
        labels.append(label)
    (folder / "warmup.kvmlx").write_bytes(bases[1])
    outcomes, crashes, untyped, blowups = {}, [], [], []
    start = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    while start < len(files):
        manifest = folder / "manifest.json"
        manifest.write_text(json.dumps({"files": files, "start": start, "warmup": str(folder / "warmup.kvmlx")}))
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fuzz_corpus.py"), "worker", str(manifest)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        current = None
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for line in out.splitlines():
            parts = line.split(" ", 3)
            if parts[0] == "start":
                current = int(parts[1])
            elif parts[0] == "end":
                i, growth, outcome = int(parts[1]), int(parts[2]), parts[3]
                outcomes[i] = outcome
                current = None
                size = os.path.getsize(files[i])
                if outcome.startswith("UNTYPED"):
                    untyped.append((labels[i], outcome))
                if growth > 4 * size + (64 << 20):
                    blowups.append((labels[i], size, growth))
        if proc.returncode != 0 or current is not None:
            crashed = current if current is not None else start
            crashes.append((labels[crashed], proc.returncode, err.strip().splitlines()[-1:] if err.strip() else ""))
            outcomes[crashed] = f"CRASH rc={proc.returncode}"
            start = crashed + 1
        else:
            start = len(files)
    for i, outcome in outcomes.items():
        RESULTS[(f"subprocess: {labels[i] if labels[i] in ('bit flip', 'truncation', 'structure lie', 'random JSON') else 'hand-made corpus'}", outcome)] += 1
    assert not (crashes or untyped or blowups), (
        f"seed {seed}: loader process died on {crashes}; untyped errors {untyped[:5]}; "
        f"memory grew far beyond the file size (label, file bytes, peak growth) {blowups[:5]}")
    assert len(outcomes) == len(files)
    for i, outcome in outcomes.items():
        if labels[i] in ("bit flip", "truncation"):
            assert outcome != "accepted", (labels[i], files[i])
