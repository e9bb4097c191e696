"""Shape mode, `run_shape_bench`: kvmlx's and mlx-lm's saves and loads of synthetic KV of a real model's shape.

No model and no prefill: `synthetic_kv` and `synthetic_header` build an artifact of the exact size
of, e.g., Qwen3-4B fp16 (3774 tokens = 557 MB), so load figures are at real size on any machine.
kvmlx loads it with what `load_artifact` runs after its model checks; mlx-lm saves `KVCache`s
holding the same values (with the capacity a chunked prefill leaves them) and loads them back.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from ... import __version__
from ...artifact.format import Artifact, TensorData, digest
from ...runtime.load import DTYPES, read_caches
from ...runtime.publish import DEFAULT_CHUNK
from .harness import (
    DEFAULT_LENGTHS,
    DEFAULT_RUNS,
    SHAPE_PHASES,
    SHAPES,
    KVShape,
    ProgressFn,
    _check,
    _derive,
    _each_length,
    _kvmlx_save,
    _load_figures,
    _mlx_lm_capacity,
    _mlx_lm_save,
    _paper_keys,
    _Phases,
    _result,
)
from .machine import _repeat, roofline, summarize
from .spawn import new_process_figures


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
    row.update(new_process_figures(art_path, mlx_path, runs, tmp))
    tick(n, "loads")

    roof = roofline(row["kv_bytes"], tmp, runs=runs, cold=cold)
    roof["tokens"] = n
    tick(n, "roofline")
    art_path.unlink()
    mlx_path.unlink()
    row.update(_paper_keys(n))
    _derive(row, roof)
    return row, roof
