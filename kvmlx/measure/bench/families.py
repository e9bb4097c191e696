"""Families mode, `run_family_bench`: what each mlx-lm cache family costs in an artifact, side by side
with mlx-lm's own prompt cache of the same caches.

Per model (a built-in family preset, or any model) and one document length: the artifact's bytes
per token for each layer group (plain or quantized KV grows per token; a recurrent state or a
sliding window is a fixed size), the state checkpoints' overhead at several spacings (with the
spacing `auto` picks, and the tokens a prompt diverging at a random point recomputes on average,
E/2), for sliding windows what storing every position's KV would cost instead of window
checkpoints, warm load time (a re-load of a verified file, and a first load hashing every digest)
against mlx-lm's `load_prompt_cache` of the same caches, and whether
reuse through the saved file (whole document, and from a checkpoint below its end) is token-exact.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from ...artifact.format import read_header
from ...caches import KVQuantization, layer_groups, restore_info
from ...models import LoadedModel
from ...runtime.generate import compare, decode_timed, from_scratch, verify
from ...runtime.load import load_artifact
from ...runtime.publish import prefill, publish
from ...runtime.restore import caches_at
from .harness import ProgressFn, _first_contact, _settle, document_tokens
from .machine import _repeat, summarize

FAMILY_MODELS = ("builtin:tiny", "builtin:tiny --kv-bits 8", "builtin:tiny --kv-bits 4", "builtin:hybrid",
                 "builtin:sliding", "builtin:gpt-oss")
SPACINGS = (1, 2, 4, 8)  # checkpoint spacings measured, in chunks
VERIFY_TOKENS = 24


def run_family_bench(lm: LoadedModel, length: int, runs: int = 5, *, chunk_size: int = 64,
                     kv_quant: KVQuantization | None = None, directory: str | os.PathLike | None = None,
                     progress: ProgressFn | None = None) -> dict:
    """The families figures for `lm` at one document `length` (see the module docstring)."""
    tokens = document_tokens(lm.tokenizer, length)
    suffix = document_tokens(lm.tokenizer, length + 40)[length + 8 : length + 24]
    with tempfile.TemporaryDirectory(dir=directory, prefix="kvmlx-bench-") as tmp:
        tmp = Path(tmp)
        spacings, finest = {}, None
        for k in SPACINGS:  # one publish per spacing: the real files
            every = k * chunk_size
            if every >= length:
                break
            r = publish(lm, tokens, tmp / f"e{every}.kvmlx", chunk_size=chunk_size, kv_quant=kv_quant, checkpoint_every=every)
            if r.checkpoint_every is None:
                break
            finest = finest or r.path
            spacings[every] = {"checkpoints": r.num_checkpoints, "checkpoint_bytes": r.checkpoint_bytes,
                               "overhead": r.checkpoint_bytes / max(r.kv_bytes, 1), "mean_recompute_tokens": every / 2,
                               "artifact_bytes": r.artifact_bytes}
            _tick(progress, f"publish e{every}")
        path = tmp / "auto.kvmlx"
        t0 = time.perf_counter()
        result = publish(lm, tokens, path, chunk_size=chunk_size, kv_quant=kv_quant)
        publish_seconds = time.perf_counter() - t0
        header = read_header(path)
        _tick(progress, "publish auto")

        # mlx-lm's prompt cache of the same final caches (its own format, whole buffers)
        caches = make_prompt_cache(lm.model)
        prefill(lm.model, tokens, caches, chunk_size, quant=kv_quant)
        mlx_path = tmp / "mlx.safetensors"
        save_prompt_cache(str(mlx_path), caches)
        mlx_bytes = mlx_path.stat().st_size
        _settle(path)
        # the whole document's caches, as mlx-lm's file holds them (no checkpoint is read: at=length)
        first = summarize(_repeat(lambda: _timed(lambda: _first_contact(lambda v: load_artifact(path, lm, at=length).caches)), runs))
        ours = summarize(_repeat(lambda: _timed(lambda: load_artifact(path, lm, at=length).caches), runs))
        theirs = summarize(_repeat(lambda: _timed(lambda: load_prompt_cache(str(mlx_path))), runs))
        _tick(progress, "loads")

        whole = verify(path, lm, lm.tokenizer.decode(suffix), max_tokens=VERIFY_TOKENS)
        partial = _checkpoint_reuse(lm, finest or path, tokens, suffix, chunk_size, kv_quant)
        _tick(progress, "verify")
        groups = _group_bytes(header, length)
    return {
        "mode": "families", "model": lm.model_id, "dtype": lm.dtype, "tokens": length, "chunk_size": chunk_size,
        "kv_quantization": kv_quant.to_json() if kv_quant else None, "format_version": header["version"],
        "artifact_bytes": result.artifact_bytes, "state_bytes": result.kv_bytes,
        "artifact_bytes_per_token": result.artifact_bytes / length, "state_bytes_per_token": result.kv_bytes / length,
        "checkpoint_every": result.checkpoint_every, "checkpoint_bytes": result.checkpoint_bytes,
        "checkpoint_overhead": result.checkpoint_bytes / max(result.kv_bytes, 1), "spacings": spacings,
        "groups": groups, "mlx_lm_file_bytes": mlx_bytes,
        "load_seconds": ours, "first_load_seconds": first, "mlx_lm_load_seconds": theirs,
        "load_ratio": ours["median"] / max(theirs["median"], 1e-9),
        "publish_seconds": publish_seconds, "prefill_seconds": result.prefill_seconds,
        "token_exact": whole.token_exact, "max_abs_logit_diff": whole.max_abs_logit_diff,
        "tokens_compared": whole.tokens_compared, **partial,
    }


def _timed(load) -> float:
    t0 = time.perf_counter()
    caches = load()
    mx.eval([c.state for c in caches])
    return time.perf_counter() - t0


def _tick(progress: ProgressFn | None, phase: str) -> None:
    if progress:
        progress(0, 0, phase)


def _checkpoint_reuse(lm, path, tokens, suffix, chunk_size, kv_quant) -> dict:
    """Reuse a prompt sharing only 60% of the document (from the artifact with the finest checkpoints):
    restore at the deepest point, prefill the rest, compare with prefilling the same split from scratch."""
    shared = int(len(tokens) * 0.6)
    at = restore_info(read_header(path)).deepest(shared)
    if at == 0:
        return {"prefix_shared": shared, "prefix_reused": 0, "prefix_token_exact": None, "prefix_max_abs_logit_diff": None}
    prompt = tokens[:shared] + suffix
    caches = caches_at(load_artifact(path, lm, at=at), at)
    # the suffix as a request's (its last token alone), as the reference and the agent run it
    logits = prefill(lm.model, prompt[at:], caches, chunk_size, quant=kv_quant, split_last=True)
    reuse = decode_timed(lm, caches, logits, VERIFY_TOKENS, started=0, reused=at, prefilled=len(prompt) - at,
                         stop_at_eos=False, keep_logits=True, quant=kv_quant)
    scratch = from_scratch(lm, prompt[:at], prompt[at:], chunk_size=chunk_size, max_tokens=VERIFY_TOKENS,
                           stop_at_eos=False, keep_logits=True, quant=kv_quant)
    c = compare(reuse, scratch)
    return {"prefix_shared": shared, "prefix_reused": at, "prefix_token_exact": c["token_exact"],
            "prefix_max_abs_logit_diff": c["max_abs_logit_diff"]}


def _group_bytes(header: dict, length: int) -> list[dict]:
    """Per layer group: final-state bytes (per token where it grows), checkpoint bytes, and for sliding
    windows what storing every position's KV would take instead of window checkpoints."""
    sizes: dict[str, int] = {}
    for t in header["tensors"]:
        parts = t["name"].split(".")
        layer = parts[3] if parts[0] == "checkpoints" else parts[1] if parts[0] == "layers" else None
        if layer is not None:
            key = ("ckpt:" if parts[0] == "checkpoints" else "final:") + layer
            sizes[key] = sizes.get(key, 0) + t["nbytes"]
    out = []
    for g in layer_groups(header):
        final = sum(sizes.get(f"final:{i}", 0) for i in g["layers"])
        ckpt = sum(sizes.get(f"ckpt:{i}", 0) for i in g["layers"])
        row = {"family": g["family"], "layers": g["layers"], "final_bytes": final, "checkpoint_bytes": ckpt,
               "bytes_per_token": final / length if g["family"] in ("kv", "quantized") else None}
        if g["family"] == "rotating":
            buffer = sum(t["shape"][2] for t in header["tensors"] if t["name"] == f"layers.{g['layers'][0]}.keys")
            per_token = final / max(buffer, 1)
            row.update(window=g["window"], every_position_bytes=int(per_token * length))
        out.append(row)
    return out


def run_families(models: Sequence[tuple[LoadedModel, KVQuantization | None]], length: int, runs: int = 5, **kw) -> dict:
    """`run_family_bench` for several models (the families table: one row each)."""
    return {"mode": "families", "tokens": length, "rows": [run_family_bench(lm, length, runs, kv_quant=q, **kw)
                                                          for lm, q in models]}
