"""The agent's path: artifact -> checks -> mlx-lm `KVCache` objects ready for the suffix.

Two ways in, and `LoadedKV.load_path` says which ran:

- ``zero-copy`` (Metal: Apple Silicon's unified memory). Each 16 KiB-aligned tensor in the memory map
  is adopted by MLX as it is (`mx.asarray(view, copy=False)`): no byte is copied at load. The map stays
  open while any array uses it. The first append to a cache then grows it on the GPU (one device copy
  at memory bandwidth, inside the first step), because a mapped file has no room after each head.
- ``overlap`` (the copy path, in the background): the same copies run layer by layer on worker threads
  while the caller goes on; each cache waits for its own layer only when the model first reaches it,
  and meanwhile lets MLX compute the layers before it (`mx.async_eval`). Time to first token then
  approaches max(load, suffix compute) instead of their sum: for a cold disk or a long suffix.
- ``copy`` (everywhere else, and the fallback). Each layer's keys and values are copied once, head by
  head, from the map into an MLX-owned buffer [1, heads, capacity, head_dim] whose first L slots hold
  the document and whose `headroom` slots are free, so the suffix's first appends write in place
  (mlx-lm's `KVCache` re-allocates and concatenates the whole prefix when an append exceeds its
  capacity). Tensors are verified and copied in parallel threads (BLAKE3 and numpy's copy release the
  GIL); the map is pre-faulted (MAP_POPULATE / MADV_WILLNEED) so the copy does not stall on page faults.

Either way the caches are plain `mlx_lm.models.cache.KVCache` objects, usable as `prompt_cache=` in
`mlx_lm.generate` and `mlx_lm.stream_generate`.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from .compress import decode
from .errors import LossyArtifactError, PrefixMismatchError
from .format import ENCODINGS, Artifact
from .identity import check_binding, check_supported, config_geometry, model_fingerprint, tokenizer_fingerprint
from .models import LoadedModel

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DEFAULT_HEADROOM = 256  # one mlx-lm KVCache step: the suffix and first decode steps append without a copy
LOAD_PATHS = ("auto", "copy", "zero-copy", "overlap")


@dataclass
class LoadedKV:
    """A published document's KV, loaded for one model."""

    caches: list[KVCache]
    tokens: list[int]
    logits: mx.array  # the logits row after the document's last token (sample the first token for free)
    header: dict
    load_seconds: float  # until the caches were returned (with "overlap", layers may still be arriving)
    load_path: str  # "copy", "zero-copy" or "overlap"

    def wait(self) -> None:
        """Block until every layer is in memory (only the overlap path returns earlier)."""
        for cache in self.caches:
            if isinstance(cache, StreamedKVCache):
                cache.wait()


def load_artifact(
    path: str | os.PathLike,
    lm: LoadedModel,
    *,
    verify_digests: bool = True,
    headroom: int = DEFAULT_HEADROOM,
    load_path: str = "auto",
    require_exact: bool = False,
) -> LoadedKV:
    """Load an artifact's KV for `lm`, refusing any model, tokenizer or dtype it was not made for.

    With `verify_digests` (the default) every tensor's BLAKE3 digest is checked before it is used;
    turn it off only for files you wrote yourself. With `require_exact`, lossily encoded (quantised)
    artifacts are refused.
    """
    t0 = time.perf_counter()
    check_supported(lm.model)
    # the copy paths read every byte at once: pre-fault the map; the overlap path faults in its workers
    art = Artifact(path, populate=load_path != "overlap")
    try:
        check_binding(
            art.header,
            model_fp=model_fingerprint(lm.model, lm.config),
            tokenizer_fp=tokenizer_fingerprint(lm.tokenizer),
            dtype=lm.dtype,
            geometry=config_geometry(lm.model, lm.config),
        )
        encoding = art.header["kv"].get("encoding", "raw")
        if require_exact and not ENCODINGS[encoding]:
            raise LossyArtifactError(f"artifact KV is {encoding}-quantised (lossy) but an exact load was required")
        caches, logits, used = read_caches(art, verify_digests=verify_digests, headroom=headroom, load_path=load_path)
    except BaseException:
        _release(art)
        raise
    if used != "overlap":  # the overlap path's workers close the map when they are done
        _release(art)
    return LoadedKV(caches, list(art.header["document"]["tokens"]), logits, art.header, time.perf_counter() - t0, used)


def read_caches(
    art: Artifact,
    *,
    verify_digests: bool = True,
    headroom: int = DEFAULT_HEADROOM,
    load_path: str = "auto",
    threads: int | None = None,
) -> tuple[list[KVCache], mx.array, str]:
    """The KV of an open artifact as evaluated `KVCache`s, plus its logits row and the path used.

    No model checks happen here (`load_artifact` does them); benchmarks call this on synthetic KV.
    The caller closes `art` afterwards, except after the overlap path, whose workers close it.
    """
    if load_path not in LOAD_PATHS:
        raise ValueError(f"load_path must be one of {LOAD_PATHS}")
    names = [f"layers.{i}.{kind}" for i in range(art.header["model"]["num_layers"]) for kind in ("keys", "values")]
    n = art.header["kv"]["num_tokens"]
    raw = art.header["kv"].get("encoding", "raw") == "raw"
    used = "zero-copy" if load_path == "zero-copy" or (load_path == "auto" and raw and zero_copy_available()) else load_path
    used = "copy" if used == "auto" else used
    if used == "zero-copy" and not raw:
        raise ValueError("only raw artifacts can be loaded without a copy")
    entry = art.tensors["logits"]
    logits = mx.array(np.frombuffer(art.tensor_bytes("logits", verify_digests), dtype=np.uint8))
    logits = logits.view(DTYPES[entry.dtype]).reshape(entry.shape)
    if used == "zero-copy":
        if verify_digests:
            _parallel(lambda name: art.tensor_bytes(name, verify=True), names, threads)
        arrays = [_adopt(art, name) for name in names]
        mx.eval(logits, arrays)
        return _caches(arrays, n), logits, used
    capacity = -(-(n + headroom) // KVCache.step) * KVCache.step
    arrays = [_uninitialized(_with_capacity(art.tensors[name].shape, capacity), art.tensors[name].dtype) for name in names]
    mx.eval(logits, arrays)
    copy_layer = lambda i: [_copy_heads(art, names[j], arrays[j], verify_digests) for j in (2 * i, 2 * i + 1)]  # noqa: E731
    if used == "copy":
        _parallel(copy_layer, list(range(len(names) // 2)), threads)
        return _caches(arrays, n), logits, used
    return _background(art, arrays, n, copy_layer, threads), logits, used


def _caches(arrays: list[mx.array], n: int) -> list[KVCache]:
    caches = []
    for keys, values in zip(arrays[::2], arrays[1::2]):
        cache = KVCache()
        cache.keys, cache.values, cache.offset = keys, values, n
        caches.append(cache)
    return caches


class StreamedKVCache(KVCache):
    """A `KVCache` whose prefix is still being copied in by a worker thread.

    Every access waits for this layer's copy (and its digest check) to finish; the wait first starts
    MLX on the layers before it, so loading and computing overlap. Once ready, it is a plain KVCache.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: int, ready: threading.Event, errors: list):
        super().__init__()
        self.keys, self.values, self.offset = keys, values, offset
        self._ready, self._errors = ready, errors

    def wait(self, *pending: mx.array) -> None:
        """Block until this layer is loaded; raise the loader's error (e.g. a bad digest) if it failed."""
        if not self._ready.is_set():
            if pending:
                mx.async_eval(*pending)
            self._ready.wait()
        if self._errors:
            raise self._errors[0]

    def update_and_fetch(self, keys, values):
        self.wait(keys, values)
        return super().update_and_fetch(keys, values)

    @property
    def state(self):
        self.wait()
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v


def _background(art: Artifact, arrays: list[mx.array], n: int, copy_layer, threads: int | None) -> list[KVCache]:
    """Start copying layer by layer on worker threads; return caches that wait for their layer."""
    layers = len(arrays) // 2
    ready = [threading.Event() for _ in range(layers)]
    errors: list[BaseException] = []

    def load(i: int) -> None:
        try:
            if not errors:
                copy_layer(i)
        except BaseException as e:  # surfaces in the consuming thread through StreamedKVCache.wait
            errors.append(e)
        finally:
            ready[i].set()

    def run() -> None:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(load, range(layers)))
        _release(art)

    threading.Thread(target=run, name="kvmlx-load", daemon=True).start()
    return [StreamedKVCache(arrays[2 * i], arrays[2 * i + 1], n, ready[i], errors) for i in range(layers)]


def zero_copy_available() -> bool:
    """MLX adopts host memory without a copy only on Metal (the CPU backend always copies)."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def _adopt(art: Artifact, name: str) -> mx.array:
    """Hand one page-aligned tensor of the map to MLX without copying (Metal only; raises elsewhere)."""
    entry = art.tensors[name]
    raw = np.frombuffer(art.tensor_bytes(name, verify=False), dtype=np.uint16 if entry.dtype != "float32" else np.uint32)
    return mx.asarray(raw, copy=False).view(DTYPES[entry.dtype]).reshape(entry.shape)


def _uninitialized(shape: tuple[int, ...], dtype: str) -> mx.array:
    """An MLX buffer whose contents do not matter (every slot is written before it is read).

    On the CPU backend `mx.zeros` fills element by element (~1.5 GB/s here); importing an untouched
    `np.empty` (the kernel's zero page) is a plain memcpy into the new buffer, 4-5x faster.
    """
    itemsize = 4 if dtype == "float32" else 2
    raw = np.empty(int(np.prod(shape)), dtype=np.uint32 if itemsize == 4 else np.uint16)
    return mx.array(raw).view(DTYPES[dtype]).reshape(shape)


def _with_capacity(shape: Sequence[int], capacity: int) -> tuple[int, ...]:
    b, heads, _, head_dim = shape
    return (b, heads, capacity, head_dim)


def _copy_heads(art: Artifact, name: str, dst: mx.array, verify: bool) -> None:
    """Copy one [1, H, L, D] tensor (digest checked, then decoded if encoded) into the first L slots
    of each head of `dst`."""
    entry = art.tensors[name]
    stored = art.tensor_bytes(name, verify=verify)
    raw = stored if entry.encoding == "raw" else decode(stored, entry.encoding, entry.params, entry.dtype, entry.shape)
    heads = entry.shape[1]
    src = np.frombuffer(raw, dtype=np.uint8).reshape(heads, -1)
    out = np.frombuffer(memoryview(dst).cast("B"), dtype=np.uint8).reshape(heads, -1)
    np.copyto(out[:, : src.shape[1]], src)


def _parallel(fn, items: list, threads: int | None) -> None:
    """Run `fn` over `items` on a thread pool (the work releases the GIL), re-raising the first error."""
    workers = threads or min(8, os.cpu_count() or 1)
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):
            pass


def _release(art: Artifact) -> None:
    """Close the map unless zero-copy arrays still use it (then it closes when they are freed)."""
    try:
        art.close()
    except BufferError:
        pass


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
