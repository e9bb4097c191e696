"""The content-addressed store and its prefix index: add/ls/rm/gc, lookup, rebuild, concurrency, crashes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kvmlx.errors import ArtifactError, IntegrityError, KvmlxError
from kvmlx.artifact.format import read_header
from kvmlx.artifact.identity import model_fingerprint, tokenizer_fingerprint
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import publish
from kvmlx.runtime.store import Store, StoreError, artifact_key, header_key, parse_size

CHUNK = 16


def ident(lm):
    return model_fingerprint(lm), tokenizer_fingerprint(lm), lm.dtype


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny, toks):
    """Real artifacts of nested and unrelated token lists, published once for the module."""
    d = tmp_path_factory.mktemp("arts")
    specs = {
        "a40": toks[:40],
        "b100": toks[:100],
        "c5": toks[200:205],  # shorter than one block
        "d70": toks[300:370],
        "e33": toks[:33],
    }
    out = {}
    for name, t in specs.items():
        publish(tiny, t, d / f"{name}.kvmlx", chunk_size=CHUNK)
        out[name] = (d / f"{name}.kvmlx", t)
    return out


def test_add_ls_path_and_key(tmp_path, tiny, artifacts):
    store = Store(tmp_path / "s")
    src, tokens = artifacts["b100"]
    key = store.add(src)
    assert key == artifact_key(*ident(tiny), tokens) == header_key(read_header(src))
    assert store.path(key) == tmp_path / "s" / "objects" / f"{key}.kvmlx"
    assert store.path(key[:8]) == store.path(key)  # unique prefixes resolve
    assert store.path(key).read_bytes() == src.read_bytes()
    assert store.path(key).stat().st_ino != src.stat().st_ino  # a copy: the source may change or go
    [entry] = store.ls()
    assert (entry.key, entry.num_tokens, entry.dtype, entry.chunk_size, entry.model_id) == (key, 100, "bfloat16", CHUNK, "builtin:tiny")
    assert entry.file_bytes == src.stat().st_size and entry.lossless
    assert store.add(src) == key and len(store.ls()) == 1  # idempotent
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    assert store.tokens(key) == tokens
    assert store.load(key, tiny).tokens == tokens


def test_add_refuses_corrupt_and_truncated(tmp_path, artifacts):
    store = Store(tmp_path / "s")
    src, _ = artifacts["a40"]
    data = bytearray(src.read_bytes())
    bad = tmp_path / "bad.kvmlx"
    t = next(t for t in read_header(src)["tensors"] if t["name"] == "layers.2.values")
    data[t["offset"] + t["nbytes"] // 2] ^= 1  # one bit inside one tensor's data
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.add(bad)
    short = tmp_path / "short.kvmlx"
    short.write_bytes(src.read_bytes()[:-16384])
    with pytest.raises(ArtifactError):
        store.add(short)
    assert store.ls() == []
    assert list(store.objects.iterdir()) == [] and list(store.tmp.iterdir()) == []


def test_rm_and_ls(tmp_path, artifacts):
    store = Store(tmp_path / "s")
    keys = {name: store.add(p) for name, (p, _) in artifacts.items()}
    assert {e.key for e in store.ls()} == set(keys.values())
    removed = store.rm(keys["a40"][:10])
    assert removed.key == keys["a40"] and not removed.path.exists()
    assert {e.key for e in store.ls()} == set(keys.values()) - {keys["a40"]}
    with pytest.raises(StoreError, match="no store entry"):
        store.rm(keys["a40"])
    with pytest.raises(StoreError, match="not a store key"):
        store.rm("xyz")
    with pytest.raises(StoreError):
        store.path(keys["a40"])
    assert Store(tmp_path / "s").get(keys["a40"]) is None  # gone for a fresh process too


def test_lookup_longest_prefix(tmp_path, tiny, toks, artifacts):
    store = Store(tmp_path / "s")
    keys = {name: store.add(p) for name, (p, _) in artifacts.items()}
    fp = ident(tiny)

    def hit(prompt):
        found = store.lookup(*fp, prompt)
        return None if found is None else (found[0].key, found[1])

    other = [t for t in range(1, 1024) if t not in toks][:50]
    assert hit(toks[:120]) == (keys["b100"], 100)  # prompt continues the longest document
    assert hit(toks[:70] + other) == (keys["b100"], 70)  # partial: diverges inside b100
    assert hit(toks[:40]) == (keys["a40"], 40)  # a40 and b100 both match 40: prefer the one ending there
    assert hit(toks[:36] + other) == (keys["a40"], 36)  # longer match wins over e33's complete 33
    assert hit(toks[:20] + other) == (keys["e33"], 20)  # ties at 20: shortest artifact (least to load)
    assert hit(toks[200:205] + other) == (keys["c5"], 5)  # shorter than one block: found too
    assert hit(toks[200:203]) == (keys["c5"], 3)
    assert hit(toks[300:400]) == (keys["d70"], 70)
    assert hit(other) is None
    assert store.lookup(*fp, toks[:120], min_tokens=101) is None
    assert store.lookup(*fp, toks[:120], exclude=[keys["b100"]])[0].key == keys["a40"]
    assert store.lookup(*fp, []) is None


def test_other_model_tokenizer_or_dtype_never_returned(tmp_path, models, toks):
    bf16, f32 = models("bfloat16"), models("float32")
    store = Store(tmp_path / "s")
    k32 = store.publish(f32, toks[:64], chunk_size=CHUNK).key
    m, t, d = ident(bf16)
    assert store.lookup(m, t, d, toks[:80]) is None  # same tokens, other dtype and weights
    assert store.lookup(*ident(f32), toks[:80])[0].key == k32
    assert store.lookup("blake3:other", t, "float32", toks[:80]) is None
    assert store.lookup(ident(f32)[0], "blake3:other", "float32", toks[:80]) is None
    # a synthetic index row for another model, longer and matching: still never returned for f32
    fake = _fake_header(toks[:80], model_fp="blake3:other-model", tokenizer_fp=ident(f32)[1], dtype="float32")
    store.index.insert(header_key(fake), fake, False, time.time(), time.time())
    assert store.lookup(*ident(f32), toks[:80])[0].key == k32


def test_publish_into_store_and_dedupe(tmp_path, tiny, document):
    store = Store(tmp_path / "s")
    calls = []
    first = store.publish(tiny, document[:300], chunk_size=CHUNK, progress=lambda d, t: calls.append(d))
    assert not first.existed and first.result.num_tokens == first.entry.num_tokens and calls
    assert first.result.path == first.entry.path and first.entry.path.exists()
    assert first.entry.text_blake3 is not None
    again = store.publish(tiny, document[:300], chunk_size=CHUNK, progress=lambda d, t: calls.append(-1))
    assert again.existed and again.result is None and again.key == first.key and -1 not in calls
    assert len(store.ls()) == 1 and list(store.tmp.iterdir()) == []


def test_gc_keeps_budget_and_evicts_lru(tmp_path, artifacts):
    store = Store(tmp_path / "s")
    keys = {name: store.add(p) for name, (p, _) in artifacts.items()}
    order = ["d70", "a40", "c5", "b100", "e33"]  # least to most recently used
    for i, name in enumerate(order):
        store.touch(keys[name], when=1_000_000 + i)
    sizes = {e.key: e.file_bytes for e in store.ls()}
    assert [e.key for e in store.ls()] == [keys[n] for n in reversed(order)]
    assert store.gc().evicted == []  # no budget: nothing evicted
    budget = sizes[keys["b100"]] + sizes[keys["e33"]] + 1
    result = store.gc(budget)
    assert result.evicted == [keys["d70"], keys["a40"], keys["c5"]]
    assert store.total_bytes() <= budget and result.kept_bytes == store.total_bytes()
    assert {e.key for e in store.ls()} == {keys["b100"], keys["e33"]}
    assert not store._object(keys["d70"]).exists() and store._object(keys["e33"]).exists()
    store.touch(keys["b100"])  # now e33 is the least recently used
    assert store.gc(sizes[keys["b100"]]).evicted == [keys["e33"]]
    assert store.gc(0).evicted == [keys["b100"]] and store.ls() == []
    assert list(store.objects.iterdir()) == []


def test_parse_size():
    assert parse_size("1500") == 1500 and parse_size("10M") == 10_000_000 and parse_size("1GiB") == 1 << 30
    assert parse_size("2.5k") == 2500 and parse_size(7) == 7
    with pytest.raises(ValueError):
        parse_size("ten")


def test_index_is_rebuilt_from_files(tmp_path, tiny, toks, artifacts):
    root = tmp_path / "s"
    store = Store(root)
    keys = {name: store.add(p) for name, (p, _) in artifacts.items()}
    store.touch(keys["c5"], when=2_000_000)
    store.touch(keys["b100"], when=2_000_001)
    before = [(e.key, e.num_tokens) for e in store.ls()]
    store.close()

    (root / "index.sqlite").unlink()  # missing index
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    again = Store(root)
    assert sorted(before) == sorted((e.key, e.num_tokens) for e in again.ls())
    lru = [e.key for e in again.ls()][-2:]
    assert lru == [keys["b100"], keys["c5"]]  # last use survives through the files' mtimes
    assert again.lookup(*ident(tiny), toks[:120])[0].key == keys["b100"]
    again.close()

    (root / "index.sqlite").write_bytes(b"this is not a database" * 100)  # corrupt index
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    third = Store(root)
    assert sorted(before) == sorted((e.key, e.num_tokens) for e in third.ls())
    assert third.lookup(*ident(tiny), toks[:70])[1] == 70

    # an open store whose index is replaced by garbage underneath recovers on its next query
    third.index.db()
    (root / "index.sqlite").unlink()
    (root / "index.sqlite").write_bytes(b"garbage" * 1000)
    assert len(third.ls()) == len(before)

    res = third.reindex()
    assert res.indexed == len(before) and len(third.ls()) == len(before)


def test_sync_reconciles_files_and_rows(tmp_path, tiny, artifacts):
    root = tmp_path / "s"
    store = Store(root)
    k_a = store.add(artifacts["a40"][0])
    k_b = store.add(artifacts["b100"][0])
    store._object(k_a).unlink()  # removed behind the store's back: row must go
    os.link(artifacts["d70"][0], root / "objects" / f"{header_key(read_header(artifacts['d70'][0]))}.kvmlx")  # dropped in
    (root / "objects" / f"{'0' * 64}.kvmlx").write_bytes(artifacts["c5"][0].read_bytes())  # wrong name for its content
    res = Store(root).sync()
    keys = {e.key for e in Store(root).ls()}
    assert k_b in keys and k_a not in keys and "0" * 64 not in keys and len(keys) == 2
    assert f"{'0' * 64}.kvmlx" in res.skipped


# ---- many entries ------------------------------------------------------------------------------

def _fake_header(tokens, *, model_fp, tokenizer_fp, dtype="bfloat16", file_bytes=100_000):
    return {
        "model": {"id": "synthetic", "fingerprint": model_fp},
        "tokenizer": {"fingerprint": tokenizer_fp},
        "kv": {"dtype": dtype, "num_tokens": len(tokens), "chunk_size": CHUNK},
        "document": {"tokens": [int(t) for t in tokens]},
        "file_bytes": file_bytes,
    }


def _lcp(a, b):
    n = min(len(a), len(b))
    d = np.flatnonzero(a[:n] != b[:n])
    return int(d[0]) if d.size else n


def test_many_entries_longest_match_without_opening_files(tmp_path, tiny, toks, artifacts):
    """2000 synthetic index rows (no files) + real artifacts in one bucket: lookup picks the longest
    match (checked against a brute-force scan) and never opens an artifact file."""
    store = Store(tmp_path / "s")
    real = {name: store.add(p) for name, (p, _) in artifacts.items()}
    m, t, d = ident(tiny)
    rng = np.random.default_rng(7)
    system = rng.integers(3, 1024, 20).tolist()  # a shared chat-style system prefix
    rows = []
    for i in range(2000):
        kind = i % 4
        if kind == 0:
            tk = system + rng.integers(3, 1024, int(rng.integers(50, 700))).tolist()
        elif kind == 1:
            base = rows[int(rng.integers(0, len(rows)))] if rows else system
            tk = base[: int(rng.integers(1, len(base) + 1))] + rng.integers(3, 1024, int(rng.integers(1, 200))).tolist()
        elif kind == 2:
            tk = toks[: int(rng.integers(1, 30))] + rng.integers(3, 1024, int(rng.integers(1, 400))).tolist()
        else:
            tk = rng.integers(3, 1024, int(rng.integers(1, 900))).tolist()
        rows.append(tk)
    t0 = time.perf_counter()
    for tk in rows:
        h = _fake_header(tk, model_fp=m, tokenizer_fp=t, dtype=d)
        store.index.insert(header_key(h), h, False, 1.0, 1.0)
    insert_s = time.perf_counter() - t0
    everything = rows + [tk for _, tk in artifacts.values()]
    arrays = [np.asarray(tk) for tk in everything]
    keys_of = {header_key(_fake_header(tk, model_fp=m, tokenizer_fp=t, dtype=d)): tk for tk in rows}
    keys_of.update({real[name]: tk for name, (_, tk) in artifacts.items()})

    prompts = []
    for i in range(60):
        src = everything[int(rng.integers(0, len(everything)))]
        cut = int(rng.integers(1, len(src) + 1))
        prompts.append(src[:cut] + rng.integers(3, 1024, int(rng.integers(0, 300))).tolist())
    prompts += [toks[:120], toks[:70] + [5, 6, 7], system + [1, 2, 3], toks[200:205] + [9] * 40]

    import kvmlx.artifact.format as fmt

    opened = []
    real_init = fmt.Artifact.__init__

    def spy(self, path, *a, **k):
        opened.append(path)
        return real_init(self, path, *a, **k)

    fmt.Artifact.__init__ = spy
    times = []
    try:
        for p in prompts:
            t1 = time.perf_counter()
            found = store.lookup(m, t, d, p)
            times.append(time.perf_counter() - t1)
            best = max(_lcp(np.asarray(p), a) for a in arrays)
            if best == 0:
                assert found is None
                continue
            entry, matched = found
            assert matched == best, (matched, best)
            assert _lcp(np.asarray(p), np.asarray(keys_of[entry.key])) == best
    finally:
        fmt.Artifact.__init__ = real_init
    assert opened == []
    assert store.lookup(m, t, d, toks[:120])[0].key == real["b100"]

    t1 = time.perf_counter()
    for p in prompts:
        max(_lcp(np.asarray(p), a) for a in arrays)
    scan = (time.perf_counter() - t1) / len(prompts)
    ms = np.array(times) * 1e3
    print(f"\n[store] {len(everything)} entries ({len(rows)} synthetic): insert {insert_s:.2f} s; lookup median "
          f"{np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms, max {ms.max():.2f} ms "
          f"(brute-force scan of the token lists in memory: {scan * 1e3:.1f} ms)")
    # rows without files are dropped by the next sync, the real ones stay
    store.sync()
    assert {e.key for e in store.ls()} == set(real.values())


# ---- several processes -------------------------------------------------------------------------

def _spawn(code, *args):
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


ADD_CHILD = """
    import os, sys, time
    from kvmlx.runtime.store import Store
    root, art, go = sys.argv[1:4]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    keys = {Store(root).add(art) for _ in range(3)}
    print(*keys, flush=True)
"""


@pytest.mark.slow  # racing processes: a stress run (.ci/run's slow step)
def test_processes_racing_on_one_key_leave_one_valid_artifact(tmp_path, tiny, toks, artifacts):
    root, go = tmp_path / "fresh-store", tmp_path / "go"  # the store does not exist yet: creation races too
    src, tokens = artifacts["b100"]
    procs = [_spawn(ADD_CHILD, root, src, go) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    keys = {o[0].strip() for o in outs}
    assert len(keys) == 1
    key = keys.pop()
    store = Store(root)
    assert [e.key for e in store.ls()] == [key]
    assert [f.name for f in store.objects.iterdir()] == [f"{key}.kvmlx"]
    assert list(store.tmp.iterdir()) == []
    loaded = load_artifact(store.path(key), tiny)  # every digest verified
    assert loaded.tokens == tokens


PUBLISH_CHILD = """
    import os, sys, time
    from kvmlx.models import load_model
    from kvmlx.runtime.store import Store
    root, doc, go = sys.argv[1:4]
    lm = load_model("builtin:tiny")
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    r = Store(root).publish(lm, open(doc, encoding="utf-8").read(), chunk_size=16)
    print(r.key, r.existed, flush=True)
"""


@pytest.mark.slow  # racing processes: a stress run (.ci/run's slow step)
def test_concurrent_publishers_and_readers(tmp_path, tiny, document):
    """Two processes publish the same document while this one keeps listing and loading: every
    entry a reader ever sees loads with valid digests, and the store ends with one entry."""
    root, go, doc = tmp_path / "s", tmp_path / "go", tmp_path / "doc.txt"
    doc.write_text(document, encoding="utf-8")
    procs = [_spawn(PUBLISH_CHILD, root, doc, go) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    while any(p.poll() is None for p in procs):
        for e in Store(root).ls():
            assert load_artifact(e.path, tiny).tokens == tiny.tokenizer.encode(document)
        time.sleep(0.05)
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    keys = {o[0].split()[0] for o in outs}
    assert len(keys) == 1
    store = Store(root)
    assert [e.key for e in store.ls()] == list(keys)
    assert len(list(store.objects.iterdir())) == 1 and list(store.tmp.iterdir()) == []


KILL_CHILD = """
    import os, sys, time
    import kvmlx.artifact.format as fmt
    import kvmlx.runtime.store.store as st  # the module whose Store._ingest calls header_key
    from kvmlx.models import load_model
    root, doc, phase = sys.argv[1:4]
    lm = load_model("builtin:tiny")

    def hang(marker):
        print(marker, flush=True)
        time.sleep(600)

    if phase == "write":  # the artifact's temp file is half written
        real, calls = fmt._write_all, []
        def partial(f, data):
            calls.append(1)
            if len(calls) == 2:
                view = memoryview(data).cast("B")
                real(f, view[: len(view) // 2])
                os.fsync(f.fileno())
                hang("mid-write")
            real(f, data)
        fmt._write_all = partial
    elif phase == "commit":  # staged copy complete and verified, about to be renamed into objects/
        st.header_key = lambda header: hang("commit")
    progress = (lambda done, total: done >= 48 and hang("mid-prefill")) if phase == "prefill" else None
    st.Store(root).publish(lm, open(doc, encoding="utf-8").read(), chunk_size=16, progress=progress)
    print("finished", flush=True)
"""


@pytest.mark.parametrize("phase", ["prefill", "write", "commit"])
def test_killed_writer_leaves_nothing_that_loads(tmp_path, tiny, document, phase):
    root, doc = tmp_path / "s", tmp_path / "doc.txt"
    doc.write_text(document, encoding="utf-8")
    proc = _spawn(KILL_CHILD, root, doc, phase)
    marker = proc.stdout.readline().strip()
    assert marker == {"prefill": "mid-prefill", "write": "mid-write", "commit": "commit"}[phase], proc.stderr.read()

    # while the writer lives, gc leaves its staging directory alone
    assert Store(root).gc().temp_removed == 0 and len(list((root / "tmp").iterdir())) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    store = Store(root)
    assert store.ls() == [] and list(store.objects.iterdir()) == []
    assert store.lookup(*ident(tiny), tiny.tokenizer.encode(document)) is None
    leftovers = [f for f in (root / "tmp").rglob("*") if f.is_file() and f.name != "lock"]
    assert bool(leftovers) == (phase != "prefill")  # the dead writer's files (none yet mid-prefill) ...
    for f in leftovers:  # ... and only a complete, verified staged copy (about to be committed) could load
        if phase == "commit":
            continue
        with pytest.raises(KvmlxError):
            load_artifact(f, tiny)
    result = store.gc()
    assert result.temp_removed == 1 and list((root / "tmp").iterdir()) == []
    assert store.publish(tiny, document, chunk_size=16).entry.num_tokens > 0  # the store still works


# ---- CLI (kvmlx/cli/ integration) -------------------------------------------------------------

def test_cli_store_commands(tmp_path, artifacts):
    import json

    from click.testing import CliRunner

    from kvmlx.cli import main

    def run(*args, code=0):
        result = CliRunner().invoke(main, ["store", "--dir", str(tmp_path / "s"), *map(str, args)])
        assert result.exit_code == code, result.output
        return result.output

    b = json.loads(run("add", artifacts["b100"][0], "--json"))
    assert b["tokens"] == 100 and b["lossless"] and b["encoding"] == "raw"
    a_line = run("add", artifacts["a40"][0])
    a_key = a_line.split()[0]
    assert len(a_key) == 64 and "40 tokens" in a_line
    listed = json.loads(run("ls", "--json"))
    assert {e["key"] for e in listed} == {a_key, b["key"]}
    assert b["key"][:16] in run("ls")
    assert run("rm", a_key[:8]).strip() == f"removed {a_key}"
    assert "no store entry" in run("rm", a_key, code=1)
    assert "invalid value" in run("gc", "--max-bytes", "ten", code=2).lower()
    gc = json.loads(run("gc", "--max-bytes", "1G", "--json"))
    assert gc["evicted"] == [] and gc["kept"] == 1
    assert json.loads(run("reindex", "--json"))["indexed"] == 1
    assert json.loads(run("gc", "--max-bytes", 0, "--json"))["evicted"] == [b["key"]]
    assert json.loads(run("ls", "--json")) == []
    bad = tmp_path / "bad.kvmlx"
    bad.write_bytes(b"not an artifact" * 10)
    out = run("add", bad, code=1)
    assert out.startswith("Error:") and len(out.strip().splitlines()) == 1
