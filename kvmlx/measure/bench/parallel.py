"""`kvmlx bench --parallel`: one document published and loaded by one process and by 2 ranks under
`mlx.launch` (tensor parallel, then pipeline), each rank's bytes and seconds side by side in one run.

The single-process figures are measured in this process; each layout runs this module as the program
of every rank (`python -m kvmlx.measure.bench.parallel`), which prints rank 0's JSON of all ranks'
figures. Per rank: the part it wrote, the prefill and write times, the first load (every tensor's
BLAKE3 checked) and re-loads (the same file verified before: identity check only), and the bytes the
kernel counted it reading during each (/proc/self/io; None elsewhere). The document is the same token
ids everywhere (`harness.document_tokens`), and every artifact goes to one temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ...artifact.layout import describe
from ...models import load_model
from ...runtime.distributed import per_rank, running_layout
from ...runtime.load import load_artifact
from ...runtime.publish import DEFAULT_CHUNK, publish
from .harness import ProgressFn, document_tokens
from .machine import machine_info, summarize

DEFAULT_MODEL = "builtin:small-qwen2"
DEFAULT_TOKENS = 1024
LAYOUTS = ("tensor", "pipeline")
RANK_TIMEOUT = 1800  # seconds for one layout's launch (prefill of a long document on a slow CPU)


def measure(lm, tokens: Sequence[int], out: Path, runs: int, chunk_size: int) -> dict:
    """Publish `tokens` with `lm` to `out`, load it once (hashing every tensor) and `runs` more times."""
    pub = publish(lm, tokens, out, chunk_size=chunk_size)
    first = load_artifact(out, lm)
    again = [load_artifact(out, lm) for _ in range(runs)]
    return {
        "part_bytes": pub.artifact_bytes, "kv_bytes": pub.kv_bytes, "prefill_seconds": pub.prefill_seconds,
        "write_seconds": pub.write_seconds, "first_load_seconds": first.load_seconds, "first_load_bytes": first.bytes_read,
        "load_seconds": summarize([g.load_seconds for g in again])["median"], "load_bytes": again[-1].bytes_read,
    }


def run_parallel_bench(model: str = DEFAULT_MODEL, tokens: int = DEFAULT_TOKENS, runs: int = 5, *, ranks: int = 2,
                       chunk_size: int = DEFAULT_CHUNK, directory: str | None = None,
                       progress: ProgressFn | None = None) -> dict:
    """The single-process figures, then each layout's per-rank figures (each `mlx.launch` run bounded)."""
    total = 1 + len(LAYOUTS)
    with tempfile.TemporaryDirectory(prefix="kvmlx-bench-parallel-", dir=directory) as tmp:
        lm = load_model(model)
        doc = document_tokens(lm.tokenizer, tokens)
        single = measure(lm, doc, Path(tmp) / "single.kvmlx", runs, chunk_size)
        if progress:
            progress(1, total, "single")
        layouts = {}
        for i, mode in enumerate(LAYOUTS):
            layouts[mode] = _launch(mode, model, tokens, runs, ranks, chunk_size, Path(tmp))
            if progress:
                progress(2 + i, total, mode)
    return {"mode": "parallel", "machine": machine_info(),
            "config": {"model": model, "tokens": tokens, "runs": runs, "ranks": ranks, "chunk_size": chunk_size,
                       "backend": "ring over 127.0.0.1"},
            "single": single, "layouts": layouts}


def _launch(mode: str, model: str, tokens: int, runs: int, ranks: int, chunk_size: int, directory: Path) -> dict:
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher) if launcher.exists() else "mlx.launch", "--backend", "ring", "-n", str(ranks),
           "--starting-port", str(_free_ports(ranks)), "--", sys.executable, "-m", __name__, "--mode", mode,
           "--model", model, "--tokens", str(tokens), "--runs", str(runs), "--chunk-size", str(chunk_size),
           "--out", str(directory / f"{mode}.kvmlx")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[3]), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=RANK_TIMEOUT, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the {mode}-parallel run printed nothing: {r.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def _free_ports(n: int) -> int:
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            socks = [socket.socket() for _ in range(n)]
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports for the ring backend")


def format_parallel_table(result: dict) -> str:
    """One row per process: what it wrote and read, and how long its loads took; then the layouts."""
    cfg = result["config"]
    lines = [f"{cfg['tokens']} tokens of {cfg['model']} KV; {cfg['ranks']} ranks, ring backend over 127.0.0.1; "
             f"re-loads: median of {cfg['runs']}",
             f"{'process':<16} {'part MB':>8} {'read MB':>8} {'share':>6} {'1st load ms':>11} {'re-load ms':>10} "
             f"{'prefill s':>9} {'write s':>8}"]
    single = result["single"]

    def row(name: str, r: dict) -> str:
        read = r.get("first_load_bytes")
        share = f"{read / single['first_load_bytes']:6.1%}" if read and single.get("first_load_bytes") else f"{'-':>6}"
        return (f"{name:<16} {r['part_bytes'] / 1e6:8.3f} {(read or 0) / 1e6:8.3f} {share} {r['first_load_seconds'] * 1e3:11.1f} "
                f"{r['load_seconds'] * 1e3:10.1f} {r['prefill_seconds']:9.2f} {r['write_seconds']:8.3f}")

    lines.append(row("one process", single))
    for mode, layout in result["layouts"].items():
        for r in layout["ranks"]:
            lines.append(row(f"{'TP' if mode == 'tensor' else 'PP'} 2, rank {r['rank']}", r))
    lines += [""] + [f"{'TP' if m == 'tensor' else 'PP'} 2: {layout['layout']}" for m, layout in result["layouts"].items()]
    return "\n".join(lines)


def plot_parallel(result: dict, path: str | os.PathLike) -> Path:
    """Bars per process: bytes read by the first load (MB) and load times (ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, reads, first, again = ["one process"], [result["single"]["first_load_bytes"] or 0], \
        [result["single"]["first_load_seconds"]], [result["single"]["load_seconds"]]
    for mode, layout in result["layouts"].items():
        for r in layout["ranks"]:
            labels.append(f"{'TP' if mode == 'tensor' else 'PP'} rank {r['rank']}")
            reads.append(r["first_load_bytes"] or 0)
            first.append(r["first_load_seconds"])
            again.append(r["load_seconds"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(labels, [x / 1e6 for x in reads], color="tab:blue")
    a.set_ylabel("MB read by the first load")
    xs = range(len(labels))
    b.bar([x - 0.2 for x in xs], [x * 1e3 for x in first], width=0.4, label="first load (digests)")
    b.bar([x + 0.2 for x in xs], [x * 1e3 for x in again], width=0.4, label="re-load (median)")
    b.set_xticks(list(xs), labels)
    b.set_ylabel("ms")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    cfg = result["config"]
    fig.suptitle(f"{cfg['tokens']} tokens, {cfg['model']}: per-rank load at {cfg['ranks']} ranks vs one process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _rank_main(argv: Sequence[str] | None = None) -> None:
    """One rank of a layout's run: measure, then rank 0 prints every rank's figures as one JSON line."""
    p = argparse.ArgumentParser()
    for flag in ("--mode", "--model", "--out"):
        p.add_argument(flag, required=True)
    for flag in ("--tokens", "--runs", "--chunk-size"):
        p.add_argument(flag, type=int, required=True)
    a = p.parse_args(argv)
    lm = load_model(a.model, parallel=a.mode)
    mine = measure(lm, document_tokens(lm.tokenizer, a.tokens), Path(a.out), a.runs, a.chunk_size)
    ranks = per_rank(lm, **mine)
    if lm.group.rank() == 0:
        print(json.dumps({"layout": describe(running_layout(lm)), "ranks": ranks}), flush=True)


if __name__ == "__main__":
    _rank_main()
