"""Model mode, `run_model_bench`: prefill vs reuse (load included) on a real model, kvmlx and mlx-lm side by side.

Per document length: prefill from scratch (chunked like `publish`), one decode step over a resident
KV (the paper's reuse metric), kvmlx's save and loads, load + first token (one model step over the
agent's first suffix token, not the stored logits, which would make it free) for every load path
kvmlx offers here, the first step after a load against a resident step, and the same for mlx-lm's
prompt cache of the same KV, with the roofline measured at that KV's size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache

from ...artifact.format import Artifact, TensorData
from ...artifact.identity import config_geometry
from ...models import LoadedModel
from ...runtime.load import load_artifact
from ...runtime.publish import DEFAULT_CHUNK, prefill, publish
from .harness import (
    DEFAULT_LENGTHS,
    DEFAULT_RUNS,
    MODEL_PHASES,
    KVShape,
    ProgressFn,
    _check,
    _derive,
    _each_length,
    _first_contact,
    _first_token,
    _kvmlx_save,
    _load_figures,
    _mlx_lm_save,
    _paper_keys,
    _Phases,
    _result,
    available_load_paths,
    document_tokens,
)
from .machine import _in_regime, _repeat, roofline, summarize


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
