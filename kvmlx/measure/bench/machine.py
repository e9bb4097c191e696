"""The machine a bench runs on: its description, its page cache and memory, the regimes of a load, its roofline.

Everything here is about the machine, never about kvmlx: `machine_info` (CPU, memory, versions, git
revision, load average: what the figures belong to), evicting one file from the page cache
(`evict`, `can_evict`), handing freed memory back to the OS (`release_memory`: MLX's buffer cache,
then glibc's heap), repeating a timed call in a regime (`_repeat`, `_in_regime`), `summarize` for
the samples, and `roofline`, the machine's ceilings for moving a KV's bytes. The regimes:

- warm: the file is in the OS page cache and the destination memory is already touched: MLX's
  buffer-cache limit is raised for the run and one untimed load goes first, so each load reuses the
  previous one's freed buffers (a process that has loaded before).
- fresh: the file is in the page cache; before each run MLX's buffer cache is emptied and glibc's
  heap trimmed, so destinations are new pages that fault on first touch (a process's first load).
- cold: the file is evicted from the page cache before each run (fsync, then POSIX_FADV_DONTNEED);
  memory as in warm. Platforms without `posix_fadvise` (macOS) cannot evict one file: cold figures
  are then absent and `config.cold_note` says why.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import mlx.core as mx
import numpy as np

from ... import __version__

T = TypeVar("T")
GB = 1e9


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
