"""The agent's path: artifact -> checks -> mlx-lm `KVCache` objects ready for the suffix.

Three ways in, and `LoadedKV.load_path` says which ran:

- ``native`` (a version-3 file with nothing to hash or in the page cache, everywhere but Metal,
  when no headroom is asked for): `mx.load` reads the file, a safetensors file (artifact/envelope.py),
  on MLX's own I/O threads straight into exact-size arrays: mlx-lm's `load_prompt_cache` path, with kvmlx's checks around it.
  Like mlx-lm's caches, these have no spare slots: the suffix's first append grows them (one copy of
  the document's KV). A load that must hash digests takes this path too when the file is in the
  page cache (`Artifact.cached`), hashing the arrays in memory afterwards; from a disk it takes the
  copy path, which hashes each tensor right after reading it, while the disk is busy with the next.

- ``zero-copy`` (Metal: Apple Silicon's unified memory). Each 16 KiB-aligned tensor in the memory map
  is adopted by MLX as it is (`mx.asarray(view, copy=False)`): no byte is copied at load. The map stays
  open while any array uses it. The first append to a cache then grows it on the GPU (one device copy
  at memory bandwidth, inside the first step), because a mapped file has no room after each head.
- ``copy`` (everywhere else, and the fallback). Each layer's keys and values are read once, with one
  `preadv` per tensor, from the file straight into an MLX-owned buffer [1, heads, capacity, head_dim]
  whose first L slots per head hold the document and whose spare slots (`spare_slots`: up to 256, at
  most L/8) are free, so the suffix's first appends write in place (mlx-lm's `KVCache` re-allocates
  and concatenates the whole prefix when an append exceeds its capacity; the spare slots are zeroed).
  Buffers come from `buffers.destinations` (uninitialised, from MLX's cache, when large); the main
  thread allocates the next layers while worker threads (started once per process) read and verify
  the ones before (preadv and BLAKE3 release the GIL); a small re-load (nothing to hash) is read on
  the calling thread. No memory map is made here.

Digests are hashed once per file per process: a re-load of the same unchanged file only re-checks
its identity (`Artifact.verified_before`, docs/FORMAT.md).
- ``overlap`` (the copy path, in the background): the same reads run on worker threads while the
  caller goes on; each cache waits for its own layer only when the model first reaches it, and
  meanwhile lets MLX compute the layers before it (`mx.async_eval`). Time to first token then
  approaches max(load, suffix compute) instead of their sum: for a cold disk or a long suffix.

Either way the caches are plain `mlx_lm.models.cache.KVCache` objects, usable as `prompt_cache=` in
`mlx_lm.generate` and `mlx_lm.stream_generate`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from ..artifact.encodings import decode
from ..artifact.format import DTYPE_SIZES, ENCODINGS, Artifact, VerifiedIdentity, header_kv_names
from ..artifact.identity import check_binding, model_fingerprint, tokenizer_fingerprint
from ..artifact.trust import SignatureStatus, TrustList, check_signature
from ..caches import KVQuantization, StreamedKVCache, check_model, from_arrays, model_specs, quantization_of
from ..errors import IntegrityError, KVQuantizationMismatchError, LossyArtifactError, ModelMismatchError, PrefixMismatchError
from ..models import LoadedModel
from . import buffers
from .buffers import DTYPES
from .distributed import check_parallel_support, open_part, read_bytes
from .restore import build_states, state_tensor_names

DEFAULT_HEADROOM = 256  # at most one mlx-lm KVCache step of spare slots (`spare_slots`)
MIN_HEADROOM = 16  # spare slots even for a tiny document: the first decode steps append in place
LOAD_PATHS = ("auto", "native", "copy", "zero-copy", "overlap")
ALLOC_LAYERS = 4  # layers allocated per `mx.load` call: few calls, yet the first reads start early (3774 tokens: 8 -> 4 layers, 64 -> 44 ms)
PAGE = 4096  # bytes: each head's row of a loaded KV buffer is a whole number of pages (`_page_rows`)
SERIAL_BYTES = 32 << 20  # KV bytes: a re-load (nothing to hash) this small is read on the calling thread
SMALL_READ = 4 << 20  # bytes: `read_tensors` reads (and hashes) this little on the calling thread (~1.5 ms of BLAKE3)
CPUS = os.cpu_count() or 1  # asked once: ~6-10 us a call, on every load
FEW_TENSORS = 16  # a read of at most this many tensors within SMALL_READ skips `mx.load`; of more, where no eval (`_native_pays`)


@dataclass
class LoadedKV:
    """A published document's KV, loaded for one model."""

    caches: list[KVCache]
    tokens: list[int]
    logits: mx.array  # the logits row after the document's last token (sample the first token for free)
    header: dict
    load_seconds: float  # until the caches were returned (with "overlap", layers may still be arriving)
    load_path: str  # "copy", "zero-copy" or "overlap"
    signature: SignatureStatus | None = None  # who signed it (kvmlx.artifact.trust.check_signature's result)
    checkpoints: dict = field(default_factory=dict)  # {tokens: {layer: cache}}: version-2 state checkpoints read
    kv_quant: KVQuantization | None = None  # the KV quantization the document was computed with (continue with it)
    # bytes this process read with read/pread calls during the load (Linux: /proc/self/io), else None;
    # decoding encoded tensors reads the memory map instead (page faults), which this does not count
    bytes_read: int | None = None
    # "hashed": every digest now; "partial": only those read (a version-2 load of one checkpoint);
    # "remembered": this process hashed it; "recorded": a store did; "skipped": verify_digests=False
    digests: str = "hashed"
    identity: VerifiedIdentity | None = None  # the file as loaded (a store records it once every digest matched)

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
    headroom: int | None = None,
    load_path: str = "auto",
    require_exact: bool = False,
    require_signed: bool = False,
    trust_list: TrustList | None = None,
    kv_quant: KVQuantization | None | str = "artifact",
    at: int | None = None,
    verified: VerifiedIdentity | None = None,
) -> LoadedKV:
    """Load an artifact's KV for `lm`, refusing any model, tokenizer or dtype it was not made for.

    With `verify_digests` (the default) every tensor's BLAKE3 digest is checked before it is used;
    turn it off only for files you wrote yourself. With `require_exact`, lossily encoded (quantised)
    artifacts are refused. A signature, if present, is always verified (BadSignatureError); with
    `require_signed`, an unsigned artifact or one signed by a key outside `trust_list` (default: the
    local trust list) is refused before anything else in its header is used. `verified` is the
    identity a store recorded when it hashed this file: if the file still has exactly that identity,
    no digest is hashed (its identity is checked again after the reads, as for a re-load).

    Version-2 artifacts (sliding windows, recurrent state, quantized KV) must match the caches this
    model makes layer by layer (`CacheMismatchError`) and, unless `kv_quant` is "artifact" (continue
    with the artifact's settings), its KV quantization settings (`KVQuantizationMismatchError`). Their
    state checkpoints are read too, or with `at` only the one at that position (digests "partial").
    """
    t0 = time.perf_counter()
    specs = model_specs(lm.model)
    check_parallel_support(lm, kv_quant=None if kv_quant == "artifact" else kv_quant, specs=specs)
    fingerprints = model_fingerprint(lm), tokenizer_fingerprint(lm)  # before counting the artifact's bytes
    read0 = read_bytes()  # from here on, what this process reads is the artifact (LoadedKV.bytes_read)
    art = Artifact(path, populate=True, verified=verified)  # the map is only made (and pre-faulted) for zero-copy or decoding
    try:
        signature = check_signature(art, require_signed, trust_list)
        art = open_part(art, lm)  # the same layout, or refused by name; under mlx.launch, this rank's part
        check_binding(art.header, lm, fingerprints=fingerprints)
        check_tokens_and_logits(art.header, lm)
        stored_quant = quantization_of(art.header)
        if kv_quant != "artifact":
            check_kv_quantization(stored_quant, kv_quant)
        check_model(art.header, specs, stored_quant)
        encoding = art.header["kv"].get("encoding", "raw")
        if require_exact and not ENCODINGS[encoding]:
            raise LossyArtifactError(f"artifact KV is {encoding}-quantised (lossy) but an exact load was required")
        checkpoints: dict = {}
        # before the reads, which remember a fully hashed file (then `verified_before` would say so)
        plain = _plain_kv(art.header)
        v2_names = None if plain else ["logits", *state_tensor_names(art.header, at)]
        known = ("recorded" if art.recorded else "remembered"
                 if art.verified_before or (v2_names is not None and art.verified_for(v2_names)) else None)
        if plain:
            caches, logits, used = read_caches(art, verify_digests=verify_digests, headroom=headroom, load_path=load_path)
            whole = True
        else:
            caches, checkpoints, logits, used, whole = _read_v2(art, verify_digests, at, v2_names)
        digests = "skipped" if not verify_digests else known or ("hashed" if whole else "partial")
    except BaseException:
        _release(art)
        raise
    if used != "overlap":  # the overlap path's workers close the map when they are done
        _release(art)
    read1 = read_bytes()
    return LoadedKV(caches, list(art.header["document"]["tokens"]), logits, art.header, time.perf_counter() - t0, used,
                    signature, checkpoints, stored_quant,
                    read1 - read0 if read0 is not None and read1 is not None else None, digests, art.identity)


def check_kv_quantization(stored: KVQuantization | None, wanted: KVQuantization | None) -> None:
    """Refuse KV computed with other `--kv-bits` settings than this run's (one line naming both).

    A from-scratch run quantizes its caches as it prefills, so quantizing a full-precision artifact
    at load (or un-quantizing one) would not give what that run computes: refused, never approximated.
    """
    if stored == wanted:
        return
    def words(q):
        return q.describe() if q else "full-precision KV (no --kv-bits)"
    raise KVQuantizationMismatchError(f"artifact KV was computed with {words(stored)}, this run uses {words(wanted)}; "
                                      "publish and continue with the same KV settings")


def _plain_kv(header: dict) -> bool:
    """Version 1, or version 2 holding only full plain KV: the fast copy / zero-copy paths apply."""
    caches = header.get("caches")
    return caches is None or (all(m["family"] == "kv" for m in caches) and not header.get("checkpoints"))


def _read_v2(art: Artifact, verify_digests: bool, at: int | None, names: list[str]):
    """Every family's state (and checkpoints) of a version-2 artifact through `read_tensors`; the last
    item says whether every tensor was read (not so with `at` when the artifact has checkpoints).
    `names`: the logits and the tensors read. A partial read that hashed them is remembered (by
    tensor), so loading the same checkpoint again hashes nothing."""
    hashed = verify_digests and not art.verified_for(names)
    whole = at is None or not art.header.get("checkpoints")
    logits = _read_logits(art, hashed)
    arrays = read_tensors(art, names[1:], hashed)
    caches, checkpoints = build_states(art.header, arrays, at=at)
    _finish(art, hashed and whole, verify_digests and not hashed)
    if hashed and not whole:
        art.mark_verified(names)
    return caches, checkpoints, logits, "native" if _reads_natively(art, names[1:], hashed) else "copy", whole


def read_tensors(art: Artifact, names: Sequence[str], verify: bool, *, threads: int | None = None) -> dict[str, mx.array]:
    """Named tensors of an open artifact as evaluated MLX arrays of their stored shape and dtype: the
    read path of every cache family (version-2 states and checkpoints: plain, quantized, rotating,
    arrays). Version 3 with nothing to hash, or in the page cache: `mx.load` reads the raw tensors
    (`_read_native`, hashing them in memory if asked).
    Otherwise destinations come from one `buffers.destinations` call for every dtype; each raw tensor is
    read straight into its buffer with one `preadv` (its digest checked while the bytes are hot), on
    the load pool unless the whole read is small and unhashed. Encoded tensors are decoded."""
    entries = [art.tensors[name] for name in names]
    raw = [e for e in entries if e.encoding == "raw" and e.nbytes]
    out: dict[str, mx.array] = {}
    if _reads_natively(art, [e.name for e in entries], verify):
        out.update(zip((e.name for e in raw), _read_native(art, [e.name for e in raw], verify)))
        raw = []
    out.update(zip((e.name for e in raw), buffers.destinations([e.shape for e in raw], [e.dtype for e in raw])[0]))

    def read(batch: Sequence) -> None:
        for e in batch:
            art.read_into(e.name, [memoryview(out[e.name]).cast("B")], verify=verify)

    total = sum(e.nbytes for e in raw)
    if total > SMALL_READ:
        art.reading_in_order()
    workers = threads or min(8, CPUS * (2 if verify else 1))
    if workers <= 1 or total <= SMALL_READ or (not verify and total <= SERIAL_BYTES):
        read(raw)
    else:  # file order, in about 4 batches per worker: few hand-offs, yet balanced
        batches, batch, size, target = [], [], 0, max(total // (4 * workers), 1)
        for e in raw:
            batch.append(e)
            size += e.nbytes
            if size >= target:
                batches.append(batch)
                batch, size = [], 0
        for _ in _pool(workers).map(read, batches + [batch] if batch else batches):
            pass
    for e in entries:
        if e.name in out:
            continue
        if e.nbytes == 0:
            out[e.name] = mx.zeros(e.shape, DTYPES[e.dtype])
            continue
        data = decode(art.tensor_bytes(e.name, verify=verify), e.encoding, e.params, e.dtype, e.shape)
        out[e.name] = mx.array(np.frombuffer(data, np.uint8)).view(DTYPES[e.dtype]).reshape(e.shape)
    return out


def _reads_natively(art: Artifact, names: Sequence[str], verify: bool) -> bool:
    """Whether `read_tensors` reads `names` with `mx.load`: version 3, all raw, enough of them
    (`_native_pays`), and nothing to hash or the file in the page cache (`Artifact.cached`): then
    `mx.load` reads and the tensors are hashed in memory; hashing while reading (the copy path)
    pays off only when the reads wait for a disk."""
    raw = [n for n in names if art.tensors[n].nbytes]
    return (bool(raw) and art.native_source() is not None and all(art.tensors[n].encoding == "raw" for n in names)
            and _native_pays(art, raw) and (not verify or art.cached()))


def _native_pays(art: Artifact, names: Sequence[str], destination_bytes: int | None = None) -> bool:
    """Whether `mx.load` beats reads on the calling thread. Its fixed cost (~0.5 ms: parsing the
    table, a hand-off per tensor to its I/O threads) exceeds the reads of a few MB; and the reads'
    destinations cost no `mx.eval` while they total at most `buffers.HOST_BUILT`, so then any number of
    tensors is read faster (builtin:tiny with `--kv-bits 8`, 24 tensors of 0.3 MB in all: 0.37
    against 0.75 ms). `destination_bytes`: what the copy path would allocate, when it is more than
    the stored bytes (spare slots)."""
    stored = sum(art.tensors[n].nbytes for n in names)
    needs_eval = (stored if destination_bytes is None else destination_bytes) > buffers.HOST_BUILT
    return stored > SMALL_READ or (len(names) > FEW_TENSORS and needs_eval)


def _read_native(art: Artifact, names: Sequence[str], verify: bool) -> list[mx.array]:
    """Named raw tensors of a version-3 artifact, read by `mx.load` (the tensors not named are never
    read: its arrays are lazy) and, with `verify`, checked against their digests once in memory
    (one tensor per worker, each hashed on one thread)."""
    lazy = mx.load(art.native_source(), format="safetensors")
    arrays = [lazy[name] for name in names]
    del lazy
    for name, a in zip(names, arrays):  # what mx.load parsed is what the header said (the file could change)
        entry = art.tensors[name]
        if tuple(a.shape) != entry.shape or a.dtype != DTYPES[entry.dtype]:
            raise IntegrityError(f"{art.path.name}: the file changed on disk while it was being loaded")
    mx.eval(arrays)
    if verify:
        threaded = len(names) < CPUS  # else one tensor per worker, each on one thread
        _parallel(lambda i: art.check_loaded(names[i], arrays[i], threaded), list(range(len(names))), None)
    art.check_unchanged()
    return arrays


def check_tokens_and_logits(header: dict, lm: LoadedModel) -> None:
    """Refuse token ids outside the model's vocabulary and a logits row of the wrong length.

    The format only bounds ids by 2^31: an id past the embedding table would be read out of bounds by
    any later prefill of the document (MLX's CPU backend segfaults), and a short logits row would
    pick the first token from the wrong distribution.
    """
    vocab = lm.config.get("vocab_size")
    if not isinstance(vocab, int):
        return
    tokens = header["document"]["tokens"]
    if tokens and max(tokens) >= vocab:
        raise ModelMismatchError(f"artifact token id {max(tokens)} is outside this model's vocabulary of {vocab}")
    shape = next(t["shape"] for t in header["tensors"] if t["name"] == "logits")
    if list(shape) != [vocab]:
        raise ModelMismatchError(f"artifact logits row has shape {list(shape)}, this model's vocabulary is {vocab}")


def read_caches(
    art: Artifact,
    *,
    verify_digests: bool = True,
    headroom: int | None = None,
    load_path: str = "auto",
    threads: int | None = None,
) -> tuple[list[KVCache], mx.array, str]:
    """The KV of an open artifact as evaluated `KVCache`s, plus its logits row and the path used.

    No model checks happen here (`load_artifact` does them); benchmarks call this on synthetic KV.
    The caller closes `art` afterwards, except after the overlap path, whose workers close it.
    """
    if load_path not in LOAD_PATHS:
        raise ValueError(f"load_path must be one of {LOAD_PATHS}")
    names = header_kv_names(art.header)
    n = art.header["kv"]["num_tokens"]
    raw = art.header["kv"].get("encoding", "raw") == "raw"
    native = raw and art.native_source() is not None
    used = "zero-copy" if load_path == "zero-copy" or (load_path == "auto" and raw and zero_copy_available()) else load_path
    # a re-load of a file whose digests all matched earlier in this process skips hashing (format.py)
    hashed = verify_digests and not art.verified_before
    recheck = verify_digests and not hashed
    capacity = _page_rows(n + (spare_slots(n) if headroom is None else headroom), art.tensors[names[0]])
    if used == "auto":  # hashing: native (then hash in memory) only where the file is cached, else copy
        destination = sum(art.tensors[name].nbytes // n * capacity for name in names) if n else None
        used = ("native" if native and headroom is None and _native_pays(art, names, destination) and (not hashed or art.cached())
                else "copy")
    if used == "zero-copy" and not raw:
        raise ValueError("only raw artifacts can be loaded without a copy")
    if used == "native" and not native:
        raise ValueError("only raw version-3 artifacts can be read by mx.load")
    logits = _read_logits(art, hashed)
    if used == "native":
        arrays = _read_native(art, names, hashed)
        _finish(art, hashed, recheck)
        return from_arrays(arrays, n), logits, used
    if used == "zero-copy":
        if hashed:
            _parallel(lambda name: art.tensor_bytes(name, verify=True), names, threads)
        arrays = [_adopt(art, name) for name in names]
        mx.eval(logits, arrays)
        _finish(art, hashed, recheck)
        return from_arrays(arrays, n), logits, used
    art.reading_in_order()
    # hashing workers leave the disk idle: with twice as many workers as cores, some read while others
    # hash (a cold first load of 557 MB here: 656 -> 573 ms; warm loads unchanged)
    workers = threads or min(8, CPUS * (2 if hashed else 1))
    kv_bytes = sum(art.tensors[name].nbytes for name in names)
    if used == "copy" and not hashed and threads is None and kv_bytes <= SERIAL_BYTES:
        # a small re-load: handing layers to threads costs more than copying them here (~1 ms a MB)
        arrays, zeroed = buffers.destinations([_with_capacity(art.tensors[name].shape, capacity) for name in names],
                                       art.tensors[names[0]].dtype)
        for i in range(0, len(names), 2):
            _copy_layer(art, names[i : i + 2], arrays[i : i + 2], False, False, zeroed)
        _finish(art, False, recheck)
        return from_arrays(arrays, n), logits, used
    pool = _pool(workers)
    arrays: list[mx.array] = []
    futures: list[Future] = []
    for first in range(0, len(names), 2 * ALLOC_LAYERS):
        # allocate a few layers here while workers read the ones before: allocation and reads overlap
        group = names[first : first + 2 * ALLOC_LAYERS]
        fresh, zeroed = buffers.destinations([_with_capacity(art.tensors[name].shape, capacity) for name in group],
                                      art.tensors[group[0]].dtype)
        arrays += fresh
        for i in range(first, first + len(group), 2):
            futures.append(pool.submit(_copy_layer, art, names[i : i + 2], arrays[i : i + 2], hashed, recheck, zeroed))
    if used == "copy":
        for f in futures:
            f.result()
        _finish(art, hashed, False)
        return from_arrays(arrays, n), logits, used

    def close_when_done() -> None:
        wait(futures)
        if not any(f.exception() for f in futures):
            _finish(art, hashed, False)
        _release(art)

    threading.Thread(target=close_when_done, name="kvmlx-load-close", daemon=True).start()
    return [StreamedKVCache(k, v, n, f) for k, v, f in zip(arrays[::2], arrays[1::2], futures)], logits, used


def spare_slots(n: int) -> int:
    """Free slots after an `n`-token document in each loaded KV buffer (the copy path's default headroom).

    They let the suffix and the first decode steps append without mlx-lm's grow-and-copy of the whole
    cache, but every load pays for them (allocation, zeroing: `_copy_heads`). At most n/8 of them, so
    they never add more than 1/8 to a load's bytes, while an overflow costs a copy of all n slots: 8x
    that; at most one mlx-lm step (256: a 3774-token document keeps room for a 256-token suffix), and
    at least MIN_HEADROOM. 256 slots at any length made a 255-token load allocate twice the document.
    """
    return max(MIN_HEADROOM, min(DEFAULT_HEADROOM, n // 8))


def _page_rows(slots: int, entry) -> int:
    """`slots` rounded up so that each head's row of a [1, H, slots, D] buffer is a whole number of
    4 KiB pages: every head's `preadv` destination then starts at the same offset within a page
    (3774 tokens: 4030 slots, rows 16 bytes off, read in 85 ms; 4032 slots in 55-64 ms)."""
    row = entry.shape[3] * DTYPE_SIZES[entry.dtype]
    unit = PAGE // math.gcd(PAGE, row) if row else 1
    return -(-slots // unit) * unit


def _read_logits(art: Artifact, verify: bool) -> mx.array:
    """The stored logits row, read with `pread` (mapping a whole file to read 300 KB costs 40+ ms)."""
    entry = art.tensors["logits"]
    raw = np.empty(entry.nbytes, dtype=np.uint8)
    art.read_into("logits", [memoryview(raw)], verify=verify)
    return mx.array(raw).view(DTYPES[entry.dtype]).reshape(entry.shape)


def _copy_layer(art: Artifact, names: list[str], arrays: list[mx.array], hashed: bool, recheck: bool,
                zeroed: bool = False) -> None:
    for name, dst in zip(names, arrays):
        _copy_heads(art, name, dst, hashed, zeroed)
    if recheck:  # hashing was skipped because this file was verified before: it must still be that file
        art.check_unchanged()


def _finish(art: Artifact, verified_all: bool, recheck: bool) -> None:
    """After the reads: remember a fully hashed file (the format allows no tensors beyond the KV and
    logits, all of which were hashed), or check that a file read without hashing is unchanged."""
    if verified_all:
        art.mark_verified()
    if recheck:
        art.check_unchanged()


def zero_copy_available() -> bool:
    """MLX adopts host memory without a copy only on Metal (the CPU backend always copies)."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def _adopt(art: Artifact, name: str) -> mx.array:
    """Hand one page-aligned tensor of the map to MLX without copying (Metal only; raises elsewhere)."""
    entry = art.tensors[name]
    raw = np.frombuffer(art.tensor_bytes(name, verify=False), dtype=np.uint16 if entry.dtype != "float32" else np.uint32)
    return mx.asarray(raw, copy=False).view(DTYPES[entry.dtype]).reshape(entry.shape)


def _with_capacity(shape: Sequence[int], capacity: int) -> tuple[int, ...]:
    b, heads, _, head_dim = shape
    return (b, heads, capacity, head_dim)


def _copy_heads(art: Artifact, name: str, dst: mx.array, verify: bool, zeroed: bool = False) -> None:
    """Fill the first L slots of each head of `dst` [1, H, capacity, D] with one [1, H, L, D] tensor,
    and zero the rest.

    Raw tensors are read straight from the file into the MLX buffer (one `preadv` per tensor, one
    copy); encoded ones are decoded from the map first. Digests are checked either way. The spare
    slots are zeroed because `dst` may be recycled memory (`buffers.destinations`) and mlx-lm's
    `KVCache.state` hands out the whole buffer: `save_prompt_cache` of a loaded cache must not
    write whatever this process held there before (another document's KV). `zeroed`: `dst` was
    zero-filled when it was made (`buffers.destinations`), so the spare slots already are.
    """
    entry = art.tensors[name]
    heads = entry.shape[1]
    per_head = entry.shape[2] * entry.shape[3] * DTYPE_SIZES[entry.dtype]
    out = memoryview(dst).cast("B")
    stride = out.nbytes // heads
    by_head = np.frombuffer(out, dtype=np.uint8).reshape(heads, stride)
    if not zeroed:
        by_head[:, per_head:] = 0
    if entry.encoding == "raw":
        art.read_into(name, [out[h * stride : h * stride + per_head] for h in range(heads)], verify=verify)
        return
    raw = decode(art.tensor_bytes(name, verify=verify), entry.encoding, entry.params, entry.dtype, entry.shape)
    np.copyto(by_head[:, :per_head], np.frombuffer(raw, dtype=np.uint8).reshape(heads, per_head))


def _parallel(fn, items: list, threads: int | None) -> None:
    """Run `fn` over `items` on a thread pool (the work releases the GIL), re-raising the first error."""
    workers = threads or min(8, CPUS)
    if workers <= 1:
        for item in items:
            fn(item)
        return
    for _ in _pool(workers).map(fn, items):
        pass


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """This process's pool of `workers` reader threads, started once and kept: starting and joining
    threads cost ~2.5 ms a load (most of a small artifact's load). Keyed by pid, so a forked child
    starts its own (a parent's threads do not exist in it)."""
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix=f"kvmlx-load{workers}")
        return pool


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
