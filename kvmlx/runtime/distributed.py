"""Publishing and loading KV across the processes of a distributed run (`mlx.launch`, sharded by mlx-lm).

Under `mlx.launch -n N`, `kvmlx.models.load_model` shards the model with mlx-lm's `sharded_load`
(tensor parallel: each rank holds H/N KV heads of every layer; pipeline: each rank holds its layers).
This module owns what kvmlx does there, and nothing else knows about ranks:

- the running **layout** (`running_layout`): which rank holds which KV heads and layers; it is written
  into the header and a load under any other layout is refused (artifact/layout.py);
- **writing** (`write_parallel`): every rank writes its own *part* file (only its heads or layers,
  each tensor with its BLAKE3 digest) atomically; the ranks then exchange each part's header digest
  and size, and only when every rank succeeded does each write the *manifest* (a tensor-less kvmlx
  file listing every part and its header digest; identical bytes on every rank, so each host of a
  multi-Mac run gets its own copy without a shared file system). A rank killed before that leaves
  parts but no manifest: nothing loads (a part alone is refused);
- **reading** (`open_part`): a rank checks the manifest (signature, layout, binding), then opens only
  its own part, whose header must have the digest the manifest records: it reads its share of the
  bytes and verifies exactly those (`read_bytes` counts them, from the kernel's per-process I/O counter);
- the **collectives** those steps need (a barrier with a timeout, gathering per-rank numbers).

Part files are named `<manifest name>.<publish id>.rank<r>of<N>`; the manifest names them, so they
travel with it (the store keeps them beside its object).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import secrets
import signal
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from ..artifact.format import Artifact, Signer, TensorData, write_artifact
from ..artifact.identity import config_geometry
from ..artifact.layout import (
    Layout,
    check_layout,
    header_layout,
    pipeline_layout,
    tensor_layout,
)
from ..caches import KVQuantization, model_specs
from ..errors import ArtifactError, IntegrityError, KvmlxError, UnsupportedModelError, UnsupportedParallelError
from ..models import LoadedModel

BARRIER_TIMEOUT = float(os.environ.get("KVMLX_DIST_TIMEOUT", "300"))  # seconds a rank waits for the others
ID_BYTES = 8
# the header fields a part must share with its manifest (tensors, sizes and `parallel` differ by design)
_SHARED_FIELDS = ("model", "tokenizer", "kv", "document", "created_by", "format", "version", "digest")


class DistributedError(KvmlxError):
    """Another rank failed, was killed or timed out: this rank stopped without publishing anything."""


# ---- the layout of the running model ----------------------------------------------------------------

def running_layout(lm: LoadedModel) -> Layout | None:
    """The layout `lm` is sharded in (None: one process holding the whole model)."""
    if lm.group is None:
        return None
    size, geometry = lm.group.size(), config_geometry(lm.model, lm.config)
    if lm.parallel == "tensor":
        if geometry.num_kv_heads % size:
            raise UnsupportedModelError(f"{geometry.num_kv_heads} KV heads do not split over {size} tensor-parallel ranks")
        return tensor_layout(size, geometry.num_layers, geometry.num_kv_heads)
    layout = pipeline_layout(size, geometry.num_layers, geometry.num_kv_heads)
    inner = lm.model.model
    mine = layout.part(lm.group.rank())
    if (inner.start_idx, inner.end_idx) != mine.layers:  # mlx-lm changed its split: refuse rather than mislabel
        raise UnsupportedModelError(f"rank {lm.group.rank()} runs layers {inner.start_idx}-{inner.end_idx - 1}, "
                                    f"not the {mine.layers[0]}-{mine.layers[1] - 1} kvmlx expects of mlx-lm's pipeline")
    return layout


def check_parallel_support(lm: LoadedModel, *, kv_quant: KVQuantization | None = None,
                           specs: Sequence[dict] | None = None) -> None:
    """Refuse, in one line naming both, what a distributed run does not support: parallel artifacts hold
    plain KV (version 1), so a model with other cache families and `--kv-bits` KV run in one process only.
    Every rank reaches the same verdict, so all refuse before any collective."""
    if lm.group is None:
        return
    other = sorted({s["family"] for s in (model_specs(lm.model) if specs is None else specs) if s["family"] != "kv"})
    what = ([f"{', '.join(other)} caches"] if other else []) + ([f"quantized KV ({kv_quant.describe()})"] if kv_quant else [])
    if what:
        raise UnsupportedParallelError(
            f"{lm.parallel}-parallel over {lm.group.size()} ranks supports plain KV only, not {' or '.join(what)}: "
            "run it in one process (without mlx.launch)")


# ---- collectives --------------------------------------------------------------------------------------

def gather(lm: LoadedModel, row: Sequence[int], *, what: str, timeout: float | None = None) -> list[list[int]]:
    """Every rank's `row` of int64s, in rank order (an all-sum of disjoint rows), within `timeout` seconds.

    A lost peer (the ring backend fails its pending operations) or a timeout raises DistributedError.
    """
    _settle()
    size, rank = lm.group.size(), lm.group.rank()
    rows = [[0] * len(row) for _ in range(size)]
    rows[rank] = [int(v) for v in row]

    def run(stream) -> list[list[int]]:
        table = mx.array(rows, dtype=mx.int64)
        return mx.distributed.all_sum(table, group=lm.group, stream=stream).tolist()

    limit = BARRIER_TIMEOUT if timeout is None else timeout
    try:
        return _collective(run).result(timeout=limit)
    except FutureTimeout:
        raise DistributedError(f"no answer from the other ranks within {limit:.0f} s while {what}") from None
    except RuntimeError as e:  # the ring backend fails pending operations when a peer is gone
        raise DistributedError(f"lost the other ranks while {what} ({e})") from None


# One daemon thread runs these collectives, so that a caller can give up on one (the timeout above)
# and a stuck one never holds up the process's exit. MLX streams belong to the thread that made them
# and each CPU stream keeps an OS thread of its own: one stream, one thread, for every collective.
_QUEUE: queue.Queue = queue.Queue()
_WORKER: list[threading.Thread] = []
_WORKER_LOCK = threading.Lock()


def _collective(fn) -> Future:
    with _WORKER_LOCK:
        if not _WORKER:
            _WORKER.append(threading.Thread(target=_serve_collectives, name="kvmlx-collective", daemon=True))
            _WORKER[0].start()
    done: Future = Future()
    _QUEUE.put((fn, done))
    return done


def _serve_collectives() -> None:
    stream = mx.new_stream(mx.cpu)
    while True:
        fn, done = _QUEUE.get()
        try:
            done.set_result(fn(stream))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            done.set_exception(e)


def _settle() -> None:
    """Finish this thread's pending MLX work before a collective: a forward evaluated asynchronously
    (mlx-lm's generation stream: BatchGenerator pipelines the next step) runs collectives of its own,
    and every rank must issue its collectives in the same order for them to pair up."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def share(lm: LoadedModel, obj=None):
    """Rank 0's JSON-able `obj`, on every rank (a collective on the calling thread, no timeout: the other
    ranks of a server wait here while rank 0 is idle). JSON, not pickle: nothing executable crosses."""
    _settle()
    if lm.group.rank() == 0:
        data = json.dumps(obj).encode()
        mx.eval(mx.distributed.all_sum(mx.array(len(data)), group=lm.group))
        mx.eval(mx.distributed.all_sum(mx.array(list(data), dtype=mx.uint8), group=lm.group))
        return obj
    size = mx.distributed.all_sum(mx.array(0), group=lm.group).item()
    data = mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8), group=lm.group)
    return json.loads(bytes(memoryview(data)))


def per_rank(lm: LoadedModel, **values: float | int | None) -> list[dict] | None:
    """Every rank's `values` in rank order (a collective: every rank calls it), None in one process.

    Floats travel as microseconds, None as -1."""
    if lm.group is None:
        return None
    keys = sorted(values)
    floats = {k for k in keys if isinstance(values[k], float)}
    row = [-1 if values[k] is None else round(values[k] * 1e6) if k in floats else int(values[k]) for k in keys]
    table = gather(lm, row, what="gathering per-rank figures")
    return [{"rank": r, **{k: None if v == -1 else v / 1e6 if k in floats else v for k, v in zip(keys, t)}}
            for r, t in enumerate(table)]


def lost_peer(e: BaseException) -> DistributedError | None:
    """The one-line error for an MLX backend failing because another rank is gone (ring, JACCL, MPI), else None."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, RuntimeError) and (text.startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]")) or "peer" in text):
        return DistributedError(f"lost the other ranks ({text}); another rank failed or was killed")
    return None


def install_launcher_handlers() -> None:
    """Turn the launcher's SIGTERM (`mlx.launch` ends every rank when one fails) into a one-line error."""
    def stop(signum, frame):
        raise DistributedError("stopped by the launcher (another rank failed or was killed)")

    signal.signal(signal.SIGTERM, stop)


def read_bytes() -> int | None:
    """Bytes this process has read with read/pread syscalls so far (Linux /proc/self/io `rchar`), or None.
    The file stays open (a `pread` of it is ~2 us, an open ~10); a forked child opens its own."""
    pid = os.getpid()
    try:
        if _PROC_IO[0] != pid:
            with _PROC_IO_LOCK:
                if _PROC_IO[0] != pid:
                    _PROC_IO[1] = os.open(f"/proc/{pid}/io", os.O_RDONLY | os.O_CLOEXEC)
                    _PROC_IO[0] = pid
        text = os.pread(_PROC_IO[1], 4096, 0)
        start = text.index(b"rchar:") + 6
        return int(text[start : text.index(b"\n", start)])
    except (OSError, ValueError):
        return None


_PROC_IO: list = [None, -1]  # [pid, descriptor of its /proc/PID/io]
_PROC_IO_LOCK = threading.Lock()


# ---- writing ------------------------------------------------------------------------------------------

def write_parallel(out: str | os.PathLike, header: dict, tensors: Sequence[TensorData], lm: LoadedModel,
                   *, sign: Signer | None = None) -> dict:
    """Write this rank's part of a parallel artifact, then (once every rank wrote its part) the manifest.

    `tensors` are this rank's KV tensors, named by local layer index as `caches.kv_arrays` names them,
    plus `logits`. Returns the manifest's header with `part_bytes` (this rank's part) added.
    """
    out = Path(out)
    layout, geometry = running_layout(lm), config_geometry(lm.model, lm.config)
    # the header describes the whole model; `parallel` says which share of it each part holds
    header = {**header, "model": {**header["model"], "num_layers": geometry.num_layers, "num_kv_heads": geometry.num_kv_heads}}
    rank, size = lm.group.rank(), lm.group.size()
    mine = layout.part(rank)
    publish_id = _shared_id(lm)
    parallel = layout.to_json()
    part_name = f"{out.name}.{publish_id}.rank{rank}of{size}"
    previous = _previous_part(out, rank)
    ok, written = 0, None
    try:
        named = [dataclasses.replace(t, name=_global_name(t.name, mine.layers[0])) for t in tensors]
        written = write_artifact(out.parent / part_name, {**header, "parallel": {**parallel, "part": rank}}, named)
        ok = 1
    finally:
        # every rank reaches this exchange, failed or not, so that no rank waits for one that gave up
        digest = _part_digest(out.parent / part_name) if ok else bytes(32)
        row = [ok, written["file_bytes"] if ok else 0, *(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4))]
        try:
            table = gather(lm, row, what="exchanging part digests")
        except DistributedError:
            _remove(out.parent / part_name)
            raise
    failed = [r for r, t in enumerate(table) if not t[0]]
    if failed:
        _remove(out.parent / part_name)
        raise DistributedError(f"rank(s) {', '.join(map(str, failed))} could not write their parts; nothing was published")
    parts = [{"rank": r, "file": f"{out.name}.{publish_id}.rank{r}of{size}", "file_bytes": t[1],
              "header_blake3": b"".join(int(w).to_bytes(4, "little") for w in t[2:]).hex()} for r, t in enumerate(table)]
    manifest = write_artifact(out, {**header, "parallel": {**parallel, "parts": parts}}, [], sign=sign)
    gather(lm, [1], what="waiting for every rank's manifest")
    if previous and previous != part_name:
        _remove(out.parent / previous)
    return {**manifest, "part_bytes": written["file_bytes"]}


def _shared_id(lm: LoadedModel) -> str:
    """A random id for this publish, drawn by rank 0 and shared (part files of two publishes never collide)."""
    mine = [int.from_bytes(secrets.token_bytes(4), "little") for _ in range(ID_BYTES // 4)] if lm.group.rank() == 0 else [0, 0]
    words = gather(lm, mine, what="starting the publish")[0]
    return "".join(f"{w:08x}" for w in words)


def _global_name(name: str, first_layer: int) -> str:
    """`layers.{i}.keys` of a stage's local layer i -> the model's layer number (pipeline stages start later)."""
    if not name.startswith("layers."):
        return name
    _, i, kind = name.split(".")
    return f"layers.{int(i) + first_layer}.{kind}"


def _part_digest(path: Path) -> bytes:
    with Artifact(path) as art:
        return art.header_digest


def _previous_part(out: Path, rank: int) -> str | None:
    """This rank's part named by a manifest already at `out` (replaced by this publish), if any."""
    try:
        with Artifact(out) as art:
            parts = art.header.get("parallel", {}).get("parts") or []
            return parts[rank]["file"] if rank < len(parts) else None
    except (KvmlxError, OSError):
        return None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


# ---- reading ------------------------------------------------------------------------------------------

def open_part(art: Artifact, lm: LoadedModel, *, populate: bool = True) -> Artifact:
    """The artifact this rank reads: `art` itself for one process, else its own part of the manifest `art`.

    Refuses any other layout than the running one, naming both (LayoutMismatchError), and a part
    whose header is not the one the manifest records (IntegrityError). Closes `art` if it returns another.
    """
    running = running_layout(lm)
    check_layout(art.header, running)
    if running is None:
        return art
    rank = lm.group.rank()
    entry = art.header["parallel"]["parts"][rank]
    path = art.path.parent / entry["file"]
    if not path.exists():
        raise ArtifactError(f"{art.path.name}: rank {rank}'s part {entry['file']} is missing (copy it beside the manifest)")
    part = Artifact(path, populate=populate)
    try:
        if part.header_digest.hex() != entry["header_blake3"] or part.size != entry["file_bytes"]:
            raise IntegrityError(f"{path.name}: part does not match the digest its manifest {art.path.name} records")
        p = part.header.get("parallel", {})
        if p.get("part") != rank or header_layout(part.header) != running or \
                any(part.header.get(k) != art.header.get(k) for k in _SHARED_FIELDS):
            raise IntegrityError(f"{path.name}: part disagrees with its manifest {art.path.name}")
    except BaseException:
        part.close()
        raise
    art.close()
    return part


def verify_parts(manifest: Artifact) -> int:
    """Check every part found beside a manifest against it (header digest, size) and all its tensor
    digests; return how many tensors were verified (0 for an artifact of one process). For
    `kvmlx verify --no-model`: on a multi-host run each host holds only its own parts."""
    count = 0
    for entry in manifest.header.get("parallel", {}).get("parts", []):
        path = manifest.path.parent / entry["file"]
        if not path.exists():
            continue
        with Artifact(path) as part:
            if part.header_digest.hex() != entry["header_blake3"] or part.size != entry["file_bytes"]:
                raise IntegrityError(f"{path.name}: part does not match the digest its manifest {manifest.path.name} records")
            part.verify_all()
            count += len(part.tensors)
    return count
