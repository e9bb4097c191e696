"""The agent's path: artifact -> checks -> mlx-lm `KVCache` objects ready for the suffix.

Copies, exactly: the file is memory-mapped read-only (no copy; the kernel's page cache backs it).
Each layer's keys and values are copied once, head by head, from the map into an MLX-owned buffer
of shape [1, heads, capacity, head_dim] whose first L slots hold the document and whose remaining
`headroom` slots are free. That is the only copy of the KV, and because the buffer already has room,
the suffix's first append writes in place instead of re-allocating and concatenating the prefix
(which mlx-lm's `KVCache` does when an append exceeds its capacity). The returned caches are plain
`KVCache` objects, usable as `prompt_cache=` in `mlx_lm.generate` and `stream_generate`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from .errors import PrefixMismatchError
from .format import Artifact
from .identity import check_binding, check_supported, config_geometry, model_fingerprint, tokenizer_fingerprint
from .models import LoadedModel

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DEFAULT_HEADROOM = 256  # one mlx-lm KVCache step: the suffix and first decode steps append without a copy


@dataclass
class LoadedKV:
    """A published document's KV, loaded for one model."""

    caches: list[KVCache]
    tokens: list[int]
    logits: mx.array  # the logits row after the document's last token (sample the first token for free)
    header: dict
    load_seconds: float
    load_path: str = "copy"
    copies: dict = field(default_factory=dict)


def load_artifact(
    path: str | os.PathLike,
    lm: LoadedModel,
    *,
    verify_digests: bool = True,
    headroom: int = DEFAULT_HEADROOM,
) -> LoadedKV:
    """Load an artifact's KV for `lm`, refusing any model, tokenizer or dtype it was not made for.

    With `verify_digests` (the default) every tensor's BLAKE3 digest is checked before it is used;
    turn it off only for files you wrote yourself.
    """
    t0 = time.perf_counter()
    check_supported(lm.model)
    with Artifact(path) as art:
        header = art.header
        check_binding(
            header,
            model_fp=model_fingerprint(lm.model, lm.config),
            tokenizer_fp=tokenizer_fingerprint(lm.tokenizer),
            dtype=lm.dtype,
            geometry=config_geometry(lm.model, lm.config),
        )
        n = header["kv"]["num_tokens"]
        step = KVCache.step
        capacity = -(-(n + headroom) // step) * step
        caches = []
        for i in range(header["model"]["num_layers"]):
            cache = KVCache()
            cache.keys = _copy_in(art, f"layers.{i}.keys", capacity, verify_digests)
            cache.values = _copy_in(art, f"layers.{i}.values", capacity, verify_digests)
            cache.offset = n
            caches.append(cache)
        logits_entry = art.tensors["logits"]
        logits = mx.array(np.frombuffer(art.tensor_bytes("logits", verify_digests), dtype=np.uint8))
        logits = logits.view(DTYPES[logits_entry.dtype]).reshape(logits_entry.shape)
        mx.eval(logits)
    return LoadedKV(
        caches=caches,
        tokens=list(header["document"]["tokens"]),
        logits=logits,
        header=header,
        load_seconds=time.perf_counter() - t0,
        copies={"kv": 1, "capacity_tokens": capacity},
    )


def _copy_in(art: Artifact, name: str, capacity: int, verify: bool) -> mx.array:
    """Copy one [1, H, L, D] tensor from the map into a fresh [1, H, capacity, D] MLX buffer."""
    entry = art.tensors[name]
    _, heads, n, head_dim = entry.shape
    dst = mx.zeros((1, heads, capacity, head_dim), dtype=DTYPES[entry.dtype])
    mx.eval(dst)
    src = np.frombuffer(art.tensor_bytes(name, verify), dtype=np.uint8).reshape(heads, -1)
    out = np.frombuffer(memoryview(dst).cast("B"), dtype=np.uint8).reshape(heads, -1)
    out[:, : src.shape[1]] = src
    return dst


def split_prompt(loaded: LoadedKV, prompt_tokens: Sequence[int]) -> list[int]:
    """Check that the agent's full prompt starts with the document; return the rest (the suffix)."""
    doc = loaded.tokens
    prompt = list(prompt_tokens)
    if prompt[: len(doc)] != doc:
        at = next((i for i, (a, b) in enumerate(zip(doc, prompt)) if a != b), min(len(doc), len(prompt)))
        if len(prompt) < len(doc) and at == len(prompt):
            raise PrefixMismatchError(f"prompt has {len(prompt)} tokens, shorter than the artifact's {len(doc)}-token document")
        raise PrefixMismatchError(
            f"prompt does not start with the artifact's document: first difference at token {at} "
            f"(artifact {doc[at]}, prompt {prompt[at] if at < len(prompt) else 'end'})"
        )
    return prompt[len(doc) :]
