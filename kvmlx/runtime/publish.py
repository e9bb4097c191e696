"""The publisher's path: document -> tokens -> one chunked prefill -> artifact on disk (with state
checkpoints at chunk boundaries for caches that cannot be trimmed, and mlx-lm's KV quantization)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .. import __version__
from ..artifact.encodings import encode
from ..artifact.format import ENCODINGS, TENSOR_DTYPES, VERSION, Signer, TensorData, digest, write_artifact
from ..artifact.identity import config_geometry, model_fingerprint, rope_settings, tokenizer_fingerprint
from ..caches import KVQuantization, kv_arrays, model_specs, needs_checkpoint, save_layer, spec, tensor_names
from ..caches.quantized import apply as apply_quantization
from ..models import LoadedModel
from .distributed import check_parallel_support, write_parallel

DEFAULT_CHUNK = 512
ProgressFn = Callable[[int, int], None]


@dataclass
class PublishResult:
    """What `publish` wrote and how long each part took."""

    path: Path
    num_tokens: int
    artifact_bytes: int
    kv_bytes: int
    prefill_seconds: float
    write_seconds: float
    header: dict
    checkpoint_bytes: int = 0  # state checkpoints (version 2), included in artifact_bytes, not in kv_bytes
    num_checkpoints: int = 0
    checkpoint_every: int | None = None


def prefill(model, tokens: Sequence[int], cache: list, chunk_size: int, progress: ProgressFn | None = None, *,
            quant: KVQuantization | None = None, on_chunk: Callable[[int], None] | None = None,
            logits: bool = True, split_last: bool = False) -> mx.array | None:
    """Run `tokens` through the model in chunks of `chunk_size`, filling `cache`; return the last logits row
    (None with `logits=False`: the caches only).

    Chunking is part of an artifact's identity: logits are bit-identical between two runs only when
    both split the sequence at the same positions (docs/FORMAT.md, "What exact means"): every
    `chunk_size` tokens and, with `split_last` (a request's suffix), before the last token, which then
    runs alone (as in mlx-lm's generate: the other positions' outputs are never read, so MLX never
    computes their last layer's output nor the head). A chunk whose logits nobody reads evaluates the
    caches only. With `quant`, caches are quantized after every model call as `mlx_lm.generate` does
    with those KV settings. `on_chunk(done)` is called after each chunk with the number of tokens
    prefilled so far.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if not tokens:
        raise ValueError("cannot prefill an empty token sequence")
    n = len(tokens)
    row = None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        calls = ((start, end - 1), (end - 1, end)) if logits and split_last and end == n else ((start, end),)
        for lo, hi in calls:
            if lo == hi:
                continue
            out = model(mx.array(tokens[lo:hi])[None], cache=cache)
            apply_quantization(quant, cache)
            if logits and hi == n:
                row = out[0, -1]
                mx.eval(row, [c.state for c in cache])
            else:
                mx.eval([c.state for c in cache])
        if on_chunk:
            on_chunk(end)
        if progress:
            progress(end, n)
    return row


def publish(
    lm: LoadedModel,
    document: str | Sequence[int],
    out: str | os.PathLike,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    encoding: str = "raw",
    progress: ProgressFn | None = None,
    sign: Signer | None = None,
    kv_quant: KVQuantization | None = None,
    checkpoint_every: int | None = None,
    format_version: int = VERSION,
) -> PublishResult:
    """Prefill `document` (text, or token ids) once with `lm` and write its KV artifact to `out`.

    Text is tokenized with the model's tokenizer including its special tokens (a BOS where the model
    uses one), exactly as an agent's prompt that starts with the document would be. `encoding` is one
    of `kvmlx.artifact.format.ENCODINGS` (lossy ones are marked so that exact loads refuse them); `sign`
    signs the header digest (see `kvmlx.artifact.trust`).

    Models whose caches are not all plain `KVCache` (sliding windows, recurrent state) and `kv_quant`
    (mlx-lm's `--kv-bits` pipeline, applied after every chunk) give an artifact of cache families: each layer's
    cache family and state, plus state checkpoints every `checkpoint_every` tokens (a multiple of
    `chunk_size`; None: `auto_checkpoint_every`) for the layers whose earlier states cannot be
    recovered from the final one, so agents can reuse a shared prefix of the document exactly.
    `format_version` 1 or 2 writes kvmlx's own container, for readers older than version 3.
    """
    specs = model_specs(lm.model)
    _check_encoding(encoding, kv_quant is None and all(s["family"] == "kv" for s in specs), kv_quant)
    check_parallel_support(lm, kv_quant=kv_quant, specs=specs)  # under mlx.launch: plain KV only
    if checkpoint_every is not None and (checkpoint_every < 1 or checkpoint_every % chunk_size):
        raise ValueError(f"checkpoint_every ({checkpoint_every}) must be a positive multiple of the chunk size ({chunk_size})")
    text_digest = digest(document.encode()) if isinstance(document, str) else None
    tokens = list(lm.tokenizer.encode(document)) if isinstance(document, str) else [int(t) for t in document]
    if not tokens:
        raise ValueError("the document is empty: nothing to prefill")

    n = len(tokens)
    cache = make_prompt_cache(lm.model)
    checkpointed = [i for i, s in enumerate(specs) if needs_checkpoint(s)]
    every = checkpoint_every
    snapshots: list[tuple[int, dict[int, tuple[dict, dict]]]] = []

    def on_chunk(done: int) -> None:
        nonlocal every
        if not checkpointed or done >= n:
            return
        every = every or auto_checkpoint_every(cache, checkpointed, chunk_size, kv_quant)
        if done % every == 0 and (kv_quant is None or done >= kv_quant.start or not _quantizes(kv_quant, n)):
            snapshots.append((done, {i: _snapshot(cache[i]) for i in checkpointed}))

    t0 = time.perf_counter()
    logits = prefill(lm.model, tokens, cache, chunk_size, progress, quant=kv_quant, on_chunk=on_chunk)
    prefill_seconds = time.perf_counter() - t0
    result = write_kv(lm, tokens, cache, logits, out, chunk_size=chunk_size, text_digest=text_digest, encoding=encoding,
                      sign=sign, kv_quant=kv_quant, snapshots=snapshots, checkpoint_every=every if checkpointed else None,
                      format_version=format_version)
    result.prefill_seconds = prefill_seconds
    return result


def write_kv(
    lm: LoadedModel,
    tokens: Sequence[int],
    cache: list,
    logits: mx.array,
    out: str | os.PathLike,
    *,
    chunk_size: int,
    text: str | None = None,
    text_digest: str | None = None,
    encoding: str = "raw",
    sign: Signer | None = None,
    kv_quant: KVQuantization | None = None,
    snapshots: Sequence[tuple[int, dict[int, tuple[dict, dict]]]] = (),
    checkpoint_every: int | None = None,
    format_version: int = VERSION,
) -> PublishResult:
    """Write the caches of `tokens` already in `cache` (prefilled in `chunk_size` chunks by `lm`) and the
    logits row after the last token as an artifact at `out` (publish's second half; imports use it).

    Plain `KVCache` layers without `kv_quant` give plain KV; any other family, or `kv_quant`, each
    layer's family and state (`caches`: version 2's header), plus `snapshots` ((tokens,
    {layer: save_layer result}) taken during the prefill) as its state checkpoints.
    """
    plain = kv_quant is None and all(spec(c)["family"] == "kv" for c in cache)
    _check_encoding(encoding, plain, kv_quant)
    tokens = [int(t) for t in tokens]
    n = len(tokens)
    header = {
        "created_by": f"kvmlx {__version__} (mlx {mx.__version__})",
        "model": {
            "id": lm.model_id,
            "fingerprint": model_fingerprint(lm),
            "model_type": str(lm.config.get("model_type", "unknown")),
            "num_layers": len(cache),
            "rope": rope_settings(lm.config),
            **_geometry(lm, cache),
            **_weights_quantization(lm.config),
        },
        "tokenizer": {"fingerprint": tokenizer_fingerprint(lm)},
        "kv": {"dtype": lm.dtype, "layout": "BHLD", "num_tokens": n, "chunk_size": chunk_size,
               "encoding": encoding, "lossless": ENCODINGS[encoding]},
        "document": {"tokens": tokens, "text_blake3": text_digest if text is None else digest(text.encode())},
    }
    checkpoint_bytes = 0
    if plain:
        tensors = [_tensor(name, x, encoding) for name, x in kv_arrays(cache, n)]
        header["kv"]["dtype"] = tensors[0].dtype
    else:
        metas, tensors = _layer_tensors("layers", enumerate(save_layer(c) for c in cache))
        header["caches"] = metas
        header["checkpoints"] = []
        for k, (p, layers) in enumerate(snapshots):
            cp_metas, cp_tensors = _layer_tensors(f"checkpoints.{k}.layers", layers.items())
            header["checkpoints"].append({"tokens": p, "caches": {str(i): m for i, m in zip(layers, cp_metas)}})
            checkpoint_bytes += sum(t.data.nbytes for t in cp_tensors)
            tensors += cp_tensors
        header["kv"]["checkpoint_every"] = checkpoint_every
        if kv_quant is not None:
            header["kv"]["quantization"] = kv_quant.to_json()
    kv_bytes = sum(math.prod(t.shape) * TENSOR_DTYPES[t.dtype] for t in tensors) - checkpoint_bytes  # as decoded
    tensors.append(_tensor("logits", logits, "raw"))
    t1 = time.perf_counter()
    if lm.group is not None:  # under mlx.launch: this rank's part, then the manifest (runtime/distributed.py)
        written = write_parallel(out, header, tensors, lm, sign=sign)
    else:
        written = write_artifact(out, header, tensors, sign=sign, version=format_version)
    write_seconds = time.perf_counter() - t1
    return PublishResult(Path(out), n, written.get("part_bytes", written["file_bytes"]), kv_bytes, 0.0, write_seconds,
                         written, checkpoint_bytes, len(snapshots), checkpoint_every)


def _check_encoding(encoding: str, plain: bool, kv_quant: KVQuantization | None) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
    if not plain and encoding != "raw":
        raise ValueError(f"--encoding {encoding} applies to plain-KV artifacts; this one holds "
                         + ("quantized KV" if kv_quant else "sliding-window or recurrent caches"))


AUTO_CHECKPOINT_OVERHEAD = 0.5  # auto spacing: a checkpoint may cost at most half the KV bytes of the tokens it spans


def auto_checkpoint_every(cache: list, checkpointed: Sequence[int], chunk_size: int,
                          kv_quant: KVQuantization | None = None) -> int:
    """The default checkpoint spacing: the smallest multiple of the chunk size at which one checkpoint
    costs at most AUTO_CHECKPOINT_OVERHEAD of the KV bytes of the tokens between two checkpoints.

    Called after the first chunk: a recurrent state has its final size by then; a sliding window is
    counted at its largest (window - 1 + chunk positions). Large recurrent states (Qwen3-Next: ~2 MB
    per layer in float32) thus get sparse checkpoints, small ones one per chunk (docs/FORMAT.md).
    """
    ckpt, per_token = 0, 0
    for i, c in enumerate(cache):
        meta, arrays = save_layer(c)
        if i in checkpointed:
            for x in arrays.values():
                if meta["family"] == "rotating":
                    ckpt += x.nbytes // max(1, x.shape[2]) * (meta["max_size"] - 1 + chunk_size)
                else:
                    ckpt += x.nbytes
        elif meta.get("offset"):
            per_token += sum(x.nbytes for x in arrays.values()) // meta["offset"]
    if not per_token:  # no full-attention KV: weigh checkpoints against the windows' per-token KV
        per_token = sum(c.keys.nbytes * 2 // max(1, c.keys.shape[2]) for i, c in enumerate(cache)
                        if i in checkpointed and hasattr(c, "max_size"))
    per_chunk = max(1, per_token) * chunk_size * AUTO_CHECKPOINT_OVERHEAD
    return chunk_size * max(1, -(-ckpt // int(per_chunk)))


def _quantizes(kv_quant: KVQuantization, n: int) -> bool:
    """Whether a document of `n` tokens ends up quantized (its KV below `start` is then gone, so
    checkpoints there could not be restored exactly)."""
    return n >= kv_quant.start


def _snapshot(cache) -> tuple[dict, dict]:
    """A layer's state now, copied (later chunks may update the cache's arrays in place)."""
    meta, arrays = save_layer(cache)
    arrays = {k: mx.contiguous(x) for k, x in arrays.items()}
    mx.eval(list(arrays.values()))
    return meta, arrays


def _layer_tensors(prefix: str, layers) -> tuple[list[dict], list[TensorData]]:
    metas, tensors = [], []
    for i, (meta, arrays) in layers:
        metas.append(meta)
        tensors += [_tensor(f"{prefix}.{i}.{t}", arrays[t], "raw") for t in tensor_names(meta)]
    return metas, tensors


def _geometry(lm: LoadedModel, cache: list) -> dict:
    """KV heads and head dim (of the attention layers; 1 and 1 for a model without any)."""
    geometry = config_geometry(lm.model, lm.config)
    if geometry is not None:
        return {"num_kv_heads": geometry.num_kv_heads, "head_dim": geometry.head_dim}
    for c in cache:
        keys = getattr(c, "keys", None)
        if isinstance(keys, mx.array):
            return {"num_kv_heads": keys.shape[1], "head_dim": keys.shape[3]}
    return {"num_kv_heads": 1, "head_dim": 1}


def _weights_quantization(config: dict) -> dict:
    """The model's weight quantization (mlx_lm.convert -q: bits, group size), for `kvmlx inspect`."""
    q = config.get("quantization")
    if not isinstance(q, dict) or not isinstance(q.get("bits"), int):
        return {}
    return {"weights_quantization": {k: q[k] for k in ("bits", "group_size", "mode") if isinstance(q.get(k), (int, str))}}


def _tensor(name: str, x: mx.array, encoding: str) -> TensorData:
    x = mx.contiguous(x)  # a rotating cache's state past its window can be a strided view
    mx.eval(x)
    dtype = str(x.dtype).split(".")[-1]
    if encoding == "raw":
        return TensorData(name, dtype, tuple(x.shape), memoryview(x).cast("B"))
    blob, params = encode(x, encoding)
    return TensorData(name, dtype, tuple(x.shape), memoryview(blob), encoding, params)
