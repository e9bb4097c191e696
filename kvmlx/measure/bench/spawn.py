"""The regime an agent's command meets: a new process loading a store entry. Each run spawns a fresh
Python process that imports what it needs, then times only the load: for kvmlx, opening the store,
looking up the entry's verified identity and `read_caches` (digests verified as the default path
does: with the store's record, an unchanged file is not hashed); for mlx-lm, `load_prompt_cache` of
the same KV, evaluated. Both start with new memory and a warm page cache (the file was just written
or read). Figures: `kvmlx_load_newproc_s`, `mlx_lm_load_newproc_s` and their ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ...runtime.store import Store
from .machine import summarize

_KVMLX = """
import json, sys, time
from kvmlx.artifact.format import Artifact
from kvmlx.runtime.load import read_caches
from kvmlx.runtime.store import Store
import mlx.core as mx
t0 = time.perf_counter()
store = Store(sys.argv[1], sync=False)
key = store.resolve(sys.argv[2])
art = Artifact(store.path(key), populate=True, verified=store.verified_identity(key))
digests = "recorded" if art.recorded else "hashed"
caches, logits, _ = read_caches(art, verify_digests=True)
art.close()
mx.eval([(c.keys, c.values) for c in caches], logits)
print(json.dumps({"load_s": time.perf_counter() - t0, "digests": digests}))
"""

_MLX_LM = """
import json, sys, time
import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache
t0 = time.perf_counter()
caches = load_prompt_cache(sys.argv[1])
mx.eval([c.state for c in caches])
print(json.dumps({"load_s": time.perf_counter() - t0}))
"""


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[3]),
                                                       os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"bench child failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def new_process_figures(art_path: Path, mlx_path: Path, runs: int, tmp: Path) -> dict:
    """Add the artifact to a store in `tmp` (verified there, its identity recorded), then time `runs`
    spawned loads of it and of mlx-lm's file, interleaved."""
    store = Store(tmp / "newproc-store")
    key = store.add(art_path)
    kv, ml, digests = [], [], set()
    for _ in range(runs):
        r = _child(_KVMLX, str(store.root), key)
        kv.append(r["load_s"])
        digests.add(r["digests"])
        ml.append(_child(_MLX_LM, str(mlx_path))["load_s"])
    store.rm(key)
    store.close()
    out = {"kvmlx_load_newproc_s": summarize(kv), "mlx_lm_load_newproc_s": summarize(ml),
           "kvmlx_load_newproc_digests": sorted(digests)}
    out["kvmlx_load_newproc_speedup_vs_mlx_lm"] = out["mlx_lm_load_newproc_s"]["median"] / out["kvmlx_load_newproc_s"]["median"]
    return out
