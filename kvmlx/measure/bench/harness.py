"""`kvmlx bench`: what loading a published KV costs next to prefill and to mlx-lm's prompt cache, load included.

"Can I Buy Your KV Cache?" timed reuse as one decode step over a KV already in memory: disk I/O and
deserialisation were left out. Here every reuse figure includes getting the KV into memory, measured
side by side with mlx-lm's own `save_prompt_cache` / `load_prompt_cache` and with the machine's
roofline (memcpy, page-cache read, cold sequential read, fsync'd write), all in the same run.

Two modes:

- `run_model_bench`: a real model (default the built-in small Qwen3). Per document length: prefill from
  scratch (chunked like `publish`), one decode step over a resident KV (the paper's reuse metric),
  kvmlx's save and loads, load + first token (one model step over the agent's first suffix token, not
  the stored logits, which would make it free) for every load path kvmlx offers here, the first step
  after a load against a resident step, and the same for mlx-lm's prompt cache of the same KV.
- `run_shape_bench`: the load path alone on synthetic KV of a real model's shape (e.g. Qwen3-4B fp16:
  3774 tokens = 557 MB), no model and no prefill, so load figures are at real size on any machine.

Regimes of a load (each figure: median over `runs`, with min, max and quartiles):

- warm: the file is in the OS page cache and the destination memory is already touched: MLX's
  buffer-cache limit is raised for the run and one untimed load goes first, so each load reuses the
  previous one's freed buffers (a process that has loaded before).
- fresh: the file is in the page cache; before each run MLX's buffer cache is emptied and glibc's
  heap trimmed, so destinations are new pages that fault on first touch (a process's first load).
- cold: the file is evicted from the page cache before each run (fsync, then POSIX_FADV_DONTNEED);
  memory as in warm. Platforms without `posix_fadvise` (macOS) cannot evict one file: cold figures
  are then absent and `config.cold_note` says why.

Bandwidths (GB/s, 1e9 bytes) are the document's KV bytes (no padding, no logits) per second, so
kvmlx and mlx-lm are compared on the same payload. Every timed region forces evaluation (`mx.eval`
of every cache array): MLX is lazy, and a lazy load looks free.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

from .. import __version__
from ..artifact.encodings import decode, encode
from ..artifact.format import DTYPE_SIZES, ENCODINGS, SETTLED_SECONDS, Artifact, TensorData, digest, forget_verified, write_artifact
from ..runtime.generate import compare, continue_from
from ..artifact.identity import config_geometry
from ..runtime.load import DEFAULT_HEADROOM, DTYPES, LOAD_PATHS, load_artifact, read_caches, zero_copy_available
from ..models import LoadedModel
from ..runtime.publish import DEFAULT_CHUNK, prefill, publish

T = TypeVar("T")
ProgressFn = Callable[[int, int, str], None]  # (phases done, phases in all, what just finished)

#: The paper's Qwen3-4B fp16 figures on an M1 Pro (median of 5): tokens -> (prefill s, one decode step s).
PAPER_M1_PRO: dict[int, tuple[float, float]] = {
    255: (0.67, 0.078), 485: (1.29, 0.093), 945: (2.65, 0.122), 1888: (5.81, 0.179), 3774: (14.71, 0.296),
}
DEFAULT_LENGTHS = tuple(PAPER_M1_PRO)
DEFAULT_RUNS = 5
GB = 1e9

# Each row reports progress once per phase, whatever the options, so a bar's total is known upfront.
MODEL_PHASES = ("prefill", "decode step", "saves", "loads", "load + first token", "mlx-lm load + first token", "roofline")
SHAPE_PHASES = ("synthesize", "saves", "loads", "roofline")
# Timings that move the document's KV, hence get a bandwidth and a roofline fraction (mlx-lm's bare
# save is left out: without its fsync it is not comparable with the fsync'd write ceiling).
_MOVES_KV = re.compile(r"^(kvmlx_(load_\w+|save)|mlx_lm_(load_(warm|fresh|cold)|save_durable))_s$")

# The figures the issue set for kvmlx: (name, row key, goal, "min" = value >= goal | "max" = value <= goal).
TARGETS = (
    ("warm load vs mlx-lm load_prompt_cache (x faster)", "kvmlx_load_warm_speedup_vs_mlx_lm", 2.5, "min"),
    ("  the same, a re-load (digests checked at first load)", "kvmlx_load_warm_reload_speedup_vs_mlx_lm", 2.5, "min"),
    ("warm load / memcpy bandwidth", "kvmlx_load_warm_frac_memcpy", 0.75, "min"),
    ("  the same, a re-load", "kvmlx_load_warm_reload_frac_memcpy", 0.75, "min"),
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


# -- small pieces -------------------------------------------------------------------------------------

def parse_lengths(text: str) -> tuple[int, ...]:
    """"255,485" -> (255, 485); raises ValueError on anything but positive integers."""
    try:
        lengths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive integers, got {text!r}")
    return lengths


def summarize(samples: Sequence[float]) -> dict:
    """Median, spread (min/max and quartiles) and the samples themselves."""
    q1, median, q3 = (float(x) for x in np.percentile(samples, [25, 50, 75]))
    return {"median": median, "min": float(min(samples)), "max": float(max(samples)), "q1": q1, "q3": q3,
            "n": len(samples), "samples": [float(s) for s in samples]}


def evict(path: str | os.PathLike) -> bool:
    """Drop a file's pages from the OS page cache (fsync first: only clean pages can go).

    Returns False where the platform offers no per-file eviction (no `posix_fadvise`, e.g. macOS).
    """
    if not can_evict():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def can_evict() -> bool:
    """Whether this platform can drop one file from the page cache (cold loads need it)."""
    return hasattr(os, "posix_fadvise")


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


def machine_info() -> dict:
    """What the figures belong to: they are properties of the machine, never of kvmlx alone."""
    versions = {"python": platform.python_version(), "kvmlx": __version__, "kvmlx_git": _git_revision(),
                "mlx": mx.__version__}
    for dist in ("mlx-lm", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
        "cores": os.cpu_count(), "memory_bytes": _memory_bytes(), "mlx_device": str(mx.default_device()),
        "metal": mx.metal.is_available(), "versions": versions, "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages when the result is made: other work on the machine skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git_revision() -> str | None:
    """The commit kvmlx runs from ("+dirty" with local changes), when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty=+dirty"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _repeat(fn: Callable[[], T], runs: int, *, before: Callable[[], object] | None = None,
            warmup: bool = True) -> list[T]:
    """`runs` results of `fn` (which times itself), after one untimed call when `warmup`."""
    if warmup:
        fn()
    out = []
    for _ in range(runs):  # the previous run's arrays are already freed (reference counting)
        if before is not None:
            before()
        out.append(fn())
    return out


def _in_regime(fn: Callable[[], T], runs: int, regime: str, path: Path) -> list[T]:
    """`runs` results of `fn` (a load of `path`) in one regime of the module docstring."""
    if regime == "fresh":
        return _repeat(fn, runs, before=release_memory, warmup=False)
    release_memory()  # start from the same state whatever ran before; the untimed first run fills MLX's cache
    return _repeat(fn, runs, before=(lambda: evict(path)) if regime == "cold" else None)


def release_memory() -> None:
    """Hand freed memory back to the OS: MLX's buffer cache, then glibc's free lists (where glibc runs).

    After this, the next load's destination buffers are new pages that fault on first touch.
    """
    gc.collect()
    mx.clear_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None  # not glibc (macOS, musl): MLX's own cache is all there is to clear


_malloc_trim = _find_malloc_trim()


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


# -- the roofline --------------------------------------------------------------------------------------

def roofline(nbytes: int, directory: str | os.PathLike, *, runs: int = 3, cold: bool = True) -> dict:
    """The machine's ceilings for moving `nbytes`, measured now, in `directory`'s file system.

    - memcpy: numpy copy into already-touched memory (what a warm load's copy cannot beat);
    - write_fsync: a new file written sequentially, fsync'd (a save's ceiling);
    - page_cache_read: the file read back from the page cache with parallel `preadv` calls (like
      `mx.load`'s) into a touched buffer (a warm read-based load's ceiling);
    - cold_read: a plain sequential read of it after eviction (a cold load's ceiling; absent where
      eviction is unavailable).

    Buffers are page-aligned: the kernel's copy to user memory runs several times slower when the
    destination address and the file offset differ modulo the cache line (measured on x86-64).
    """
    src, dst = _aligned(nbytes), _aligned(nbytes)
    src[:] = np.arange(nbytes, dtype=np.uint8)  # touched, like dst: no page faults inside timed regions
    dst[:] = 1
    path = Path(directory) / ".roofline.bin"
    chunk = 8 << 20
    threads = min(8, max(2, os.cpu_count() or 1))

    def copy() -> float:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0

    def write() -> float:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(src)
            while view:
                view = view[os.write(fd, view[:chunk]) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t0

    def read_at(fd: int, offset: int) -> None:
        view = memoryview(dst)[offset : offset + chunk]
        while view:
            n = os.preadv(fd, [view], offset)
            view, offset = view[n:], offset + n

    def read(parallel: bool) -> float:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            if parallel:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda offset: read_at(fd, offset), range(0, nbytes, chunk)))
            else:
                for offset in range(0, nbytes, chunk):
                    read_at(fd, offset)
        finally:
            os.close(fd)
        return time.perf_counter() - t0

    try:
        figures = {"memcpy": _repeat(copy, runs),
                   "write_fsync": _repeat(write, runs, before=lambda: path.unlink(missing_ok=True)),
                   "page_cache_read": _repeat(lambda: read(True), runs)}
        if cold and can_evict():
            figures["cold_read"] = _repeat(lambda: read(False), runs, before=lambda: evict(path))
    finally:
        path.unlink(missing_ok=True)
    out: dict[str, Any] = {"bytes": nbytes, "read_threads": threads}
    for name in ("memcpy", "write_fsync", "page_cache_read", "cold_read"):
        stats = summarize(figures[name]) if name in figures else None
        out[f"{name}_s"] = stats
        out[f"{name}_GBps"] = nbytes / stats["median"] / GB if stats else None
    return out


def _aligned(nbytes: int, alignment: int = 16384) -> np.ndarray:
    """A uint8 buffer of nbytes starting on an `alignment` boundary."""
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes]


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
    """Wait until `path` is old enough to be recorded as verified (format.SETTLED_SECONDS)."""
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


# -- model mode ----------------------------------------------------------------------------------------

def run_model_bench(
    lm: LoadedModel,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    runs: int = DEFAULT_RUNS,
    *,
    directory: str | os.PathLike | None = None,
    cold: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    progress: ProgressFn | None = None,
) -> dict:
    """Prefill vs reuse (load included) on `lm` at each document length; kvmlx and mlx-lm side by side.

    Temporary artifacts go in a fresh temporary directory under `directory` (default: the system's),
    removed afterwards. Returns the JSON-ready result described in docs/BENCHMARKS.md.
    """
    _check(lengths, runs)
    paths = available_load_paths()
    tick = _Phases(len(lengths) * len(MODEL_PHASES), progress)
    geometry = config_geometry(lm.model, lm.config)
    shape = KVShape(lm.model_id, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, lm.dtype)
    prefill(lm.model, document_tokens(lm.tokenizer, 16), make_prompt_cache(lm.model), chunk_size)  # first-call costs
    config, rows, roofs = _each_length(
        lengths, runs, cold, chunk_size, directory, shape,
        lambda n, tmp, cold: _model_row(lm, n, runs, tmp, cold, chunk_size, paths, tick))
    config.update(model=lm.model_id, dtype=lm.dtype, load_paths=paths)
    return _result("model", config, rows, roofs)


def _prefill_timed(lm: LoadedModel, tokens: Sequence[int], chunk_size: int) -> tuple[list, float]:
    cache = make_prompt_cache(lm.model)
    t0 = time.perf_counter()
    prefill(lm.model, tokens, cache, chunk_size)
    return cache, time.perf_counter() - t0


def _model_row(lm: LoadedModel, n: int, runs: int, tmp: Path, cold: bool, chunk_size: int,
               paths: Sequence[str], tick: _Phases) -> tuple[dict, dict]:
    ids = document_tokens(lm.tokenizer, n + 1)
    doc, token = ids[:n], ids[n]  # the agent's first suffix token continues the document
    art_path, mlx_path = tmp / f"doc-{n}.kvmlx", tmp / f"doc-{n}.safetensors"

    # Prefill: the first run is a real `publish` (it writes the artifact); the last keeps its cache resident.
    pub = publish(lm, doc, art_path, chunk_size=chunk_size)
    cache, seconds = _prefill_timed(lm, doc, chunk_size)
    prefill_s = ([pub.prefill_seconds, seconds] + [_prefill_timed(lm, doc, chunk_size)[1] for _ in range(runs - 2)])[:runs]
    saves = _repeat(lambda: _mlx_lm_save(mlx_path, cache), runs, before=lambda: mlx_path.unlink())  # before a step grows it
    tick(n, "prefill")

    def resident_step() -> float:
        t0 = time.perf_counter()
        mx.eval(lm.model(mx.array([[token]]), cache=cache)[0, -1])
        seconds = time.perf_counter() - t0
        for c in cache:
            c.trim(1)  # back to the document: every run steps over the same n tokens
        return seconds

    row: dict[str, Any] = {"tokens": n, "prefill_s": summarize(prefill_s), "decode_step_s": summarize(_repeat(resident_step, runs))}
    tick(n, "decode step")

    header, tensors = _artifact_contents(art_path)
    row["kvmlx_save_s"] = summarize(_repeat(lambda: _kvmlx_save(art_path, header, tensors), runs,
                                            before=lambda: art_path.unlink()))
    row.update(kv_bytes=pub.kv_bytes, artifact_bytes=pub.artifact_bytes)
    row.update(mlx_lm_save_s=summarize([s for s, _ in saves]), mlx_lm_save_durable_s=summarize([d for _, d in saves]),
               mlx_lm_file_bytes=mlx_path.stat().st_size)
    tick(n, "saves")

    row["load_path"] = load_artifact(art_path, lm).load_path
    row.update(_load_figures(lambda verify: load_artifact(art_path, lm, verify_digests=verify).caches,
                             art_path, mlx_path, runs, cold))
    tick(n, "loads")

    def first_token(load: Callable[[], Sequence[Any]], path: Path, regime: str) -> tuple[dict, dict]:
        timings = _in_regime(lambda: _first_token(load, lm.model, token), runs, regime, path)
        return summarize([t for t, _ in timings]), summarize([s for _, s in timings])

    by_path, first_step = {}, {}
    for p in paths:
        by_path[p], first_step[p] = first_token(lambda: _first_contact(
            lambda verify: load_artifact(art_path, lm, verify_digests=verify, load_path=p).caches), art_path, "warm")
    row.update(load_first_token_by_path=by_path, first_step_after_load_by_path=first_step,
               load_first_token_s=by_path[row["load_path"]], first_step_after_load_s=first_step[row["load_path"]])
    if cold:
        row["load_first_token_cold_s"] = first_token(
            lambda: _first_contact(lambda verify: load_artifact(art_path, lm, verify_digests=verify).caches), art_path,
            "cold")[0]
    tick(n, "load + first token")

    mlx_load = lambda: load_prompt_cache(str(mlx_path))  # noqa: E731
    row["mlx_lm_load_first_token_s"] = first_token(mlx_load, mlx_path, "warm")[0]
    if cold:
        row["mlx_lm_load_first_token_cold_s"] = first_token(mlx_load, mlx_path, "cold")[0]
    tick(n, "mlx-lm load + first token")

    roof = roofline(pub.kv_bytes, tmp, runs=runs, cold=cold)
    roof["tokens"] = n
    tick(n, "roofline")
    art_path.unlink()
    mlx_path.unlink()

    med = lambda key: row[key]["median"]  # noqa: E731
    row["prefill_over_decode_step"] = med("prefill_s") / med("decode_step_s")
    row["prefill_over_load_first_token"] = med("prefill_s") / med("load_first_token_s")
    row["prefill_over_mlx_lm_load_first_token"] = med("prefill_s") / med("mlx_lm_load_first_token_s")
    if cold:
        row["prefill_over_load_first_token_cold"] = med("prefill_s") / med("load_first_token_cold_s")
        row["prefill_over_mlx_lm_load_first_token_cold"] = med("prefill_s") / med("mlx_lm_load_first_token_cold_s")
    row["first_step_over_resident"] = med("first_step_after_load_s") / med("decode_step_s")
    row.update(_paper_keys(n))
    _derive(row, roof)
    return row, roof


def _artifact_contents(path: Path) -> tuple[dict, list[TensorData]]:
    """An artifact's header (less what write_artifact computes) and tensors, in memory: to write it again."""
    with Artifact(path) as art:
        header = {k: v for k, v in art.header.items() if k not in ("tensors", "file_bytes")}
        tensors = [TensorData(t.name, t.dtype, t.shape, memoryview(bytearray(art.tensor_bytes(t.name, verify=False))))
                   for t in art.tensors.values()]
    return header, tensors


# -- shape mode ----------------------------------------------------------------------------------------

def run_shape_bench(
    shape: KVShape | str,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    runs: int = DEFAULT_RUNS,
    *,
    directory: str | os.PathLike | None = None,
    cold: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    progress: ProgressFn | None = None,
) -> dict:
    """kvmlx's and mlx-lm's save and load of synthetic KV of `shape`'s exact size: no model, no prefill.

    kvmlx loads with `read_caches(Artifact(path, populate=True), ...)`, exactly what `load_artifact`
    runs after its model checks; mlx-lm saves `KVCache`s holding the same values (with the capacity a
    chunked prefill leaves them) and loads them with `load_prompt_cache`.
    """
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    _check(lengths, runs)
    tick = _Phases(len(lengths) * len(SHAPE_PHASES), progress)
    config, rows, roofs = _each_length(
        lengths, runs, cold, chunk_size, directory, shape,
        lambda n, tmp, cold: _shape_row(shape, n, runs, tmp, cold, chunk_size, tick))
    config["shape"] = asdict(shape)
    return _result("shape", config, rows, roofs)


def synthetic_kv(shape: KVShape, n: int, seed: int = 0) -> list[np.ndarray]:
    """2 x num_layers arrays [1, heads, n, head_dim] of normal values, as raw bits of `shape.dtype`."""
    rng = np.random.default_rng([seed, n])
    dims = (1, shape.num_kv_heads, n, shape.head_dim)
    return [_as_dtype(rng.standard_normal(dims, dtype=np.float32), shape.dtype) for _ in range(2 * shape.num_layers)]


def _as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> float16 / float32, or bfloat16 as its upper 16 bits (numpy has no bfloat16)."""
    if dtype == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype({"float16": np.float16, "float32": np.float32}[dtype])


def _mlx_buffer(a: np.ndarray, capacity: int, dtype: str) -> mx.array:
    """`a` [1, H, n, D] in an MLX array of `capacity` slots, the first n filled: a KVCache buffer after prefill."""
    b, heads, n, head_dim = a.shape
    buf = np.zeros((b, heads, capacity, head_dim), a.dtype)
    buf[:, :, :n] = a
    return mx.array(buf).view(DTYPES[dtype]) if dtype == "bfloat16" else mx.array(buf)


def synthetic_header(shape: KVShape, n: int, chunk_size: int) -> dict:
    """A header like publish's, with fingerprints that name no real model (nothing can load it by mistake)."""
    fake = lambda what: "blake3:" + digest(f"kvmlx bench synthetic {what} {shape.name}".encode())  # noqa: E731
    return {
        "created_by": f"kvmlx {__version__} bench (mlx {mx.__version__})",
        "model": {"id": f"synthetic:{shape.name}", "fingerprint": fake("model"), "model_type": "synthetic",
                  "num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                  "rope": {}},
        "tokenizer": {"fingerprint": fake("tokenizer")},
        "kv": {"dtype": shape.dtype, "layout": "BHLD", "num_tokens": n, "chunk_size": chunk_size},
        "document": {"tokens": [i % 1000 for i in range(n)], "text_blake3": None},
    }


def _read_synthetic(path: Path, verify: bool) -> tuple[list[KVCache], str]:
    """What load_artifact runs after its model checks: open (pre-faulted), read_caches, release the map."""
    art = Artifact(path, populate=True)
    try:
        caches, _, used = read_caches(art, verify_digests=verify)
    finally:
        try:
            art.close()
        except BufferError:
            pass  # zero-copy arrays still use the map; it closes when they are freed
    return caches, used


def _shape_row(shape: KVShape, n: int, runs: int, tmp: Path, cold: bool, chunk_size: int,
               tick: _Phases) -> tuple[dict, dict]:
    kv = synthetic_kv(shape, n)
    logits = _as_dtype(np.random.default_rng([1, n]).standard_normal(shape.vocab_size, dtype=np.float32), shape.dtype)
    names = [f"layers.{i}.{kind}" for i in range(shape.num_layers) for kind in ("keys", "values")]
    tensors = [TensorData(name, shape.dtype, a.shape, memoryview(a).cast("B")) for name, a in zip(names, kv)]
    tensors.append(TensorData("logits", shape.dtype, logits.shape, memoryview(logits).cast("B")))
    header = synthetic_header(shape, n, chunk_size)
    capacity = _mlx_lm_capacity(n, chunk_size)
    caches = []
    for keys, values in zip(kv[::2], kv[1::2]):
        cache = KVCache()
        cache.keys, cache.values = (_mlx_buffer(a, capacity, shape.dtype) for a in (keys, values))
        cache.offset = n
        caches.append(cache)
    mx.eval([c.state[:2] for c in caches])
    tick(n, "synthesize")

    art_path, mlx_path = tmp / f"shape-{n}.kvmlx", tmp / f"shape-{n}.safetensors"
    row: dict[str, Any] = {"tokens": n, "kv_bytes": shape.kv_bytes(n), "kvmlx_save_s": summarize(
        _repeat(lambda: _kvmlx_save(art_path, header, tensors), runs, before=lambda: art_path.unlink()))}
    row["artifact_bytes"] = art_path.stat().st_size
    del kv, tensors
    row["load_path"] = _read_synthetic(art_path, False)[1]

    saves = _repeat(lambda: _mlx_lm_save(mlx_path, caches), runs, before=lambda: mlx_path.unlink())
    row.update(mlx_lm_save_s=summarize([s for s, _ in saves]), mlx_lm_save_durable_s=summarize([d for _, d in saves]),
               mlx_lm_file_bytes=mlx_path.stat().st_size)
    del caches
    tick(n, "saves")
    row.update(_load_figures(lambda verify: _read_synthetic(art_path, verify)[0], art_path, mlx_path, runs, cold))
    tick(n, "loads")

    roof = roofline(row["kv_bytes"], tmp, runs=runs, cold=cold)
    roof["tokens"] = n
    tick(n, "roofline")
    art_path.unlink()
    mlx_path.unlink()
    row.update(_paper_keys(n))
    _derive(row, roof)
    return row, roof


# -- output --------------------------------------------------------------------------------------------

def _dur(stats: dict | None) -> str:
    """'12.3 ms [11.9-13.0]': median and min-max, in ms below a second, else in s."""
    if not stats:
        return "-"
    scale, unit = (1e3, "ms") if stats["median"] < 1 else (1.0, "s")
    fmt = lambda x: f"{x * scale:.3g}" if x * scale < 100 else f"{x * scale:.0f}"  # noqa: E731
    return f"{fmt(stats['median'])} {unit} [{fmt(stats['min'])}-{fmt(stats['max'])}]"


def _num(x: float | None, fmt: str = ".3g", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()  # noqa: E731
    return ["", title, line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_table(result: dict) -> str:
    """The result as plain-text tables: reuse vs prefill, loads, saves and bytes, roofline, targets."""
    m, c, rows = result["machine"], result["config"], result["results"]
    if result["mode"] == "model":
        what = f"{c['model']} ({c['dtype']})"
    else:
        sh = c["shape"]
        what = (f"synthetic {sh['name']} KV ({sh['num_layers']} layers x {sh['num_kv_heads']} KV heads x "
                f"head_dim {sh['head_dim']}, {sh['dtype']}), no model")
    out = [
        f"kvmlx bench: {what}",
        f"machine: {m['cpu']}, {m['cores']} cores, {_num((m['memory_bytes'] or 0) / 2**30, '.0f')} GiB, "
        f"{m['platform']}; MLX {m['versions']['mlx']} on {m['mlx_device']}, mlx-lm {m['versions']['mlx-lm']}, "
        f"kvmlx {m['versions']['kvmlx']}" + (f" ({m['versions']['kvmlx_git']})" if m["versions"]["kvmlx_git"] else ""),
        f"median [min-max] of {c['runs']} runs; load path: {', '.join(sorted({r['load_path'] for r in rows}))}; "
        "GB/s = KV bytes / s",
        "warm = file in page cache, memory already touched; fresh = file in page cache, new memory; "
        "cold = file evicted from page cache",
    ]
    if m.get("load_average"):
        out.append(f"load average at the end (1/5/15 min): {' / '.join(map(str, m['load_average']))}")
    if c["cold_note"]:
        out.append(c["cold_note"])
    ratio = lambda x: _num(x, ".1f", "x")  # noqa: E731
    if result["mode"] == "model":
        out += _table(
            "Prefill vs reuse (reuse = load + one model step over the agent's first suffix token; warm)",
            ["tokens", "prefill", "decode step", "prefill/step", "paper M1 Pro", "kvmlx load+1st", "prefill/that",
             "mlx-lm load+1st", "prefill/that"],
            [[str(r["tokens"]), _dur(r["prefill_s"]), _dur(r["decode_step_s"]), ratio(r["prefill_over_decode_step"]),
              ratio(r["paper_prefill_over_decode_step"]), _dur(r["load_first_token_s"]),
              ratio(r["prefill_over_load_first_token"]), _dur(r["mlx_lm_load_first_token_s"]),
              ratio(r["prefill_over_mlx_lm_load_first_token"])] for r in rows])
        if c["cold"]:
            out += _table(
                "Reuse from a cold file (evicted from the page cache)",
                ["tokens", "kvmlx load+1st", "prefill/that", "mlx-lm load+1st", "prefill/that"],
                [[str(r["tokens"]), _dur(r["load_first_token_cold_s"]), ratio(r["prefill_over_load_first_token_cold"]),
                  _dur(r["mlx_lm_load_first_token_cold_s"]), ratio(r["prefill_over_mlx_lm_load_first_token_cold"])]
                 for r in rows])
        paths = c["load_paths"]
        out += _table(
            "Load paths: load + first token (warm); the first step after a load vs a resident step",
            ["tokens", *[f"{p} load+1st" for p in paths], "first step after load", "resident step", "ratio"],
            [[str(r["tokens"]), *[_dur(r["load_first_token_by_path"][p]) for p in paths],
              _dur(r["first_step_after_load_s"]), _dur(r["decode_step_s"]), _num(r["first_step_over_resident"], ".2f", "x")]
             for r in rows])
    regimes = ("warm", "fresh", "cold") if c["cold"] else ("warm", "fresh")
    out += _table(
        "kvmlx loads: first load of the file (every digest hashed), re-load of it unchanged (checked at first load), "
        "no verification",
        ["tokens", "KV MB", *regimes, *[f"{g} re-load" for g in regimes], *[f"{g} no-verify" for g in regimes]],
        [[str(r["tokens"]), _num(r["kv_bytes"] / 1e6, ".1f"),
          *[_dur(r[f"kvmlx_load_{g}{how}_s"]) for how in ("", "_reload", "_noverify") for g in regimes]] for r in rows])
    out += _table(
        "mlx-lm load_prompt_cache of the same KV, and kvmlx's speedup (mlx-lm time / kvmlx time; first load, re-load)",
        ["tokens", *[f"mlx-lm {g}" for g in regimes], *[f"speedup {g}" for g in regimes],
         *[f"re-load {g}" for g in regimes]],
        [[str(r["tokens"]), *[_dur(r[f"mlx_lm_load_{g}_s"]) for g in regimes],
          *[_num(r.get(f"kvmlx_load_{g}{how}_speedup_vs_mlx_lm"), ".2f", "x") for how in ("", "_reload") for g in regimes]]
         for r in rows])
    out += _table(
        "Saves and bytes (kvmlx: publish's write, fsync included; mlx-lm: save_prompt_cache, then + fsync)",
        ["tokens", "kvmlx save", "GB/s", "mlx-lm save", "+ fsync", "GB/s", "artifact MB", "vs KV", "mlx-lm MB",
         "vs KV"],
        [[str(r["tokens"]), _dur(r["kvmlx_save_s"]), _num(r["kvmlx_save_GBps"], ".2f"), _dur(r["mlx_lm_save_s"]),
          _dur(r["mlx_lm_save_durable_s"]), _num(r["mlx_lm_save_durable_GBps"], ".2f"),
          _num(r["artifact_bytes"] / 1e6, ".2f"), _num(100 * r["artifact_overhead"], "+.2f", "%"),
          _num(r["mlx_lm_file_bytes"] / 1e6, ".2f"), _num(100 * r["mlx_lm_file_overhead"], "+.2f", "%")] for r in rows])
    out += _table(
        "Roofline (GB/s, measured in this run at each KV size)",
        ["tokens", "memcpy", "page-cache read", "cold seq. read", "fsync write"],
        [[str(f["tokens"]), *[_num(f[f"{k}_GBps"], ".2f") for k in ("memcpy", "page_cache_read", "cold_read", "write_fsync")]]
         for f in result["roofline"]])
    out += _table(
        "Each path as a fraction of its ceiling (warm and fresh loads: memcpy; cold: sequential read; saves: write)",
        ["tokens", "kvmlx warm", "fresh", "cold", "save", "mlx-lm warm", "fresh", "cold", "save + fsync"],
        [[str(r["tokens"]), *[_pct(r.get(k)) for k in (
            "kvmlx_load_warm_frac_memcpy", "kvmlx_load_fresh_frac_memcpy", "kvmlx_load_cold_frac_seq_read",
            "kvmlx_save_frac_write", "mlx_lm_load_warm_frac_memcpy", "mlx_lm_load_fresh_frac_memcpy",
            "mlx_lm_load_cold_frac_seq_read", "mlx_lm_save_durable_frac_write")]] for r in rows])
    names = list(dict.fromkeys(t["name"] for t in result["targets"]))
    lengths = [r["tokens"] for r in rows]
    cells = {(t["name"], t["tokens"]): f"{t['value']:.3g} {'ok' if t['met'] else 'MISS'}" for t in result["targets"]}
    goals = {t["name"]: ("paper's" if t["key"] == "prefill_over_load_first_token" else
                         f"{'>=' if t['kind'] == 'min' else '<='} {t['goal']:g}") for t in result["targets"]}
    out += _table("Targets (benchmark figures, not tests)", ["target", "goal", *map(str, lengths)],
                  [[name, goals[name], *[cells.get((name, n), "-") for n in lengths]] for name in names])
    return "\n".join(out)


def plot(result: dict, path: str | os.PathLike) -> Path:
    """A PNG of time vs document length (log-log), with the paper's M1 Pro prefill and decode step for reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's backend
    from matplotlib.figure import Figure

    rows = result["results"]
    x = [r["tokens"] for r in rows]
    fig = Figure(figsize=(8.5, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def series(key: str, label: str, style: str, color: str) -> None:
        points = [(n, r[key]) for n, r in zip(x, rows) if r.get(key)]
        if not points:
            return
        med = np.array([s["median"] for _, s in points])
        spread = [med - [s["min"] for _, s in points], [s["max"] for _, s in points] - med]
        ax.errorbar([n for n, _ in points], med, yerr=spread, fmt=style, color=color, lw=2, ms=5, capsize=3, label=label)

    if result["mode"] == "model":
        series("prefill_s", "prefill (from scratch)", "o-", "black")
        series("decode_step_s", "one decode step over a resident KV", "s-", "tab:gray")
        series("load_first_token_s", "kvmlx load + first token (warm)", "o-", "tab:blue")
        series("load_first_token_cold_s", "kvmlx load + first token (cold)", "o:", "tab:blue")
        series("mlx_lm_load_first_token_s", "mlx-lm load_prompt_cache + first token (warm)", "^-", "tab:orange")
        series("mlx_lm_load_first_token_cold_s", "mlx-lm load_prompt_cache + first token (cold)", "^:", "tab:orange")
        title = f"{result['config']['model']} ({result['config']['dtype']})"
    else:
        series("kvmlx_load_warm_s", "kvmlx load (warm, first load: every digest hashed)", "o-", "tab:blue")
        series("kvmlx_load_warm_reload_s", "kvmlx re-load (warm, digests checked at first load)", "s--", "tab:cyan")
        series("kvmlx_load_cold_s", "kvmlx load (cold)", "o:", "tab:blue")
        series("mlx_lm_load_warm_s", "mlx-lm load_prompt_cache (warm)", "^-", "tab:orange")
        series("mlx_lm_load_cold_s", "mlx-lm load_prompt_cache (cold)", "^:", "tab:orange")
        title = f"synthetic {result['config']['shape']['name']} KV, load only"
    paper = sorted(PAPER_M1_PRO.items())
    ax.plot([n for n, _ in paper], [p for _, (p, _) in paper], "--", color="black", alpha=0.5, label="paper, M1 Pro: prefill")
    ax.plot([n for n, _ in paper], [d for _, (_, d) in paper], "--", color="tab:gray", alpha=0.6,
            label="paper, M1 Pro: one decode step (its reuse metric)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("seconds (median; bars: min-max)")
    m = result["machine"]
    ax.set_title(f"{title}\n{m['cpu']}, {m['cores']} cores, MLX {m['versions']['mlx']} {m['mlx_device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    out = Path(path)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def run_compression_bench(
    lm: LoadedModel,
    length: int = 1024,
    *,
    runs: int = 3,
    encodings: Sequence[str] = tuple(ENCODINGS),
    max_tokens: int = 32,
    directory: str | os.PathLike | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """For each KV encoding: bytes per token, ratio to raw, encode and decode speed, and what it does
    to 32 greedy tokens and their logits compared with the raw artifact.

    The document is prefilled once; every encoding re-encodes those same tensors and is written as a
    real artifact and loaded through `load_artifact`, so the comparison isolates the encoding.
    """
    tokens = document_tokens(lm.tokenizer, length + 16)
    doc, suffix = tokens[:length], tokens[length:]
    with tempfile.TemporaryDirectory(prefix="kvmlx-compress-", dir=directory) as tmp:
        raw_path = Path(tmp) / "raw.kvmlx"
        publish(lm, doc, raw_path, chunk_size=chunk_size)
        raw = load_artifact(raw_path, lm)
        reference = _greedy(lm, raw_path, suffix, max_tokens)
        kv = [mx.contiguous(a[..., :length, :]) for c in raw.caches for a in (c.keys, c.values)]
        mx.eval(kv)
        raw_bytes = sum(x.nbytes for x in kv)
        names = [f"layers.{i}.{kind}" for i in range(len(raw.caches)) for kind in ("keys", "values")]
        dtype = raw.header["kv"]["dtype"]
        header = {k: v for k, v in raw.header.items() if k not in ("tensors", "file_bytes", "format", "version", "digest")}
        rows = []
        for done, encoding in enumerate(encodings):
            if encoding == "raw":
                blobs = [(bytes(memoryview(x).cast("B")), {}) for x in kv]
                encode_s = decode_s = None  # nothing to do: reported as null
                decoded = [np.frombuffer(b, np.uint8) for b, _ in blobs]
            else:
                encode_s = min(_seconds(lambda: [encode(x, encoding) for x in kv]) for _ in range(runs))
                blobs = [encode(x, encoding) for x in kv]
                decode_s = min(_seconds(lambda: [decode(memoryview(b), encoding, p, dtype, tuple(x.shape))
                                                 for (b, p), x in zip(blobs, kv)]) for _ in range(runs))
                decoded = [decode(memoryview(b), encoding, p, dtype, tuple(x.shape)) for (b, p), x in zip(blobs, kv)]
            bit_exact = all(np.array_equal(d, np.frombuffer(memoryview(x).cast("B"), np.uint8)) for d, x in zip(decoded, kv))
            path = Path(tmp) / f"{encoding}.kvmlx"
            tensors = [TensorData(n, dtype, tuple(x.shape), memoryview(b), encoding, p) for n, x, (b, p) in zip(names, kv, blobs)]
            logits = mx.contiguous(raw.logits)
            mx.eval(logits)
            tensors.append(TensorData("logits", dtype, tuple(logits.shape), memoryview(logits).cast("B")))
            write_artifact(path, {**header, "kv": {**header["kv"], "encoding": encoding, "lossless": ENCODINGS[encoding]}}, tensors)
            run = _greedy(lm, path, suffix, max_tokens)
            result = compare(run, reference)
            stored = sum(len(b) for b, _ in blobs)
            rows.append({
                "encoding": encoding, "lossless": ENCODINGS[encoding], "decoded_bit_exact": bit_exact,
                "bytes_per_token": stored / length, "ratio_to_raw": raw_bytes / stored,
                "encode_gb_s": raw_bytes / encode_s / 1e9 if encode_s else None,
                "decode_gb_s": raw_bytes / decode_s / 1e9 if decode_s else None,
                "tokens_agree": sum(a == b for a, b in zip(run.tokens, reference.tokens)),
                "tokens_compared": len(reference.tokens), "first_divergence": result["first_mismatch"],
                "max_abs_logit_diff": result["max_abs_logit_diff"], "artifact_bytes": path.stat().st_size,
            })
            if progress:
                progress(done + 1, len(encodings))
    return {
        "mode": "compression", "machine": machine_info(), "model": lm.model_id, "dtype": dtype, "tokens": length,
        "raw_kv_bytes": raw_bytes, "runs": runs, "rows": rows,
        "note": "random-weight built-in models give KV whose value statistics differ from a trained model's; "
                "rerun with --model Qwen/Qwen3-4B (or any mlx-lm model) for figures that transfer",
    }


def _greedy(lm: LoadedModel, path: Path, suffix: Sequence[int], max_tokens: int):
    return continue_from(lm, load_artifact(path, lm), suffix, max_tokens=max_tokens, stop_at_eos=False, keep_logits=True)


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def format_compression_table(result: dict) -> str:
    """The compression study as a readable table."""
    lines = [
        f"kvmlx bench --compression: {result['model']} ({result['dtype']}), {result['tokens']}-token document, "
        f"{result['raw_kv_bytes'] / 1e6:.1f} MB raw KV; best of {result['runs']} runs",
        f"note: {result['note']}",
        "",
        f"{'encoding':<15} {'lossless':>8} {'bit-exact':>9} {'B/token':>9} {'ratio':>6} {'enc GB/s':>8} {'dec GB/s':>8} "
        f"{'tokens':>7} {'max |dlogit|':>12}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['encoding']:<15} {str(r['lossless']):>8} {str(r['decoded_bit_exact']):>9} {r['bytes_per_token']:>9.0f} "
            f"{r['ratio_to_raw']:>6.3f} {_gbs(r['encode_gb_s']):>8} {_gbs(r['decode_gb_s']):>8} "
            f"{r['tokens_agree']:>3}/{r['tokens_compared']:<3} {r['max_abs_logit_diff']:>12.4g}"
        )
    return "\n".join(lines)


def _gbs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
