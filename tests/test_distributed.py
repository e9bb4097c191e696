"""Tensor- and pipeline-parallel publish and load under MLX's launcher: 2 ranks on the ring backend over
127.0.0.1, spawned here, each bounded by a timeout and killed on failure.

What is proven through the saved files: `generate --verify` is token-exact (bit-identical logits) under
the layout the artifact was published in; each rank reads about its share of the bytes (counted by the
kernel, /proc/self/io); another layout, including one process, is refused by name; a part alone or a
tampered part is refused; a rank killed mid-publish leaves nothing that loads and the other rank
exits with a one-line error instead of hanging. Each launch costs seconds (two Python processes import
mlx-lm): the default suite launches only the two publishes and their `--verify` runs; the refusals and
faults under the launcher, the store and `serve` under it, and `bench --parallel` are marked `slow` and run
in CI's second step (.ci/run). One process's refusals of parallel artifacts run in the default suite.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvmlx.artifact.format import Artifact
from kvmlx.errors import KvmlxError, LayoutMismatchError
from kvmlx.models import load_model
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import publish

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:tiny-qwen2"
LAUNCH_TIMEOUT = 90
DOC = " ".join(f"Section {i}: the ring backend carries each rank's share of the KV over TCP." for i in range(24))
CHUNK = 64

def _launcher() -> str:
    local = Path(sys.executable).parent / "mlx.launch"
    return str(local) if local.exists() else shutil.which("mlx.launch")


def _free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _env(kvmlx_home: Path, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KVMLX_HOME=str(kvmlx_home), KVMLX_DIST_TIMEOUT="30")
    env.update(extra)
    return env


def launch(kvmlx_home: Path, *args: str, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n 2 -- python -m kvmlx ARGS` (killed, with its ranks, past `timeout`)."""
    cmd = [_launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()), "--",
           sys.executable, "-m", "kvmlx", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(kvmlx_home),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"mlx.launch {' '.join(args[:2])} did not finish within {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_json(kvmlx_home: Path, *args: str) -> dict:
    r = launch(kvmlx_home, *args, "--json")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip(), r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("doc") / "doc.txt"
    p.write_text(DOC, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def single(kvmlx_home, tmp_path_factory):
    """The same document published by one process: the reference for bytes."""
    lm = load_model(MODEL)
    out = tmp_path_factory.mktemp("single") / "doc.kvmlx"
    publish(lm, DOC, out, chunk_size=CHUNK)
    loaded = load_artifact(out, lm)
    return lm, out, loaded


_PUBLISHED: dict = {}


def _publish(mode: str, kvmlx_home: Path, doc_file: Path, tmp_path_factory):
    """Publish the document under the launcher in `mode` once per session: (mode, manifest, flags, --json)."""
    if mode not in _PUBLISHED:
        out = tmp_path_factory.mktemp(mode) / "doc.kvmlx"
        flags = ["--pipeline"] if mode == "pipeline" else []
        pub = launch_json(kvmlx_home, "publish", str(doc_file), "-m", MODEL, "-o", str(out), "--chunk-size", str(CHUNK), *flags)
        _PUBLISHED[mode] = (mode, out, flags, pub)
    return _PUBLISHED[mode]


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def published(request, kvmlx_home, doc_file, tmp_path_factory):
    return _publish(request.param, kvmlx_home, doc_file, tmp_path_factory)


@pytest.fixture(scope="module")
def tensor_parallel(kvmlx_home, doc_file, tmp_path_factory):
    return _publish("tensor", kvmlx_home, doc_file, tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline_parallel(kvmlx_home, doc_file, tmp_path_factory):
    return _publish("pipeline", kvmlx_home, doc_file, tmp_path_factory)


def test_verify_is_token_exact_under_the_same_layout(published, kvmlx_home, single):
    mode, out, flags, pub = published
    layout = pub["parallel"]["layout"]
    assert layout.startswith("tensor-parallel 2" if mode == "tensor" else "2 pipeline stages")
    report = launch_json(kvmlx_home, "generate", str(out), "-p", " Section 41:", "-n", "16", "--verify", *flags)
    assert report["token_exact"] and report["logits_identical"] and report["max_abs_logit_diff"] == 0.0
    assert report["tokens_compared"] == 16 and len(set(report["tokens"])) > 6  # greedy output varies
    assert report["reused_tokens"] == pub["tokens"] == len(single[2].tokens)
    assert report["parallel"]["layout"] == layout

    # each rank read its own part (plus the one-page manifest), about half of the single-process file
    single_bytes = single[2].bytes_read
    assert single_bytes is not None and single_bytes >= single[2].header["file_bytes"]
    manifest = Artifact(out)
    parts = manifest.header["parallel"]["parts"]
    manifest.close()
    for rank in report["parallel"]["ranks"]:
        part = parts[rank["rank"]]["file_bytes"]
        assert rank["part_bytes"] == part
        assert part <= rank["bytes_read"] <= part + 2 * 16384, rank
        assert 0.4 * single_bytes <= rank["bytes_read"] <= 0.6 * single_bytes, (rank, single_bytes)


def test_one_process_refuses_a_parallel_artifact_by_name(published, single):
    mode, out, _, _ = published
    lm = single[0]
    with pytest.raises(LayoutMismatchError) as e:
        load_artifact(out, lm)
    msg = str(e.value)
    assert "\n" not in msg and "one process" in msg
    assert ("tensor-parallel 2" if mode == "tensor" else "2 pipeline stages") in msg
    cli = subprocess.run([sys.executable, "-m", "kvmlx", "generate", str(out), "-n", "2"], capture_output=True,
                         text=True, timeout=LAUNCH_TIMEOUT, env=_env(Path(os.environ["KVMLX_HOME"])))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr and "one process" in cli.stderr


def test_a_part_alone_is_refused(published, single):
    _, out, _, _ = published
    for part in sorted(out.parent.glob(out.name + ".*")):
        with pytest.raises(LayoutMismatchError):
            load_artifact(part, single[0])


@pytest.mark.slow  # a refusal or fault injected under the launcher (one launch each): .ci/run's slow step
def test_the_other_layout_is_refused_under_the_launcher(tensor_parallel, kvmlx_home):
    """A tensor-parallel artifact loaded in pipeline stages (the other direction is the same check)."""
    _, out, _, _ = tensor_parallel
    r = launch(kvmlx_home, "generate", str(out), "-n", "2", "--pipeline")
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert lines, r.stderr
    assert "tensor-parallel 2" in lines[0] and "2 pipeline stages" in lines[0]


@pytest.mark.slow  # a refusal or fault injected under the launcher (one launch each): .ci/run's slow step
def test_a_tampered_part_is_refused_by_its_rank(pipeline_parallel, kvmlx_home, tmp_path):
    """One byte of rank 1's part flipped: rank 1 refuses its digest (rank 0's part is intact)."""
    _, out, flags, _ = pipeline_parallel
    copy = tmp_path / out.name
    for f in out.parent.glob(out.name + "*"):
        shutil.copy(f, tmp_path / f.name)
    part = sorted(tmp_path.glob(out.name + ".*rank1of2"))[0]
    data = bytearray(part.read_bytes())
    with Artifact(part) as art:
        data[art.tensors["layers.1.keys"].offset] ^= 1
    part.write_bytes(bytes(data))
    r = launch(kvmlx_home, "generate", str(copy), "-n", "2", *flags)
    assert "Traceback" not in r.stderr
    assert "rank 1: " in r.stderr and "does not match its digest" in r.stderr, r.stderr


CRASH_RANK = textwrap.dedent('''
    """Rank 1 of the crash test: SIGKILLs itself halfway through writing its part file."""
    import os, signal, sys
    from kvmlx.artifact import format as fmt

    real, calls = fmt._write_all, [0]

    def dying_write(f, data):
        calls[0] += 1
        if calls[0] == 3:  # the part's third tensor: the temp file holds some of the KV, no header yet
            os.kill(os.getpid(), signal.SIGKILL)
        real(f, data)

    fmt._write_all = dying_write
    from kvmlx.cli import main
    sys.argv[0] = "kvmlx"
    main()
''')


@pytest.mark.slow  # a refusal or fault injected under the launcher (one launch each): .ci/run's slow step
@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_rank_killed_mid_publish_leaves_nothing_that_loads(mode, kvmlx_home, doc_file, single, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "doc.kvmlx"
    script = tmp_path / "crash_rank.py"
    script.write_text(CRASH_RANK)
    port = _free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    args = ["publish", str(doc_file), "-m", MODEL, "-o", str(out), "--chunk-size", str(CHUNK), "--json"]
    args += ["--pipeline"] if mode == "pipeline" else []
    procs = []
    for rank, cmd in enumerate([[sys.executable, "-m", "kvmlx"], [sys.executable, str(script)]]):
        env = _env(kvmlx_home, MLX_HOSTFILE=str(hostfile), MLX_RANK=str(rank))
        procs.append(subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    t0 = time.monotonic()
    try:
        survivor_out, survivor_err = procs[0].communicate(timeout=LAUNCH_TIMEOUT)
        procs[1].communicate(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1, survivor_err
    assert time.monotonic() - t0 < LAUNCH_TIMEOUT
    errors = [line for line in survivor_err.splitlines() if line.strip() and not line.startswith("[ring]")]
    assert "Traceback" not in survivor_err and len(errors) == 1, survivor_err
    assert errors[0].startswith("Error: rank 0: lost the other ranks") and errors[0].count("rank 0") == 1
    assert not out.exists()  # no manifest: the publish did not happen
    left = list(out_dir.iterdir())
    assert not [p for p in left if p.name.endswith("rank0of2")]  # the survivor removed its own part
    for path in left:  # whatever else remains (a dead rank's temp file) does not load
        with pytest.raises(KvmlxError):
            load_artifact(path, single[0])


def test_store_keys_and_buckets_include_the_layout(published):
    from kvmlx.artifact.layout import header_layout
    from kvmlx.runtime.store import artifact_key, bucket_id, header_key

    _, out, _, _ = published
    with Artifact(out) as art:
        h = art.header
    layout = header_layout(h)
    fp, tok, dtype, tokens = h["model"]["fingerprint"], h["tokenizer"]["fingerprint"], h["kv"]["dtype"], h["document"]["tokens"]
    assert header_key(h) == artifact_key(fp, tok, dtype, tokens, layout=layout) != artifact_key(fp, tok, dtype, tokens)
    assert bucket_id(fp, tok, dtype, layout=layout) != bucket_id(fp, tok, dtype)


def test_store_add_brings_the_parts_and_rm_removes_them(published, single, tmp_path):
    from kvmlx.artifact.identity import model_fingerprint, tokenizer_fingerprint
    from kvmlx.artifact.layout import header_layout
    from kvmlx.runtime.store import Store

    _, out, _, _ = published
    store = Store(tmp_path / "store")
    key = store.add(out)
    objects = sorted(p.name for p in store.objects.iterdir())
    assert len(objects) == 3 and sum(".rank" in n for n in objects) == 2
    assert store.sync().skipped == []  # parts are not mistaken for stray files
    lm = single[0]  # one process: the same tokens in this store do not match (another layout's bucket)
    identity = (model_fingerprint(lm), tokenizer_fingerprint(lm), lm.dtype)
    assert store.lookup(*identity, store.tokens(key)) is None
    with Artifact(out) as art:
        assert store.lookup(*identity, store.tokens(key), layout=header_layout(art.header))
    store.rm(key)
    assert list(store.objects.iterdir()) == []


@pytest.fixture(scope="module")
def tp_store(kvmlx_home, doc_file, tmp_path_factory):
    """A store published into under the launcher (tensor parallel), then published into again."""
    store = tmp_path_factory.mktemp("store") / "store"
    first = launch_json(kvmlx_home, "publish", str(doc_file), "-m", MODEL, "--store-dir", str(store), "--chunk-size", str(CHUNK))
    again = launch_json(kvmlx_home, "publish", str(doc_file), "-m", MODEL, "--store-dir", str(store), "--chunk-size", str(CHUNK))
    return store, first, again


PROMPT = DOC + " Section 41:"


@pytest.fixture(scope="module")
def tp_store_verified(tp_store, kvmlx_home):
    store = tp_store[0]
    return launch_json(kvmlx_home, "generate", "-m", MODEL, "--store", str(store), "-p", PROMPT, "-n", "8", "--verify")


@pytest.mark.slow  # three launches to set up (publish twice, verify) plus its own: .ci/run's slow step
def test_store_publish_and_reuse_under_the_launcher(tp_store, tp_store_verified, kvmlx_home):
    """`publish --store-dir` and `generate --store` (no artifact named) under the launcher: the second
    publish finds the key on every rank; reuse is token-exact; one process does not reuse that KV."""
    store, first, again = tp_store
    assert not first["existed"] and again["existed"] and again["key"] == first["key"]
    report = tp_store_verified
    assert report["token_exact"] and report["max_abs_logit_diff"] == 0.0 and report["key"] == first["key"]
    assert report["reused_tokens"] >= first["tokens"] - 1
    one = subprocess.run([sys.executable, "-m", "kvmlx", "generate", "-m", MODEL, "--store", str(store), "-p", PROMPT,
                          "-n", "2", "--json"], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(kvmlx_home))
    assert one.returncode == 0 and json.loads(one.stdout)["reused_tokens"] == 0, one.stderr


@pytest.mark.slow  # three launches to set up (publish twice, verify) plus its own: .ci/run's slow step
def test_serve_under_the_launcher_answers_from_the_sharded_store(tp_store, tp_store_verified, kvmlx_home):
    """`kvmlx serve` under mlx.launch: rank 0 answers HTTP, both ranks run the shards; the completion
    reuses the tensor-parallel store entry and its greedy tokens equal `generate --store` under the launcher."""
    import urllib.request

    store, expected = tp_store[0], tp_store_verified
    http = _free_port_pair()
    cmd = [_launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()), "--", sys.executable,
           "-m", "kvmlx", "serve", "-m", MODEL, "--store", str(store), "--port", str(http)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(kvmlx_home),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                answer = json.load(urllib.request.urlopen(req, timeout=60))
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert answer["kvmlx"]["tokens"] == expected["tokens"]
        assert answer["kvmlx"]["cached_tokens"] == expected["reused_tokens"] > 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_hostile_parallel_objects_are_refused(published):
    """The `parallel` object is validated like the rest of the header: ranges, split, names, digests."""
    import copy

    from kvmlx.artifact.layout import kv_plan
    from kvmlx.errors import ArtifactError

    _, out, _, _ = published
    with Artifact(out) as art:
        manifest = art.header
    part_file = out.parent / manifest["parallel"]["parts"][0]["file"]
    with Artifact(part_file) as art:
        part = art.header
    assert kv_plan(manifest, "m")[2] is False and kv_plan(part, "p")[2] is True

    def broken(h, change):
        h = copy.deepcopy(h)
        change(h["parallel"])
        return h

    for h in [
        broken(manifest, lambda p: p["parts"][0].update(file="../../etc/passwd")),
        broken(manifest, lambda p: p["parts"][1].update(header_blake3="x" * 64)),
        broken(manifest, lambda p: p["parts"].pop()),
        broken(manifest, lambda p: p.update(part=0)),  # both part and parts
        broken(manifest, lambda p: p.update(tensor_parallel=2, pipeline_stages=2)),
        broken(manifest, lambda p: p["ranks"].reverse()),
        broken(manifest, lambda p: p["ranks"][0].update(kv_heads=[0, 3], layers=[0, 9])),
        broken(manifest, lambda p: p.update(extra=1)),
        broken(part, lambda p: p.update(part=2)),
        broken(part, lambda p: p.pop("part")),
    ]:
        with pytest.raises(ArtifactError, match="invalid header: parallel"):
            kv_plan(h, "x")


def test_pipeline_without_a_launcher_is_a_one_line_error(doc_file, tmp_path, kvmlx_home):
    r = subprocess.run([sys.executable, "-m", "kvmlx", "publish", str(doc_file), "-m", MODEL, "-o", str(tmp_path / "x.kvmlx"),
                        "--pipeline"], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(kvmlx_home))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "mlx.launch" in r.stderr


def test_verify_checks_the_parts_beside_a_manifest(published, single):
    """`kvmlx verify --no-model` of a manifest verifies every part found beside it; with a model, one
    process is refused by layout (spot checks recompute under the publisher's layout only)."""
    from kvmlx.measure.spotcheck import spot_check

    _, out, _, _ = published
    report = spot_check(out, None)
    with Artifact(out) as art:
        files = [out.parent / p["file"] for p in art.header["parallel"]["parts"]]
    assert report.digests_verified == sum(len(Artifact(f).tensors) for f in files) > 0
    with pytest.raises(LayoutMismatchError):
        spot_check(out, single[0])


def test_gc_removes_parts_no_manifest_lists(published, tmp_path):
    """A store publish whose ranks did not all finish can leave a part in objects/: gc removes it once
    it is older than the grace period, and never a part its manifest lists."""
    from kvmlx.runtime.store import Store

    _, out, _, _ = published
    store = Store(tmp_path / "store")
    key = store.add(out)
    listed = sorted(p.name for p in store.objects.iterdir() if ".rank" in p.name)
    orphan = store.objects / "artifact.kvmlx.0123456789abcdef.rank1of2"
    orphan.write_bytes(b"x")
    assert store.gc().parts_removed == 0 and orphan.exists()  # young: its publish may still be running
    old = time.time() - 7200
    for p in store.objects.iterdir():
        os.utime(p, (old, old))
    assert store.gc().parts_removed == 1 and not orphan.exists()
    assert sorted(p.name for p in store.objects.iterdir() if ".rank" in p.name) == listed and key in store


@pytest.mark.slow  # a whole bench mode (3 layouts, 2 launches): .ci/run's slow step
def test_bench_parallel_reports_every_rank(kvmlx_home, tmp_path):
    """`kvmlx bench --parallel`: one process, then 2 ranks at TP 2 and PP 2, each rank's bytes and times."""
    plot = tmp_path / "parallel.png"
    r = subprocess.run([sys.executable, "-m", "kvmlx", "bench", "--parallel", "-m", MODEL, "--lengths", "300", "--runs", "1",
                        "--json", "--plot", str(plot)], capture_output=True, text=True, timeout=3 * LAUNCH_TIMEOUT,
                       env=_env(kvmlx_home))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    single = result["single"]
    assert single["first_load_bytes"] >= single["part_bytes"] > 0
    for mode in ("tensor", "pipeline"):
        ranks = result["layouts"][mode]["ranks"]
        assert [x["rank"] for x in ranks] == [0, 1]
        for x in ranks:
            assert x["part_bytes"] <= x["first_load_bytes"] < single["first_load_bytes"]
            assert x["first_load_seconds"] > 0 and x["load_seconds"] > 0
    assert plot.stat().st_size > 10_000
    from kvmlx.measure.bench.parallel import format_parallel_table

    assert "TP 2, rank 1" in format_parallel_table(result) and "PP 2, rank 0" in format_parallel_table(result)


@pytest.mark.slow  # a refusal or fault injected under the launcher (one launch each): .ci/run's slow step
def test_kv_bits_under_the_launcher_is_a_one_line_refusal(doc_file, tmp_path, kvmlx_home):
    """Parallel artifacts hold plain KV: --kv-bits under mlx.launch is refused on every rank, naming both
    (tests/test_parallel_families.py covers the other cache families and the API)."""
    out = tmp_path / "q.kvmlx"
    r = launch(kvmlx_home, "publish", str(doc_file), "-m", MODEL, "-o", str(out), "--kv-bits", "8", "--kv-group-size", "32")
    assert "Traceback" not in r.stderr, r.stderr  # (mlx.launch itself exits 0; each rank exits 1)
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 2 and all("supports plain KV only" in line for line in lines), r.stderr
    assert "tensor-parallel over 2 ranks" in lines[0] and "--kv-bits 8" in lines[0]
    assert not list(tmp_path.glob("q.kvmlx*"))
