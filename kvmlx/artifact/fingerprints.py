"""Fingerprints of a model directory that persist: the weights digest computed from the safetensors
files themselves, and a small cache that remembers each fingerprint keyed by the identity of the
files it was computed from, so a process that loads an unchanged model computes nothing.

Weights digest (fingerprint scheme 2, written `fp2:blake3:<hex>`):
    BLAKE3 over canonical JSON of config.json (minus the keys that do not change the computation),
    then, for every tensor of every `*.safetensors` file in name order: its name, stored dtype and
    shape, and the BLAKE3 of its stored bytes. Tensors are read in 8 MiB pieces into one reused
    buffer (no model load, no full-size temporaries, nothing mapped), so it runs at the disk's or
    BLAKE3's speed, whichever is lower. It depends only on what the files hold: the same weights
    split into other files, another shard count or another directory give the same digest, and so
    does every rank of a tensor- or pipeline-parallel run.

The cache (`$KVMLX_HOME/fingerprints/<digest of the directory path>.json`): for each kind
(`model`, `tokenizer`) the fingerprint and the identity (size, mtime_ns, ctime_ns, inode, device)
of each file it covers: the weights and config.json for `model`, every other file of the
directory for `tokenizer`. A lookup stats those files and returns the fingerprint only if every
identity is unchanged and no file was added or removed. Like the artifact memo (format.py), a file
changed in the last 2 s is not recorded (timestamps may not tick between two writes), and a change
that keeps size and timestamps and inode (possible only by writing the block device or setting the
clock back) goes unnoticed: docs/SECURITY.md says so. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import blake3

from ..errors import ModelLoadError
from .format import canonical_json
from .verified import SETTLED_SECONDS

SCHEME = "fp2"
# config.json keys that describe the file, not the computation (a dtype difference is checked on its own).
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache", "architectures"})
PIECE = 8 << 20
MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header
_CACHE_VERSION = 1
_lock = threading.Lock()
_seen: dict[tuple[str, str], tuple[list, str]] = {}  # (cache file, kind) -> (identities, fingerprint) this process
_bound: dict[tuple[int, str], str] = {}  # (id of a loaded model, kind) -> its fingerprint (`bound`)


def weights_fingerprint(directory: str | os.PathLike, config: dict) -> str:
    """The weights digest of the model in `directory` (see the module docstring)."""
    tensors: dict[str, tuple[Path, str, list[int], int, int]] = {}
    for path in weight_files(directory):
        for name, entry in _safetensors_entries(path).items():
            if name in tensors:
                raise ModelLoadError(f"tensor {name!r} is stored twice ({tensors[name][0].name} and {path.name})")
            tensors[name] = entry
    if not tensors:
        raise ModelLoadError(f"no *.safetensors weights in {directory}")
    h = blake3.blake3()
    cfg = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    h.update(canonical_json({"fingerprint": SCHEME, "config": cfg}))
    buf = bytearray(PIECE)
    view = memoryview(buf)
    fds: dict[Path, int] = {}
    try:
        for name in sorted(tensors):
            path, dtype, shape, start, end = tensors[name]
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            th = blake3.blake3(max_threads=blake3.blake3.AUTO)
            while start < end:
                n = os.preadv(fd, [view[: min(PIECE, end - start)]], start)
                if n <= 0:
                    raise ModelLoadError(f"{path.name} ends inside tensor {name!r}")
                th.update(view[:n])
                start += n
            h.update(canonical_json([name, dtype, shape, th.hexdigest()]))
    finally:
        for fd in fds.values():
            os.close(fd)
    return f"{SCHEME}:blake3:{h.hexdigest()}"


def weight_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.safetensors") if p.is_file())


def _safetensors_entries(path: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, start, end) from a safetensors header, checked against the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (size,)
            if n > min(MAX_HEADER, size - 8):
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path.name} is not a readable safetensors file ({e})") from None
    base, out = 8 + n, {}
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name} is not a readable safetensors file (header is not an object)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            entry = (path, str(info["dtype"]), [int(d) for d in info["shape"]], base + begin, base + end)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path.name}: malformed entry for tensor {name!r}") from None
        if not 0 <= begin <= end or base + end > size:
            raise ModelLoadError(f"{path.name}: tensor {name!r} lies outside the file")
        out[name] = entry
    return out


# ---- the persisted cache -------------------------------------------------------------------------


def model_files(directory: Path) -> list[Path]:
    """What a model fingerprint covers: the weights and config.json."""
    return weight_files(directory) + [directory / "config.json"]


def tokenizer_files(directory: Path) -> list[Path]:
    """What a tokenizer fingerprint is taken to depend on: every other file of the directory."""
    weights = set(weight_files(directory))
    return sorted(p for p in directory.iterdir() if p.is_file() and p not in weights and not p.name.startswith("."))


def cached(kind: str, directory: Path, files: Callable[[Path], list[Path]], compute: Callable[[], str],
           home: Path) -> str:
    """The `kind` fingerprint of `directory`: remembered if its files are unchanged, else computed and
    remembered (unless a file changed within the last SETTLED_SECONDS)."""
    directory = Path(directory).resolve()
    store = home / "fingerprints" / f"{blake3.blake3(str(directory).encode()).hexdigest()[:32]}.json"
    try:
        paths = files(directory)
        ids = [_identity(p) for p in paths]
    except OSError:
        return compute()  # files vanished while we looked: compute, remember nothing
    with _lock:
        hit = _seen.get((str(store), kind))
    if hit is not None and hit[0] == ids:
        return hit[1]
    record = _read(store)
    entry = record.get(kind) if record.get("path") == str(directory) else None
    if isinstance(entry, dict) and entry.get("files") == ids and isinstance(entry.get("fingerprint"), str):
        fingerprint = entry["fingerprint"]
    else:
        fingerprint = compute()
        settled = all(time.time() - i[2] / 1e9 >= SETTLED_SECONDS and time.time() - i[3] / 1e9 >= SETTLED_SECONDS
                      for i in ids)
        if settled and [_identity(p) for p in paths] == ids:  # unchanged while we computed
            _write(store, str(directory), kind, {"files": ids, "fingerprint": fingerprint})
    with _lock:
        _seen[(str(store), kind)] = (ids, fingerprint)
    return fingerprint


def bound(obj: object, kind: str, look_up: Callable[[], str]) -> str:
    """`kind`'s fingerprint of a loaded model `obj`, looked up once per object (`look_up`, usually
    `cached`, stats its files) and then kept while it lives: the weights and tokenizer in memory do not
    change when the files they were loaded from do, so every later load binds to what was loaded
    (and costs no `stat`: ~0.3 ms of a small load)."""
    key = (id(obj), kind)
    with _lock:
        hit = _bound.get(key)
    if hit is not None:
        return hit
    value = look_up()
    with _lock:
        if key not in _bound:
            weakref.finalize(obj, _bound.pop, key, None)
        _bound[key] = value
    return value


def forget_fingerprints() -> None:
    """Forget what this process remembered, loaded models' fingerprints included (the files under
    $KVMLX_HOME/fingerprints stay)."""
    with _lock:
        _seen.clear()
        _bound.clear()


def _identity(path: Path) -> list:
    st = os.stat(path)  # follows symlinks: a Hugging Face snapshot's files point into its blobs
    return [path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read(store: Path) -> dict:
    try:
        record = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("version") == _CACHE_VERSION else {}


def _write(store: Path, directory: str, kind: str, entry: dict) -> None:
    """Merge `entry` into the record and replace the file atomically; a cache that cannot be written
    only costs a recomputation next time."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        record = _read(store)
        if record.get("path") != directory:
            record = {"version": _CACHE_VERSION, "path": directory}
        record[kind] = entry
        fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=f".{store.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, sort_keys=True)
            os.replace(tmp, store)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass
