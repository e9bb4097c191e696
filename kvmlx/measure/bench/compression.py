"""The compression study, `run_compression_bench`: what each KV encoding saves in bytes, costs in speed, and changes.

One document is prefilled once; each encoding re-encodes those same tensors, is written as a real
artifact and loaded through `load_artifact`, and 32 greedy tokens and their logits are compared
with the raw artifact's, so the comparison isolates the encoding. Its table is `report.format_compression_table`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ...artifact.encodings import decode, encode
from ...artifact.format import ENCODINGS, TensorData, write_artifact
from ...models import LoadedModel
from ...runtime.generate import compare, continue_from
from ...runtime.load import load_artifact
from ...runtime.publish import DEFAULT_CHUNK, publish
from .harness import document_tokens
from .machine import machine_info


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
