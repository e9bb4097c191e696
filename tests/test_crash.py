"""Crash safety: SIGKILL a process that is publishing (or adding to the store) at random moments.

After every kill, every file in the directory either loads and verifies completely, or is a
temporary file (`.NAME.*.tmp`, or under the store's tmp/) that the reader refuses or that is itself
complete; the destination holds the previous complete artifact or the new one, never a torn file.
Kills are real (`SIGKILL` of a child process, no cleanup handlers run) at random delays.
`KVMLX_FUZZ=long` kills 5x as often. A SIGKILL does not lose the page cache, so this tests
atomicity, not durability after a power cut (that is what write_artifact's fsyncs are for).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmlx.errors import ArtifactError, KvmlxError
from kvmlx.artifact.format import Artifact, read_header

pytestmark = pytest.mark.slow  # random SIGKILL loops: CI runs them in their own step (.ci/run)

LONG = os.environ.get("KVMLX_FUZZ") == "long"
SCALE = 5 if LONG else 1

PUBLISH_LOOP = r"""
import sys
from importlib import resources
from kvmlx.models import load_model
from kvmlx.runtime.publish import publish
lm = load_model("builtin:tiny", "bfloat16")
tokens = lm.tokenizer.encode(resources.files("kvmlx").joinpath("data/sample_document.txt").read_text())[:300]
print("ready", flush=True)
i = 0
while True:
    publish(lm, [3 + i % 500] + tokens[1:], sys.argv[1], chunk_size=64)
    print("done", i, flush=True)
    i += 1
"""

WRITE_LOOP = r"""
import sys
import numpy as np
from kvmlx.artifact.format import TensorData, write_artifact
sys.path.insert(0, sys.argv[2])
from fuzz_corpus import synthetic_header
rng = np.random.default_rng(0)
layers, heads, tokens, head_dim = 4, 8, 2048, 128
tensors = [TensorData(f"layers.{i}.{kind}", "float16", (1, heads, tokens, head_dim),
                      memoryview(rng.standard_normal((1, heads, tokens, head_dim)).astype(np.float16)).cast("B"))
           for i in range(layers) for kind in ("keys", "values")]
logits = rng.standard_normal(16).astype(np.float16)
tensors.append(TensorData("logits", "float16", (16,), memoryview(logits).cast("B")))
import time
import kvmlx.artifact.format as fmt
_write_all = fmt._write_all
slow = [False]
def slow_write_all(f, data):  # every other artifact, a slow disk (1 MiB at a time): kills land mid-write too
    view = memoryview(data).cast("B")
    for at in range(0, len(view), 1 << 20):
        _write_all(f, view[at : at + (1 << 20)])
        if slow[0]:
            time.sleep(0.003)
fmt._write_all = slow_write_all
print("ready", flush=True)
i = 0
while True:  # 34 MB per artifact, each a new version (chunk_size = i + 1): the time goes to digests and writing
    header = synthetic_header(layers, heads, tokens, head_dim)
    header["kv"]["chunk_size"] = i + 1
    slow[0] = i % 2 == 1
    write_artifact(sys.argv[1], header, tensors)
    print("done", i, flush=True)
    i += 1
"""

STORE_LOOP = r"""
import sys
from pathlib import Path
from kvmlx.runtime.store import Store
store = Store(sys.argv[1])
sources = sorted(Path(sys.argv[2]).glob("*.kvmlx"))
print("ready", flush=True)
i = 0
while True:
    store.add(sources[i % len(sources)])
    print("done", i, flush=True)
    i += 1
"""


def kill_at_random(args: list[str], delay: float, env: dict | None = None) -> int:
    """Start a loop, wait until it is ready, let it run `delay` seconds, SIGKILL it; return how many
    iterations it finished."""
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "ready" not in line:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"loop did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the loop died by itself ({proc.returncode}): {err[-2000:]}"
    return sum(1 for line in out.splitlines() if line.startswith("done"))


def check_artifact(path: Path, lm=None) -> None:
    """A complete artifact: the header parses and every tensor verifies (and it loads, given a model)."""
    with Artifact(path) as art:
        for name in art.tensors:
            art.tensor_bytes(name, verify=True).release()
    if lm is not None:
        from kvmlx.runtime.load import load_artifact

        load_artifact(path, lm)


def check_directory(folder: Path, destination: str, lm=None) -> dict:
    """Every file is the complete destination or a temp file that is refused (or complete)."""
    seen = {"destination": 0, "torn temp files": 0, "complete temp files": 0}
    for path in folder.iterdir():
        if path.name == destination:
            check_artifact(path, lm)
            seen["destination"] += 1
            continue
        assert path.name.startswith(f".{destination}.") and path.name.endswith(".tmp"), f"unexpected file {path.name}"
        try:
            read_header(path)
        except ArtifactError as e:  # partial: refused, as it must be
            assert "\n" not in str(e)
            seen["torn temp files"] += 1
        else:  # killed after the last byte, before the rename: complete, and it must verify
            check_artifact(path)
            seen["complete temp files"] += 1
        path.unlink()  # what a cleanup of stale temp files does
    return seen


def test_killing_publish_leaves_the_old_or_the_new_artifact(tmp_path, tiny):
    out = tmp_path / "doc.kvmlx"
    env = {**os.environ}
    rng = random.Random()
    totals = {"kills": 0, "published before the kill": 0, "torn temp files": 0, "complete temp files": 0}
    for _ in range(4 * SCALE):
        before = out.exists()
        done = kill_at_random([PUBLISH_LOOP, str(out)], rng.uniform(0.0, 1.5), env)
        seen = check_directory(tmp_path, out.name, tiny)
        assert seen["destination"] == (1 if before or done else 0)
        if out.exists():
            tokens = read_header(out)["document"]["tokens"]
            assert 3 <= tokens[0] < 503 and len(tokens) == 300
        totals["kills"] += 1
        totals["published before the kill"] += done
        for k in ("torn temp files", "complete temp files"):
            totals[k] += seen[k]
    print("publish kills:", totals)


def test_killing_write_artifact_mid_write(tmp_path):
    """Large synthetic artifacts, so that most kills land while bytes are being written or fsynced."""
    out = tmp_path / "big.kvmlx"
    rng = random.Random()
    totals = {"kills": 0, "torn temp files": 0, "complete temp files": 0}
    tests_dir = str(Path(__file__).parent)
    for _ in range(8 * SCALE):
        before = out.exists()
        done = kill_at_random([WRITE_LOOP, str(out), tests_dir], rng.uniform(0.05, 0.8))
        seen = check_directory(tmp_path, out.name)
        assert seen["destination"] == (1 if before or done else 0)
        totals["kills"] += 1
        totals["torn temp files"] += seen["torn temp files"]
        totals["complete temp files"] += seen["complete temp files"]
    print("write_artifact kills:", totals)
    assert totals["torn temp files"] + totals["complete temp files"] > 0, "no kill landed while a file was being written"


def test_killing_store_add(tmp_path, tiny, document):
    """Store.add killed at random: objects/ holds only complete artifacts, the index opens and agrees."""
    import kvmlx.runtime.store as store_mod
    from kvmlx.runtime.publish import publish

    sources = tmp_path / "sources"
    sources.mkdir()
    tokens = tiny.tokenizer.encode(document)[:200]
    for i in range(4):
        publish(tiny, [3 + i] + tokens[1:], sources / f"{i}.kvmlx", chunk_size=64)
    root = tmp_path / "store"
    rng = random.Random()
    for _ in range(4 * SCALE):
        kill_at_random([STORE_LOOP, str(root), str(sources)], rng.uniform(0.0, 1.0))
        objects = sorted((root / "objects").glob("*")) if (root / "objects").exists() else []
        for path in objects:
            assert path.suffix == ".kvmlx", f"stray file in objects/: {path.name}"
            check_artifact(path, tiny)
        store = store_mod.Store(root)
        try:
            listed = {e.key for e in store.ls()}
            assert listed <= {p.stem for p in objects}
            for key in listed:
                check_artifact(store.path(key))
            store.reindex()
            assert {e.key for e in store.ls()} == {p.stem for p in objects}
        except KvmlxError as e:
            pytest.fail(f"store unusable after a kill: {e}")
        finally:
            store.close()
