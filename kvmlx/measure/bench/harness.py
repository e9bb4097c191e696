"""What the model and shape modes share: the bench's constants, KV shapes, and the saves and loads of one
KV timed for kvmlx and mlx-lm side by side, with the figures derived from them and the result they make.

The paper's reference figures (`PAPER_M1_PRO`), the default lengths and runs, each mode's progress
phases, the targets the issue set (`TARGETS`, reported as figures, never asserted), `KVShape` and
the known `SHAPES`; the document both modes time (`document_tokens`), the timed primitives (a
load forced into memory, load + first token, kvmlx's and mlx-lm's saves), the load figures in every
regime of `machine`, the derived bandwidths, speedups and roofline fractions, and the per-length
loop that keeps MLX's buffers warm and assembles the JSON-ready result. Bandwidths (GB/s, 1e9
bytes) are the document's KV bytes (no padding, no logits) per second, so kvmlx and mlx-lm are
compared on the same payload; every timed region forces evaluation (MLX is lazy, and a lazy load
looks free).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

from ...artifact.format import DTYPE_SIZES, TensorData, forget_verified, write_artifact
from ...artifact.verified import SETTLED_SECONDS
from ...runtime.load import DEFAULT_HEADROOM, LOAD_PATHS, zero_copy_available
from .machine import GB, _in_regime, can_evict, machine_info, release_memory, summarize

ProgressFn = Callable[[int, int, str], None]  # (phases done, phases in all, what just finished)

#: The paper's Qwen3-4B fp16 figures on an M1 Pro (median of 5): tokens -> (prefill s, one decode step s).
PAPER_M1_PRO: dict[int, tuple[float, float]] = {
    255: (0.67, 0.078), 485: (1.29, 0.093), 945: (2.65, 0.122), 1888: (5.81, 0.179), 3774: (14.71, 0.296),
}
DEFAULT_LENGTHS = tuple(PAPER_M1_PRO)
DEFAULT_RUNS = 5

# Each row reports progress once per phase, whatever the options, so a bar's total is known upfront.
MODEL_PHASES = ("prefill", "decode step", "saves", "loads", "load + first token", "mlx-lm load + first token", "roofline")
SHAPE_PHASES = ("synthesize", "saves", "loads", "roofline")
# Timings that move the document's KV, hence get a bandwidth and a roofline fraction (mlx-lm's bare
# save is left out: without its fsync it is not comparable with the fsync'd write ceiling).
_MOVES_KV = re.compile(r"^(kvmlx_(load_\w+|save)|mlx_lm_(load_(warm|fresh|cold)|save_durable))_s$")

# The figures the issue set for kvmlx: (name, row key, goal, "min" = value >= goal | "max" = value <= goal).
TARGETS = (
    ("warm re-load vs mlx-lm load_prompt_cache (x faster)", "kvmlx_load_warm_reload_speedup_vs_mlx_lm", 1.0, "min"),
    ("fresh re-load vs mlx-lm (new memory)", "kvmlx_load_fresh_reload_speedup_vs_mlx_lm", 1.0, "min"),
    ("new process loading a store entry vs mlx-lm", "kvmlx_load_newproc_speedup_vs_mlx_lm", 1.0, "min"),
    ("cold first load vs mlx-lm", "kvmlx_load_cold_speedup_vs_mlx_lm", 1.0, "min"),
    ("fresh first load (every digest hashed) vs mlx-lm", "kvmlx_load_fresh_speedup_vs_mlx_lm", 0.6, "min"),
    ("warm first load (every digest hashed) vs mlx-lm", "kvmlx_load_warm_speedup_vs_mlx_lm", 0.6, "min"),
    ("warm re-load / memcpy bandwidth", "kvmlx_load_warm_reload_frac_memcpy", 0.90, "min"),
    ("load + first token vs mlx-lm's (x faster)", "load_first_token_speedup_vs_mlx_lm", 1.0, "min"),
    ("cold load time / plain sequential read time", "kvmlx_load_cold_over_seq_read", 1.10, "max"),
    ("save GB/s (fsync included)", "kvmlx_save_GBps", 2.0, "min"),
    ("first step after load / resident step", "first_step_over_resident", 1.5, "max"),
    ("prefill / (load + first token) vs the paper's prefill / decode step", "prefill_over_load_first_token", None, "min"),
    ("artifact bytes / raw KV bytes - 1", "artifact_overhead", 0.01, "max"),
)


@dataclass(frozen=True)
class KVShape:
    """A model's KV geometry, enough to synthesise an artifact of its exact size."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    vocab_size: int = 151936  # the stored logits row

    def kv_bytes(self, tokens: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * tokens * self.head_dim * DTYPE_SIZES[self.dtype]


SHAPES = {"qwen3-4b": KVShape("qwen3-4b", num_layers=36, num_kv_heads=8, head_dim=128, dtype="float16")}


# -- the document and what runs here -----------------------------------------------------------------

def parse_lengths(text: str) -> tuple[int, ...]:
    """"255,485" -> (255, 485); raises ValueError on anything but positive integers."""
    try:
        lengths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive integers, got {text!r}")
    return lengths


def document_tokens(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of the bundled sample document and corpus, repeated as often as needed."""
    data = resources.files("kvmlx").joinpath("data")
    text = data.joinpath("sample_document.txt").read_text(encoding="utf-8") + "\n\n" + \
        data.joinpath("corpus.txt").read_text(encoding="utf-8")
    ids = list(tokenizer.encode(text))
    return (ids * (n // len(ids) + 1))[:n]


def available_load_paths() -> list[str]:
    """Every concrete load path kvmlx.runtime.load offers that can run here (zero-copy needs Metal)."""
    return [p for p in LOAD_PATHS if p != "auto" and (p != "zero-copy" or zero_copy_available())]


# -- timed primitives: a load in memory, load + first token, saves ------------------------------------

@contextmanager
def _warm_buffers(shape: KVShape, lengths: Sequence[int]) -> Iterator[None]:
    """Raise MLX's buffer-cache limit for a run, so a load's freed buffers are kept for the next load.

    Metal's default limit already keeps them; the CPU backend's (32 MB) hands them back to malloc,
    and whether glibc then reuses them depends on heap layout, so "warm" would depend on what ran
    before. Room for two loads (kvmlx's and mlx-lm's capacities) of the longest document, and 1 GiB.
    """
    nbytes = 4 * shape.kv_bytes(max(lengths) + 2 * DEFAULT_HEADROOM) + (1 << 30)
    previous = mx.set_cache_limit(nbytes)
    if previous > nbytes:
        mx.set_cache_limit(previous)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)
        release_memory()


def _materialize(caches: Sequence[Any]) -> None:
    """Evaluate every cache array (`state` also waits for kvmlx's background-loaded layers)."""
    mx.eval([c.state[:2] for c in caches])


def _timed_load(load: Callable[[], Sequence[Any]]) -> float:
    """Seconds until `load()`'s caches are all in memory."""
    t0 = time.perf_counter()
    _materialize(load())
    return time.perf_counter() - t0


def _first_token(load: Callable[[], Sequence[Any]], model, token: int) -> tuple[float, float]:
    """(load + one model step over `token`, the step alone): the agent's time to its first token."""
    t0 = time.perf_counter()
    caches = load()
    t1 = time.perf_counter()
    logits = model(mx.array([[token]]), cache=caches)[0, -1]
    mx.eval(logits, [c.state[:2] for c in caches])
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _kvmlx_save(path: Path, header: dict, tensors: Sequence[TensorData]) -> float:
    """Seconds for publish's write: digests, write, fsync, atomic rename, directory fsync."""
    t0 = time.perf_counter()
    write_artifact(path, header, tensors)
    return time.perf_counter() - t0


def _mlx_lm_save(path: Path, caches: Sequence[KVCache]) -> tuple[float, float]:
    """(save_prompt_cache as mlx-lm does it, the same plus an fsync so it is durable like kvmlx's)."""
    t0 = time.perf_counter()
    save_prompt_cache(str(path), list(caches))
    t1 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return t1 - t0, time.perf_counter() - t0


def _mlx_lm_capacity(n: int, chunk_size: int) -> int:
    """Slots mlx-lm's KVCache holds after a chunked prefill of n tokens (its own growth rule, on a 1x1 cache)."""
    cache = KVCache()
    for start in range(0, n, chunk_size):
        step = mx.zeros((1, 1, min(chunk_size, n - start), 1))
        cache.update_and_fetch(step, step)
    return cache.keys.shape[2]


# -- what both modes measure: saves and loads of one KV, kvmlx and mlx-lm side by side ------------------

def _load_figures(kvmlx_load: Callable[[bool], Sequence[Any]], art_path: Path, mlx_path: Path,
                  runs: int, cold: bool) -> dict:
    """Load times for kvmlx and mlx-lm, warm / fresh / cold.

    kvmlx three ways: a first load of the file (every tensor digest hashed: the default's cost the
    first time a process meets a file), a re-load of the same unchanged file (digests were checked
    at its first load, so only its identity is: format.Artifact.verified_before), and no verification.
    """
    _settle(art_path)
    loaders = [
        ("kvmlx_load", "", lambda: _first_contact(kvmlx_load), art_path),
        ("kvmlx_load", "_reload", lambda: kvmlx_load(True), art_path),
        ("kvmlx_load", "_noverify", lambda: kvmlx_load(False), art_path),
        ("mlx_lm_load", "", lambda: load_prompt_cache(str(mlx_path)), mlx_path),
    ]
    out = {}
    for prefix, suffix, load, path in loaders:
        for regime in ("warm", "fresh", "cold") if cold else ("warm", "fresh"):
            out[f"{prefix}_{regime}{suffix}_s"] = summarize(_in_regime(lambda: _timed_load(load), runs, regime, path))
    return out


def _first_contact(kvmlx_load: Callable[[bool], Sequence[Any]]) -> Sequence[Any]:
    """A verified load that hashes every digest, as if this process had never loaded the file."""
    forget_verified()
    return kvmlx_load(True)


def _settle(path: Path) -> None:
    """Wait until `path` is old enough to be recorded as verified (artifact.verified.SETTLED_SECONDS)."""
    age = time.time() - path.stat().st_ctime
    if age < SETTLED_SECONDS:
        time.sleep(SETTLED_SECONDS - age + 0.05)


def _derive(row: dict, roof: dict) -> None:
    """Add bandwidths, speedups, roofline fractions and byte overheads computed from the medians."""
    med = lambda key: row[key]["median"] if row.get(key) else None  # noqa: E731
    kv = row["kv_bytes"]
    for key in [k for k in row if _MOVES_KV.match(k)]:
        what, ceiling = key.removesuffix("_s"), ("write_fsync" if "_save" in key else "cold_read" if "_cold" in key else "memcpy")
        row[f"{what}_GBps"] = kv / med(key) / GB
        if roof.get(f"{ceiling}_GBps"):
            name = {"write_fsync": "write", "cold_read": "seq_read", "memcpy": "memcpy"}[ceiling]
            row[f"{what}_frac_{name}"] = row[f"{what}_GBps"] / roof[f"{ceiling}_GBps"]
    for regime in ("warm", "fresh", "cold"):
        for how in ("", "_reload"):
            if med(f"kvmlx_load_{regime}{how}_s") and med(f"mlx_lm_load_{regime}_s"):
                row[f"kvmlx_load_{regime}{how}_speedup_vs_mlx_lm"] = (med(f"mlx_lm_load_{regime}_s")
                                                                    / med(f"kvmlx_load_{regime}{how}_s"))
    if med("load_first_token_s") and med("mlx_lm_load_first_token_s"):
        row["load_first_token_speedup_vs_mlx_lm"] = med("mlx_lm_load_first_token_s") / med("load_first_token_s")
    if med("kvmlx_load_cold_s") and roof.get("cold_read_s"):
        # the roofline reads the same number of bytes with a plain read(2) loop: what a cold load cannot beat
        row["kvmlx_load_cold_over_seq_read"] = med("kvmlx_load_cold_s") / roof["cold_read_s"]["median"]
    row["artifact_overhead"] = row["artifact_bytes"] / kv - 1
    row["mlx_lm_file_overhead"] = row["mlx_lm_file_bytes"] / kv - 1


def _evaluate_targets(rows: Sequence[dict]) -> list[dict]:
    """Each target, per row where it was measured: value, goal, met (figures, never test assertions)."""
    out = []
    for name, key, goal, kind in TARGETS:
        for row in rows:
            value = row.get(key)
            row_goal = row.get("paper_prefill_over_decode_step") if goal is None else goal
            if value is None or row_goal is None:
                continue
            met = value >= row_goal if kind == "min" else value <= row_goal
            out.append({"name": name, "key": key, "tokens": row["tokens"], "value": value, "goal": row_goal,
                        "kind": kind, "met": met})
    return out


def _paper_keys(n: int) -> dict:
    prefill_s, step_s = PAPER_M1_PRO.get(n, (None, None))
    return {"paper_prefill_s": prefill_s, "paper_decode_step_s": step_s,
            "paper_prefill_over_decode_step": prefill_s / step_s if prefill_s else None}


def _result(mode: str, config: dict, rows: list[dict], roofs: list[dict]) -> dict:
    return {
        "kind": "kvmlx-bench", "mode": mode, "machine": machine_info(), "config": config,
        "roofline": roofs, "results": rows, "targets": _evaluate_targets(rows),
        "paper": {"source": "Can I Buy Your KV Cache? (Qwen3-4B fp16, Apple M1 Pro, median of 5)",
                  "rows": [{"tokens": n, "prefill_s": p, "decode_step_s": d, "prefill_over_decode_step": p / d}
                           for n, (p, d) in PAPER_M1_PRO.items()]},
    }


def _base_config(lengths: Sequence[int], runs: int, cold: bool, chunk_size: int, directory: Path) -> dict:
    cold_note = None
    if not cold:
        cold_note = "cold loads not measured (--no-cold)"
    elif not can_evict():
        cold_note = (f"cold loads not measured: {sys.platform} has no posix_fadvise to evict one file from the "
                     "page cache (on macOS, `sudo purge` drops all caches)")
    return {"lengths": list(lengths), "runs": runs, "chunk_size": chunk_size, "directory": str(directory),
            "cold": cold and can_evict(), "cold_note": cold_note, "gb": GB,
            "bandwidth_bytes": "the document's KV bytes (no padding, no logits)"}


def _each_length(lengths: Sequence[int], runs: int, cold: bool, chunk_size: int,
                 directory: str | os.PathLike | None, shape: KVShape,
                 row: Callable[[int, Path, bool], tuple[dict, dict]]) -> tuple[dict, list[dict], list[dict]]:
    """(config, rows, rooflines): `row(tokens, tmp, cold)` at each length, with its artifacts in one
    temporary directory under `directory` (removed afterwards) and MLX's buffer cache kept warm."""
    with tempfile.TemporaryDirectory(prefix="kvmlx-bench-", dir=directory) as tmp, _warm_buffers(shape, lengths):
        config = _base_config(lengths, runs, cold, chunk_size, Path(tmp).parent)
        results = [row(n, Path(tmp), config["cold"]) for n in lengths]
    return config, [r for r, _ in results], [roof for _, roof in results]


def _check(lengths: Sequence[int], runs: int) -> None:
    if not lengths or min(lengths) < 1:
        raise ValueError("lengths must be positive token counts")
    if runs < 1:
        raise ValueError("runs must be at least 1")


class _Phases:
    """Counts finished phases for a progress callback whose total is known upfront."""

    def __init__(self, total: int, progress: ProgressFn | None):
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, tokens: int, phase: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, f"{tokens} tok: {phase}")
