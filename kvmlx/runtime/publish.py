"""The publisher's path: document -> tokens -> one chunked prefill -> artifact on disk."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .. import __version__
from ..artifact.encodings import encode
from ..artifact.format import ENCODINGS, Signer, TensorData, digest, write_artifact
from ..artifact.identity import model_fingerprint, rope_settings, tokenizer_fingerprint
from ..caches import check_supported, kv_arrays
from ..models import LoadedModel

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


def prefill(model, tokens: Sequence[int], cache: list, chunk_size: int, progress: ProgressFn | None = None) -> mx.array:
    """Run `tokens` through the model in chunks of `chunk_size`, filling `cache`; return the last logits row.

    Chunking is part of an artifact's identity: logits are bit-identical between two runs only when
    both split the sequence at the same positions (docs/FORMAT.md, "What exact means").
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if not tokens:
        raise ValueError("cannot prefill an empty token sequence")
    logits = None
    for start in range(0, len(tokens), chunk_size):
        chunk = mx.array(tokens[start : start + chunk_size])[None]
        logits = model(chunk, cache=cache)[0, -1]
        mx.eval(logits, [c.state for c in cache])
        if progress:
            progress(min(start + chunk_size, len(tokens)), len(tokens))
    return logits


def publish(
    lm: LoadedModel,
    document: str | Sequence[int],
    out: str | os.PathLike,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    encoding: str = "raw",
    progress: ProgressFn | None = None,
    sign: Signer | None = None,
) -> PublishResult:
    """Prefill `document` (text, or token ids) once with `lm` and write its KV artifact to `out`.

    Text is tokenized with the model's tokenizer including its special tokens (a BOS where the model
    uses one), exactly as an agent's prompt that starts with the document would be. `encoding` is one
    of `kvmlx.artifact.format.ENCODINGS` (lossy ones are marked so that exact loads refuse them); `sign`
    signs the header digest (see `kvmlx.artifact.trust`).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
    check_supported(lm.model)
    text_digest = digest(document.encode()) if isinstance(document, str) else None
    tokens = list(lm.tokenizer.encode(document)) if isinstance(document, str) else [int(t) for t in document]
    if not tokens:
        raise ValueError("the document is empty: nothing to prefill")

    cache = make_prompt_cache(lm.model)
    t0 = time.perf_counter()
    logits = prefill(lm.model, tokens, cache, chunk_size, progress)
    prefill_seconds = time.perf_counter() - t0
    result = write_kv(lm, tokens, cache, logits, out, chunk_size=chunk_size, text_digest=text_digest, encoding=encoding,
                      sign=sign)
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
) -> PublishResult:
    """Write the KV of `tokens` already in `cache` (prefilled in `chunk_size` chunks by `lm`) and the
    logits row after the last token as an artifact at `out` (publish's second half; imports use it)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
    tokens = [int(t) for t in tokens]
    n = len(tokens)
    tensors = [_tensor(name, x, encoding) for name, x in kv_arrays(cache, n)]
    tensors.append(_tensor("logits", logits, "raw"))
    _, heads, _, head_dim = cache[0].keys.shape
    header = {
        "created_by": f"kvmlx {__version__} (mlx {mx.__version__})",
        "model": {
            "id": lm.model_id,
            "fingerprint": model_fingerprint(lm),
            "model_type": str(lm.config.get("model_type", "unknown")),
            "num_layers": len(cache),
            "num_kv_heads": heads,
            "head_dim": head_dim,
            "rope": rope_settings(lm.config),
        },
        "tokenizer": {"fingerprint": tokenizer_fingerprint(lm)},
        "kv": {"dtype": tensors[0].dtype, "layout": "BHLD", "num_tokens": n, "chunk_size": chunk_size,
               "encoding": encoding, "lossless": ENCODINGS[encoding]},
        "document": {"tokens": tokens, "text_blake3": text_digest if text is None else digest(text.encode())},
    }
    t1 = time.perf_counter()
    written = write_artifact(out, header, tensors, sign=sign)
    write_seconds = time.perf_counter() - t1
    kv_bytes = 2 * len(cache) * heads * n * head_dim * cache[0].keys.itemsize
    return PublishResult(Path(out), n, written["file_bytes"], kv_bytes, 0.0, write_seconds, written)


def _tensor(name: str, x: mx.array, encoding: str) -> TensorData:
    mx.eval(x)
    dtype = str(x.dtype).split(".")[-1]
    if encoding == "raw":
        return TensorData(name, dtype, tuple(x.shape), memoryview(x).cast("B"))
    blob, params = encode(x, encoding)
    return TensorData(name, dtype, tuple(x.shape), memoryview(blob), encoding, params)
