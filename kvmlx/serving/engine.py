"""The serving engine: the resident pool of published KV and the worker thread that runs every
request's model work, answering each from the longest published KV in a store.

How a request is served (the agent runtime's rules, `kvmlx.runtime.agent.Agent.caches_for`): the prompt's
token ids (completions: `tokenizer.encode`, as publish does; chat: the model's chat template, as
`kvmlx.runtime.agent.chat_prompt_tokens` renders it) are looked up in the store; the matching artifact is
loaded once into a resident pool (LRU under `max_resident_bytes`) and each request gets its own
caches for its reuse length from `kvmlx.runtime.restore.caches_at`: new cache objects over *slices*
of the shared arrays (MLX arrays are immutable values: the request's first append makes its own
buffer, the shared one is never written), from a state checkpoint where the caches cannot be trimmed. Only the
rest of the prompt is prefilled, in the artifact's chunk size. Decoding is greedy unless a positive
`temperature` is given.

All model work runs on one worker thread (MLX evaluation is not thread-safe); it interleaves the
active requests token by token, so several clients progress together. The HTTP layer (openai.py)
only waits on per-request queues. A client that disconnects cancels its job. Also here: the
counters behind `/v1/kvmlx/stats` and their Prometheus rendering.
"""


from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..caches import KVQuantization
from ..caches.quantized import apply as apply_quantization
from ..models import LoadedModel
from ..runtime.agent import MAX_LOAD_ATTEMPTS, Agent
from ..runtime.load import LoadedKV
from ..runtime.publish import DEFAULT_CHUNK, prefill
from ..runtime.restore import caches_at, compact, loaded_nbytes
from ..runtime.store import BLOCK, Store

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default



# ---- the resident pool ------------------------------------------------------------------------


@dataclass
class ResidentKV:
    """One published document's caches (and state checkpoints), loaded once and shared (read-only) by
    every request using it."""

    key: str
    tokens: list[int]
    loaded: LoadedKV  # compacted: exactly the document, no load headroom
    logits: mx.array  # the stored logits row after the document's last token
    chunk_size: int
    nbytes: int
    load_seconds: float

    def caches(self, reuse: int) -> list:
        """Fresh per-request caches holding the first `reuse` tokens (`kvmlx.runtime.restore.caches_at`):
        new cache and array objects over the shared arrays, so a request's appends never reach them."""
        return caches_at(self.loaded, reuse)


def resident_from_loaded(key: str, loaded, chunk_size: int) -> ResidentKV:
    """Trim a loaded artifact's caches to the document (dropping load headroom) and evaluate them."""
    loaded = compact(loaded)
    return ResidentKV(key, list(loaded.tokens), loaded, loaded.logits, chunk_size, loaded_nbytes(loaded),
                      loaded.load_seconds)


class KVPool:
    """Loaded documents by store key, least recently used first out once over `max_bytes` (None: no limit)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, ResidentKV] = OrderedDict()
        self.evictions: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.items.values())

    def get(self, key: str) -> ResidentKV | None:
        r = self.items.get(key)
        if r is not None:
            self.items.move_to_end(key)
        return r

    def put(self, r: ResidentKV) -> None:
        """Keep `r` (most recent) and evict older entries over budget; a document larger than the whole
        budget is not kept (the request holding it still uses it)."""
        self.items[r.key] = r
        self.items.move_to_end(r.key)
        while self.max_bytes is not None and self.nbytes > self.max_bytes and self.items:
            old, _ = self.items.popitem(last=False)
            self.evictions[old] = self.evictions.get(old, 0) + 1

    def discard(self, key: str) -> None:
        self.items.pop(key, None)


# ---- jobs and the engine ----------------------------------------------------------------------


@dataclass
class Params:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Job:
    """One request's work, run on the engine thread. `emit(kind, payload)` is called from that thread."""

    tokens: list[int]
    params: Params
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


@dataclass
class DocStats:
    num_tokens: int
    loads: int = 0
    requests: int = 0
    tokens_saved: int = 0
    load_seconds: float = 0.0


class Engine:
    """Owns the model, the store and the resident KV; runs every job on one worker thread."""

    def __init__(self, lm: LoadedModel, store: Store | None = None, *, max_resident_bytes: int | None = None,
                 min_reuse_tokens: int = BLOCK, verify_digests: bool = True, allow_lossy: bool = False,
                 kv_quant: KVQuantization | None = None):
        self.lm = lm
        self.agent = Agent(lm, store, min_reuse_tokens=min_reuse_tokens, verify_digests=verify_digests,
                           allow_lossy=allow_lossy, kv_quant=kv_quant)
        self.store = self.agent.store
        self.pool = KVPool(max_resident_bytes)
        self.eos = set(lm.tokenizer.eos_token_ids)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active: list[tuple[Job, Iterator[int]]] = []
        self.docs: dict[str, DocStats] = {}
        self.totals = dict(requests=0, completed=0, cancelled=0, errors=0, prompt_tokens=0, cached_tokens=0,
                           prefilled_tokens=0, completion_tokens=0)
        self.prefill_seconds = 0.0
        self.started = time.time()
        self._lock = threading.Lock()  # guards the counters read by the HTTP thread
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="kvmlx-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._lock:
            self.totals["requests"] += 1
        self.jobs.put(job)

    def _loop(self) -> None:
        _ = self.agent.identity  # fingerprint the model on the engine thread, before any request
        while self._take_jobs():
            self._step_all()

    def _take_jobs(self) -> bool:
        """Move queued jobs into `active`, blocking only when idle; False once told to stop."""
        try:
            while True:
                job = self.jobs.get(block=not self.active)
                if job is None:
                    return False
                self.active.append((job, self._run(job)))
        except queue.Empty:
            pass
        return True

    def _step_all(self) -> None:
        """One step of every active job, round robin."""
        for item in list(self.active):
            job, gen = item
            if job.cancelled.is_set():
                gen.close()
                self.active.remove(item)
                with self._lock:
                    self.totals["cancelled"] += 1
                continue
            try:
                next(gen)
            except StopIteration:
                self.active.remove(item)
                with self._lock:
                    self.totals["completed"] += 1
            except Exception as e:  # a failed request must not stop the engine
                self.active.remove(item)
                with self._lock:
                    self.totals["errors"] += 1
                job.emit("error", f"{type(e).__name__}: {e}")

    # -- one request --

    def prepare(self, tokens: list[int]):
        """(caches, suffix, reused, key, logits or None, chunk size): the agent runtime's matching rules."""
        n = len(tokens)
        excluded: list[str] = []
        agent = self.agent
        for _ in range(MAX_LOAD_ATTEMPTS):
            match = agent.match(tokens, excluded)
            if match is None:
                break
            entry, _, reuse = match
            resident = self.pool.get(entry.key)
            if resident is None:
                # the shared copy must be complete before requests slice it: never the overlap path
                loaded = agent.load_entry(entry, tokens, reuse, all_checkpoints=True,
                                          load_path="copy" if agent.load_path == "overlap" else None)
                if loaded is None:
                    excluded.append(entry.key)
                    continue
                self.store.record_verified_load(entry.key, loaded)
                resident = resident_from_loaded(entry.key, loaded, entry.chunk_size)
                self.pool.put(resident)
                with self._lock:
                    d = self.docs.setdefault(entry.key, DocStats(len(resident.tokens)))
                    d.loads += 1
                    d.load_seconds += resident.load_seconds
            self.store.touch(entry.key)
            logits = resident.logits if reuse == n else None
            return resident.caches(reuse), tokens[reuse:], reuse, entry.key, logits, resident.chunk_size
        return make_prompt_cache(self.lm.model), tokens, 0, None, None, DEFAULT_CHUNK

    def _run(self, job: Job) -> Iterator[None]:
        """A generator the engine steps: prefill on the first step, then one token per step."""
        tokens, p = job.tokens, job.params
        caches, suffix, reused, key, logits, chunk = self.prepare(tokens)
        if suffix:
            t0 = time.perf_counter()
            logits = prefill(self.lm.model, suffix, caches, chunk, quant=self.agent.kv_quant)
            mx.eval(logits)
            dt = time.perf_counter() - t0
        else:
            dt = 0.0
        with self._lock:
            self.totals["prompt_tokens"] += len(tokens)
            self.totals["cached_tokens"] += reused
            self.totals["prefilled_tokens"] += len(suffix)
            self.prefill_seconds += dt
            if key is not None:
                d = self.docs.setdefault(key, DocStats(reused))
                d.requests += 1
                d.tokens_saved += reused
        job.emit("start", {"prompt_tokens": len(tokens), "cached_tokens": reused, "prefilled_tokens": len(suffix),
                           "key": key, "chunk_size": chunk})
        yield
        rng = mx.random.key(p.seed) if p.seed is not None else None
        count = 0
        while True:
            if p.temperature > 0:
                if rng is not None:
                    rng, sub = mx.random.split(rng)
                    token = int(mx.random.categorical(logits.astype(mx.float32) / p.temperature, key=sub).item())
                else:
                    token = int(mx.random.categorical(logits.astype(mx.float32) / p.temperature).item())
            else:
                token = int(mx.argmax(logits).item())
            count += 1
            with self._lock:
                self.totals["completion_tokens"] += 1
            job.emit("token", token)
            if token in self.eos and not p.ignore_eos:
                job.emit("done", "stop")
                return
            if count >= p.max_tokens:
                job.emit("done", "length")
                return
            yield
            if job.cancelled.is_set():
                return
            logits = self.lm.model(mx.array([[token]]), cache=caches)[0, -1]
            apply_quantization(self.agent.kv_quant, caches)

    # -- counters --

    def stats(self) -> dict:
        with self._lock:
            totals = dict(self.totals)
            prefill_s, prefilled = self.prefill_seconds, totals["prefilled_tokens"]
            docs = {k: DocStats(**vars(d)) for k, d in self.docs.items()}
            active = len(self.active)
        speed = prefilled / prefill_s if prefill_s > 0 and prefilled else None
        resident = dict(self.pool.items)
        documents = []
        for key, d in docs.items():
            r = resident.get(key)
            documents.append({
                "key": key, "num_tokens": d.num_tokens, "loads": d.loads, "requests": d.requests,
                "tokens_saved": d.tokens_saved,
                "compute_seconds_saved": d.tokens_saved / speed if speed else None,
                "load_seconds": d.load_seconds, "resident": r is not None, "resident_bytes": r.nbytes if r else 0,
                "evictions": self.pool.evictions.get(key, 0),
            })
        return {
            "model": self.lm.model_id, "uptime_seconds": time.time() - self.started, "active_requests": active,
            **totals, "prefill_seconds": prefill_s, "prefill_tokens_per_second": speed,
            "compute_seconds_saved": (totals["cached_tokens"] / speed) if speed else None,
            "resident_bytes": sum(r.nbytes for r in resident.values()), "resident_documents": len(resident),
            "max_resident_bytes": self.pool.max_bytes, "documents": documents,
        }


def prometheus(stats: dict) -> str:
    """The stats as Prometheus text exposition (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float | None]]) -> None:
        lines.append(f"# HELP kvmlx_{name} {help_}")
        lines.append(f"# TYPE kvmlx_{name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"kvmlx_{name}{{{lab}}} {value}" if lab else f"kvmlx_{name} {value}")

    for name, help_ in [("requests", "Requests received."), ("completed", "Requests completed."),
                        ("cancelled", "Requests stopped early (client disconnected, or a stop string matched)."), ("errors", "Requests failed."),
                        ("prompt_tokens", "Prompt tokens."), ("cached_tokens", "Prompt tokens served from published KV."),
                        ("prefilled_tokens", "Prompt tokens prefilled."), ("completion_tokens", "Tokens generated.")]:
        metric(f"{name}_total", "counter", help_, [({}, stats[name])])
    metric("prefill_seconds_total", "counter", "Seconds spent prefilling.", [({}, stats["prefill_seconds"])])
    metric("active_requests", "gauge", "Requests in progress.", [({}, stats["active_requests"])])
    metric("resident_bytes", "gauge", "Bytes of published KV held in memory.", [({}, stats["resident_bytes"])])
    docs = stats["documents"]
    lab = [{"key": d["key"]} for d in docs]
    metric("document_loads_total", "counter", "Loads of a published document.", [(l, d["loads"]) for l, d in zip(lab, docs)])
    metric("document_requests_total", "counter", "Requests reusing a published document.",
           [(l, d["requests"]) for l, d in zip(lab, docs)])
    metric("document_tokens_saved_total", "counter", "Prompt tokens not prefilled thanks to a published document.",
           [(l, d["tokens_saved"]) for l, d in zip(lab, docs)])
    metric("document_compute_seconds_saved", "gauge", "Prefill seconds saved (estimated from measured prefill speed).",
           [(l, d["compute_seconds_saved"]) for l, d in zip(lab, docs)])
    metric("document_resident", "gauge", "1 while the document's KV is in memory.",
           [(l, int(d["resident"])) for l, d in zip(lab, docs)])
    return "\n".join(lines) + "\n"
