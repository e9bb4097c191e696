"""The prefix cache: every prefix kvmlx computes, kept as block-addressed records and reused by the next
prompt that shares it — across turns, requests, restarts and processes (docs/STORE.md, "The prefix cache").

    cache = PrefixCache(lm, store.root)              # <store>/cache, this model's identity
    hit = cache.fetch(prompt_tokens)                 # Restored(caches, tokens, by_tier) | None
    ... prefill prompt_tokens[hit.tokens:] into hit.caches, decode ...
    cache.save(prompt_tokens + generated[:n], caches)   # writes only what is not stored yet

A conversation prefix is a chain of *segments*: runs of tokens that never cross a multiple of the
block size (default 256), each keyed by BLAKE3 over (its parent's key, its start, its token ids); the
root key is the digest of the identity every artifact binds (model and tokenizer fingerprints, KV
dtype and `--kv-bits` settings, block size). A whole block computed at once is one segment; a turn
that ends inside a block writes the tokens it added as a segment of their own, and the next turn
continues after it, so every token is written once (no tail is rewritten as the block fills up).
Segments hold the KV of the layers that can be cut at any token (plain and quantized KV); the other
layers (recurrent state, sliding windows) are kept as *snapshots* of their state at the positions the
next prompt will need: each prompt's end, each request's finish, and the `auto` checkpoint spacing
inside long prefills. A lookup walks the chain as far as the prompt's tokens match, then stops at the
deepest position it can restore (any position for plain KV; the deepest snapshot otherwise).

Two tiers: memory (`ram_bytes`, least recently used out first) in front of disk (`disk_bytes`, the
least recently used *leaves* out first: a record is evicted only once nothing hangs off it). With
`persist=False` the index and the records live in memory only. Records are files of
`kvmlx.artifact.blockfile` (0600 in a 0700 directory): written atomically, digests checked on the
first read of each file (the file's identity is then recorded, as the store does for artifacts),
a record that fails its check is moved to quarantine/ and its prefix recomputed. Published artifacts
are never touched here. `write_in_background()` (the serving engine) moves the file writes to one
thread (writer.py): a record is pending, in memory and found by this process's lookups, until its
file and index row are in place.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import blake3
import mlx.core as mx
import numpy as np

from ...artifact.blockfile import read_record, write_record
from ...artifact.format import canonical_json, fsync_dir
from ...artifact.identity import model_fingerprint, tokenizer_fingerprint
from ...caches import KVQuantization, load_layer, model_specs
from ...errors import ArtifactError, KvmlxError
from ..store.keys import kv_variant
from ..store.lock import StoreLock
from .index import CacheIndex, Row
from .layers import DEFAULT_BLOCK, base_part, join_layer, segment_arrays, snapshot_arrays
from .writer import RecordWriter, pending_under

HEADROOM = 256  # free slots after a restored prefix: the suffix's first appends do not re-allocate
RAM_FRACTION = 1 / 8  # default memory tier: of physical memory (docs/STORE.md says why)
DISK_FRACTION = 0.10  # default disk tier: of the free space where the store lives
DISK_CAP = 64 << 30
MAX_ATTEMPTS = 4
CUT_FAMILIES = ("kv", "quantized")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32, "uint32": mx.uint32}


class PrefixCacheError(KvmlxError):
    """The prefix cache cannot run here (an unsupported setup, or an unusable cache directory)."""


def default_ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * RAM_FRACTION)
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def default_disk_bytes(where: Path) -> int:
    try:
        return int(min(shutil.disk_usage(where).free * DISK_FRACTION, DISK_CAP))
    except OSError:
        return 1 << 30


@dataclass
class Restored:
    """A prompt's caches from the prefix cache: holding its first `tokens` tokens."""

    caches: list
    tokens: int
    by_tier: dict[str, int]  # tokens that came from "memory" and from "disk"
    records: int
    seconds: float

    @property
    def tiers(self) -> dict[str, int]:
        """`by_tier` without the tiers that supplied nothing."""
        return {k: v for k, v in self.by_tier.items() if v}


@dataclass
class Saved:
    tokens: int = 0  # new tokens written (segments)
    records: int = 0
    bytes: int = 0
    snapshot: bool = False
    seconds: float = 0.0


Base = tuple  # (published entry key, its number of tokens): the chain continues that entry


@dataclass
class _Hit:
    tokens: int
    chain: list[tuple[Row, int]]  # (segment, tokens of it used)
    snapshot: Row | None
    first: int = 0  # tokens the published base supplies


@dataclass
class _Mem:
    arrays: dict[str, mx.array]
    meta: dict
    nbytes: int


@dataclass
class Counters:
    lookups: int = 0
    hits: int = 0
    tokens_memory: int = 0
    tokens_disk: int = 0
    records_written: int = 0
    bytes_written: int = 0
    tokens_written: int = 0
    snapshots_written: int = 0
    evictions_memory: int = 0
    evictions_disk: int = 0
    bytes_evicted: int = 0
    quarantined: int = 0
    write_errors: int = 0
    write_seconds: float = 0.0
    restore_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class PrefixCache:
    """Block-addressed KV of every prefix this model computed, in memory and under `<root>/cache`."""

    def __init__(self, lm, root: str | os.PathLike, *, block: int = DEFAULT_BLOCK, ram_bytes: int | None = None,
                 disk_bytes: int | None = None, persist: bool = True, min_tokens: int | None = None,
                 kv_quant: KVQuantization | None = None):
        if lm.group is not None:
            raise PrefixCacheError("the prefix cache runs in one process only: under mlx.launch it is off "
                                   "(published artifacts are still reused)")
        if block < 1:
            raise PrefixCacheError("the cache block size must be positive")
        self.lm, self.block, self.kv_quant, self.persist = lm, block, kv_quant, persist
        specs = model_specs(lm.model)
        self.cut = [i for i, s in enumerate(specs) if s["family"] in CUT_FAMILIES]
        self.snap = [i for i, s in enumerate(specs) if s["family"] not in CUT_FAMILIES]
        self.num_layers = len(specs)
        self.min_tokens = block if min_tokens is None else max(1, min_tokens)
        self.root = Path(root) / "cache"
        self.dir = self.root / "records"
        self.staging = self.root / "tmp"
        self.quarantine = Path(root) / "quarantine"
        if persist:
            try:
                for d in (self.root, self.dir, self.staging):
                    d.mkdir(parents=True, exist_ok=True)
                    os.chmod(d, 0o700)
            except OSError as e:
                raise PrefixCacheError(f"cannot use {self.root} for the prefix cache: {e.strerror or e}") from None
        self.ram_bytes = default_ram_bytes() if ram_bytes is None else ram_bytes
        self.disk_bytes = (default_disk_bytes(self.root) if persist else 0) if disk_bytes is None else disk_bytes
        self.index = CacheIndex(self.root / "index.sqlite" if persist else None)
        if persist:
            os.chmod(self.root / "index.sqlite", 0o600)
        self._lock = StoreLock(self.root / "lock") if persist else None
        self.identity = blake3.blake3(canonical_json({
            "kvmlx_prefix_cache": 1, "model": model_fingerprint(lm), "tokenizer": tokenizer_fingerprint(lm),
            "kv": kv_variant(lm.dtype, kv_quant.to_json() if kv_quant else None), "block": block,
        })).hexdigest()
        self.mem: OrderedDict[str, _Mem] = OrderedDict()
        self.mem_bytes = 0
        self.counters = Counters()
        self.mutex = threading.RLock()
        self.writer: RecordWriter | None = None
        self.pending: dict[str, Row] = {}  # records in memory whose file the writer has not finished
        if persist and self.index.total_bytes() > self.disk_bytes:
            self.trim()  # a budget smaller than what an earlier run left: hold it from the start

    def write_in_background(self) -> None:
        """From now on write record files on a thread of their own (`flush` waits for them)."""
        if self.persist and self.writer is None:
            self.writer = RecordWriter()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record saved so far is on disk and indexed (True at once when writes are synchronous)."""
        return self.writer.flush(timeout) if self.writer is not None else True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.index.close()

    # ---- lookup and restore ---------------------------------------------------------------------

    def fetch(self, tokens: Sequence[int], *, limit: int | None = None, min_tokens: int = 1,
              headroom: int = HEADROOM, base: Base | None = None, base_caches: list | None = None) -> Restored | None:
        """Caches holding the longest cached prefix of `tokens[:limit]` (at least `min_tokens`), or None.

        With `base` (a published entry's key and length, whose caches `base_caches` hold its tokens), only
        prefixes that continue that entry are looked for, and the result is its KV followed by theirs.
        A record that disappeared meanwhile (evicted by another process) or fails its digest
        (quarantined) is left out and the lookup is tried again."""
        tokens = [int(t) for t in tokens[: len(tokens) if limit is None else limit]]
        with self.mutex:
            self.counters.lookups += 1
            excluded: set[str] = set()
            for _ in range(MAX_ATTEMPTS):
                hit = self._lookup(tokens, excluded, base)
                if hit is None or hit.tokens < min_tokens:
                    return None
                t0 = time.perf_counter()
                try:
                    caches, by_tier = self._restore(hit, headroom, base_caches)
                except _Unreadable as e:
                    excluded.add(e.key)
                    continue
                seconds = time.perf_counter() - t0
                self.index.touch([r.key for r, _ in hit.chain] + ([hit.snapshot.key] if hit.snapshot else []))
                c = self.counters
                c.hits += 1
                c.tokens_memory += by_tier["memory"]
                c.tokens_disk += by_tier["disk"]
                c.restore_seconds += seconds
                return Restored(caches, hit.tokens, by_tier, len(hit.chain) + bool(hit.snapshot), seconds)
        return None

    def match(self, tokens: Sequence[int], base: Base | None = None) -> int:
        """How many leading tokens of `tokens` a fetch would restore (0: none; with `base`, counting the
        published entry's own); reads no record."""
        with self.mutex:
            hit = self._lookup([int(t) for t in tokens], set(), base)
            return hit.tokens if hit else 0

    def chain_root(self, base: Base | None) -> str:
        """Where a chain starts: the identity's root, or the end of a published entry (its key)."""
        if base is None:
            return self.identity
        return blake3.blake3(b"kvmlx-published\0" + bytes.fromhex(self.identity) + base[0].encode()).hexdigest()

    def _walk(self, tokens: list[int], excluded: set[str], base: Base | None) -> list[tuple[Row, int]]:
        chain, parent, pos = [], self.chain_root(base), base[1] if base else 0
        if base is not None and len(tokens) < pos:
            return []
        while pos < len(tokens):
            best, best_m = None, 0
            for row in self.index.children(parent, pos) + pending_under(self.pending, {parent}, pos):
                if row.key in excluded:
                    continue
                m = _common(row.tokens, tokens, pos)
                if m > best_m:
                    best, best_m = row, m
            if best is None:
                break
            chain.append((best, best_m))
            parent, pos = best.key, pos + best_m
        return chain

    def _lookup(self, tokens: list[int], excluded: set[str], base: Base | None) -> _Hit | None:
        chain = self._walk(tokens, excluded, base)
        first = base[1] if base else 0
        pos = first + sum(m for _, m in chain)
        snapshot = None
        if self.snap:  # the deepest state snapshot along the matched chain
            ends = {r.key: (r.start, r.start + m) for r, m in chain}
            snaps = [s for s in self.index.snapshots(ends) + pending_under(self.pending, ends) if s.key not in excluded
                     and ends[s.parent][0] < s.start <= ends[s.parent][1]]
            snapshot = max(snaps, key=lambda s: s.start, default=None)
            pos = snapshot.start if snapshot else 0
        if self.kv_quant is not None and pos < self.kv_quant.start and \
                any(r.family == "quantized" and r.start < pos for r, _ in chain):
            pos = 0  # quantized KV cannot be taken back to full precision below `start`
        if pos <= first:
            return None
        cut, left = [], pos - first
        for r, m in chain:
            if left <= 0:
                break
            cut.append((r, min(m, left)))
            left -= min(m, left)
        return _Hit(pos, cut, snapshot, first)

    def _restore(self, hit: _Hit, headroom: int, base_caches: list | None) -> tuple[list, dict[str, int]]:
        by_tier = {"memory": 0, "disk": 0}
        parts = []
        if hit.first:
            if base_caches is None:
                raise KvmlxError("prefix cache: a continuation of a published entry needs that entry's caches")
            parts.append(base_part(base_caches, self.cut, hit.first))
        for row, used in hit.chain:
            mem, tier = self._arrays(row)
            by_tier[tier] += used
            parts.append((row.family, used, mem.arrays))
        caches: list = [None] * self.num_layers
        quant = self.kv_quant if self.kv_quant is not None and hit.tokens >= self.kv_quant.start else None
        for i in self.cut:
            caches[i] = join_layer(i, parts, hit.tokens, headroom, quant)
        if self.snap:
            mem, _ = self._arrays(hit.snapshot)
            for i in self.snap:
                caches[i] = load_layer(mem.meta[str(i)], lambda t, i=i: mem.arrays[f"{i}.{t}"][...])
        mx.eval([c.state for c in caches])
        return caches, by_tier

    def _arrays(self, row: Row) -> tuple[_Mem, str]:
        mem = self.mem.get(row.key)
        if mem is not None:
            self.mem.move_to_end(row.key)
            return mem, "memory"
        if not self.persist:
            raise _Unreadable(row.key)
        path = self._path(row.key)
        try:
            st = os.stat(path)
            known = row.verified == _file_id(st)
            rec = read_record(path, verify=not known)
            h = rec.header
            if h["key"] != row.key or h["identity"] != self.identity or h.get("root") != row.root \
                    or h["parent"] != row.parent \
                    or h["start"] != row.start or tuple(h["tokens"]) != row.tokens:
                raise ArtifactError(f"{path.name}: the record does not match its index row")
            if not known:
                self.index.set_verified(row.key, _file_id(os.stat(path)))
        except FileNotFoundError:
            raise _Unreadable(row.key) from None  # evicted meanwhile: a miss
        except (KvmlxError, OSError, ValueError, KeyError, TypeError) as e:
            self._quarantine(row.key, path, f"cache record failed to load: {e}")
            raise _Unreadable(row.key) from None
        arrays = {name: mx.array(rec.raw(name)).view(DTYPES[t.dtype]).reshape(t.shape) for name, t in rec.tensors.items()}
        mem = _Mem(arrays, h["layers"], sum(t.nbytes for t in rec.tensors.values()))
        self._remember(row.key, mem)
        return mem, "disk"

    # ---- saving ---------------------------------------------------------------------------------

    def save(self, tokens: Sequence[int], caches: list, *, snapshot: bool = True, base: Base | None = None) -> Saved:
        """Keep the KV of `tokens` held by `caches` (exactly those tokens): the segments not stored
        yet, and with `snapshot` the state of the layers that cannot be cut, at the end. With `base`
        (a published entry's key and length, a prefix of `tokens`), only what follows the entry is
        written, as its continuation: published KV is never stored twice."""
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        out = Saved()
        if n < self.min_tokens:
            return out
        for i in self.cut:
            if caches[i].offset != n:
                raise KvmlxError(f"prefix cache: layer {i} holds {caches[i].offset} tokens, not {n}")
        if base is not None and base[1] >= n:
            return out
        t0 = time.perf_counter()
        with self.mutex:
            chain = self._walk(tokens, set(), base)
            parent, pos = self.chain_root(base), base[1] if base else 0
            if chain:
                last, m = chain[-1]
                parent, pos = last.key, last.start + m
            protect = {r.key for r, _ in chain}
            try:
                while pos < n:
                    end = min(n, (pos // self.block + 1) * self.block)
                    key = _segment_key(parent, pos, tokens[pos:end])
                    family, header_layers, tensors = segment_arrays(caches, self.cut, pos, end)
                    row = Row(key, self.chain_root(base), parent, "segment", pos, end, tuple(tokens[pos:end]), family, 0)
                    nbytes = self._write(row, header_layers, tensors, protect)
                    if nbytes is not None:
                        out.records, out.bytes, out.tokens = out.records + 1, out.bytes + nbytes, out.tokens + end - pos
                    protect.add(key)
                    parent, pos = key, end
                if snapshot and self.snap:
                    key = _snapshot_key(parent, n)
                    if self.index.get(key) is None and key not in self.mem:
                        layers, tensors = snapshot_arrays(caches, self.snap)
                        row = Row(key, self.chain_root(base), parent, "snapshot", n, n, (), "state", 0)
                        nbytes = self._write(row, layers, tensors, protect)
                        if nbytes is not None:
                            out.bytes, out.records, out.snapshot = out.bytes + nbytes, out.records + 1, True
            except OSError as e:
                self.counters.write_errors += 1
                self.counters.extra["last_write_error"] = f"{e.strerror or e}"
            out.seconds = time.perf_counter() - t0
            c = self.counters
            c.records_written += out.records
            c.bytes_written += out.bytes
            c.tokens_written += out.tokens
            c.snapshots_written += out.snapshot
            c.write_seconds += out.seconds
        return out

    def _write(self, row: Row, layers: dict, tensors: dict[str, mx.array], protect: set[str]) -> int | None:
        """Keep one record (memory tier, and disk unless `persist` is off); the bytes written to disk, or
        None when the record was there already (another process wrote it): a record is never rewritten."""
        if row.key in self.pending or self.index.get(row.key) is not None:
            return None
        mx.eval(list(tensors.values()))
        mem = _Mem(tensors, layers, sum(x.nbytes for x in tensors.values()))
        nbytes = 0
        if self.persist:
            header = {"key": row.key, "identity": self.identity, "root": row.root, "parent": row.parent,
                      "kind": row.kind, "start": row.start, "tokens": list(row.tokens), "layers": layers,
                      "block": self.block}
            data = [(name, str(x.dtype).split(".")[-1], tuple(x.shape), memoryview(x)) for name, x in tensors.items()]
            if self.writer is not None:  # in memory and pending now; on disk when the writer gets to it
                self.pending[row.key] = Row(**{**row.__dict__, "file_bytes": mem.nbytes})
                self._remember(row.key, mem)
                self.writer.submit(lambda: self._write_file(row, header, data, mem.nbytes, set(protect)))
                return mem.nbytes
            nbytes = self._write_file(row, header, data, mem.nbytes, protect)
            if nbytes is None:
                return None
        else:
            row = Row(**{**row.__dict__, "file_bytes": mem.nbytes})
            self.index.insert(row)
        self._remember(row.key, mem)
        return nbytes

    def _write_file(self, row: Row, header: dict, data: list, nbytes: int, protect: set[str]) -> int | None:
        """Make room, write one record's file, index it: its bytes, or None if another process wrote it.
        The writer thread takes the locks (mutex, then the cache lock: the one order) only around the
        index work, not the file write (a racing eviction leaves an orphan `trim` drops); counts errors."""
        try:
            with self._lock if self.writer is None else nullcontext():
                with self.mutex, self._lock:
                    if self.index.get(row.key) is not None:
                        self.pending.pop(row.key, None)
                        return None
                    self._make_room(nbytes + 4096, protect | {r.parent for r in list(self.pending.values())})
                path = self._path(row.key)
                path.parent.mkdir(mode=0o700, exist_ok=True)
                written = write_record(path, header, data, self.staging)
                with self.mutex, self._lock:
                    self.index.insert(Row(**{**row.__dict__, "file_bytes": written, "verified": _file_id(os.stat(path))}))
                    if self.pending.pop(row.key, None) is not None:
                        self.counters.bytes_written += written - nbytes  # save() counted the tensors' bytes
            return written
        except OSError as e:
            if self.writer is None:
                raise
            with self.mutex:
                self.pending.pop(row.key, None)
                self.counters.write_errors += 1
                self.counters.extra["last_write_error"] = f"{e.strerror or e}"
            return None

    # ---- budgets --------------------------------------------------------------------------------

    def _remember(self, key: str, mem: _Mem) -> None:
        if key in self.mem:
            return
        self.mem[key] = mem
        self.mem_bytes += mem.nbytes
        while self.mem_bytes > self.ram_bytes and self.mem:
            if self.persist:  # disk keeps it: drop the least recently used from memory (not a pending one)
                old = next((k for k in self.mem if k not in self.pending), None)
                if old is None:
                    break
                m = self.mem.pop(old)
                self.mem_bytes -= m.nbytes
                self.counters.evictions_memory += 1
                continue
            leaves = [r for r in self.index.leaves(64) if r.key != key]
            if not leaves:
                break
            for r in leaves:  # memory only: the least recently used leaves go for good
                self.index.drop([r.key])
                m = self.mem.pop(r.key, None)
                if m is not None:
                    self.mem_bytes -= m.nbytes
                self.counters.evictions_memory += 1
                if self.mem_bytes <= self.ram_bytes:
                    break

    def _make_room(self, nbytes: int, protect: set[str]) -> None:
        """Under the cache lock: evict least recently used leaves until `nbytes` more fit the disk budget."""
        total = self.index.total_bytes()
        if total + nbytes > self.disk_bytes and nbytes > self.disk_bytes:
            raise OSError(f"a {nbytes}-byte record does not fit the prefix cache's disk budget ({self.disk_bytes})")
        while total + nbytes > self.disk_bytes:
            leaves = [r for r in self.index.leaves(64) if r.key not in protect]
            if not leaves:
                raise OSError("the prefix cache's disk budget is held by the prefix being written")
            for r in leaves:
                self._evict(r)
                total -= r.file_bytes
                if total + nbytes <= self.disk_bytes:
                    break

    def _evict(self, row: Row) -> None:
        self.index.drop([row.key])  # the row first: a reader then sees a miss, never a half-gone record
        self._path(row.key).unlink(missing_ok=True)
        m = self.mem.pop(row.key, None)
        if m is not None:
            self.mem_bytes -= m.nbytes
        self.counters.evictions_disk += 1
        self.counters.bytes_evicted += row.file_bytes

    def trim(self, disk_bytes: int | None = None) -> int:
        """Evict leaves until the disk tier holds at most `disk_bytes` (default: its budget), and drop
        records whose parent is gone (an eviction raced a write). Returns the bytes freed."""
        if not self.persist:
            return 0
        before = self.index.total_bytes()
        with self.mutex, self._lock:
            saved = self.disk_bytes
            self.disk_bytes = saved if disk_bytes is None else disk_bytes
            try:
                self._make_room(0, set())
            except OSError:
                pass
            finally:
                self.disk_bytes = saved
            for key in self.index.orphans():
                row = self.index.get(key)
                if row is not None:
                    self._evict(row)
        return before - self.index.total_bytes()

    # ---- upkeep ---------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.kvblk"

    def _quarantine(self, key: str, path: Path, reason: str) -> None:
        self.index.drop([key])
        self.mem.pop(key, None)
        self.counters.quarantined += 1
        try:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            os.chmod(self.quarantine, 0o700)
            dest = self.quarantine / f"cache-{key}.kvblk"
            os.replace(path, dest)
            (self.quarantine / f"cache-{key}.reason.txt").write_text(reason + "\n")
            fsync_dir(path.parent)
        except OSError:
            path.unlink(missing_ok=True)

    def stats(self) -> dict:
        with self.mutex:
            c = self.counters
            totals = self.index.totals()
            return {
                "block": self.block, "persist": self.persist, "min_tokens": self.min_tokens,
                "ram_budget_bytes": self.ram_bytes, "disk_budget_bytes": self.disk_bytes if self.persist else 0,
                "ram_bytes": self.mem_bytes, "ram_records": len(self.mem),
                "disk_bytes": totals["bytes"] if self.persist else 0, "records": totals["records"],
                "lookups": c.lookups, "hits": c.hits,
                "tokens_reused": {"memory": c.tokens_memory, "disk": c.tokens_disk},
                "records_written": c.records_written, "bytes_written": c.bytes_written,
                "tokens_written": c.tokens_written, "snapshots_written": c.snapshots_written,
                "evictions": {"memory": c.evictions_memory, "disk": c.evictions_disk}, "bytes_evicted": c.bytes_evicted,
                "quarantined": c.quarantined, "write_errors": c.write_errors, "pending_records": len(self.pending),
                "write_seconds": c.write_seconds, "restore_seconds": c.restore_seconds,
            }


class _Unreadable(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _common(row_tokens: tuple[int, ...], tokens: list[int], pos: int) -> int:
    n = min(len(row_tokens), len(tokens) - pos)
    a = np.asarray(row_tokens[:n], dtype=np.int64)
    b = np.asarray(tokens[pos : pos + n], dtype=np.int64)
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else n


def _segment_key(parent: str, start: int, tokens: Sequence[int]) -> str:
    h = blake3.blake3(b"kvmlx-segment\0" + bytes.fromhex(parent) + int(start).to_bytes(8, "little"))
    h.update(np.asarray(tokens, dtype="<u4").tobytes())
    return h.hexdigest()


def _snapshot_key(parent: str, position: int) -> str:
    return blake3.blake3(b"kvmlx-snapshot\0" + bytes.fromhex(parent) + int(position).to_bytes(8, "little")).hexdigest()


def _file_id(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
