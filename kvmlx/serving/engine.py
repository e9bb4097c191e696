"""An OpenAI-compatible HTTP server that answers every request from the longest published KV in a store.

    kvmlx serve --model builtin:tiny --store ~/.cache/kvmlx/store --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="kvmlx", prompt=paper_text + "\\n\\nQuestion: ...", max_tokens=64)

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`"stream": true` as server-sent events), `GET /v1/kvmlx/stats` (JSON counters) and `GET /metrics`
(the same counters as Prometheus text). docs/SERVER.md has the design.

How a request is served (the agent runtime's rules, `kvmlx.runtime.agent.Agent.caches_for`): the prompt's
token ids (completions: `tokenizer.encode`, as publish does; chat: the model's chat template, as
`kvmlx.runtime.agent.chat_prompt_tokens` renders it) are looked up in the store; the matching artifact is
loaded once into a resident pool (LRU under `max_resident_bytes`) and each request gets its own
`KVCache` objects whose keys/values are *slices* of the shared arrays (MLX arrays are immutable
values: the request's first append makes its own buffer, the shared one is never written). Only the
rest of the prompt is prefilled, in the artifact's chunk size. Decoding is greedy unless a positive
`temperature` is given.

All model work runs on one worker thread (MLX evaluation is not thread-safe); it interleaves the
active requests token by token, so several clients progress together. The HTTP layer (Starlette on
uvicorn) is async and only waits on per-request queues. A client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..runtime.agent import MAX_LOAD_ATTEMPTS, Agent, ChatTemplateError, _render
from ..models import LoadedModel
from ..runtime.publish import DEFAULT_CHUNK, prefill
from ..runtime.store import BLOCK, Store

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_TOKENS_LIMIT = 32768


# ---- the resident pool ------------------------------------------------------------------------


@dataclass
class ResidentKV:
    """One published document's KV, loaded once and shared (read-only) by every request using it."""

    key: str
    tokens: list[int]
    keys: list[mx.array]  # per layer [1, heads, n, head_dim]: exactly the document, no headroom
    values: list[mx.array]
    logits: mx.array  # the stored logits row after the document's last token
    chunk_size: int
    nbytes: int
    load_seconds: float

    def caches(self, reuse: int) -> list[KVCache]:
        """Fresh per-request caches holding the first `reuse` tokens: copy-on-write views of the shared KV.

        Each cache gets new array objects (slices), so mlx-lm's in-place `cache.keys[...] = x` rebinds
        the request's own array and can never reach the shared one; the slice is exactly `reuse` long,
        so the first append allocates the request's own buffer (one device copy of the prefix).
        """
        out = []
        for k, v in zip(self.keys, self.values):
            c = KVCache()
            c.keys, c.values, c.offset = k[..., :reuse, :], v[..., :reuse, :], reuse
            out.append(c)
        return out


def resident_from_loaded(key: str, loaded, chunk_size: int) -> ResidentKV:
    """Trim a loaded artifact's caches to the document (dropping load headroom) and evaluate them."""
    loaded.wait()
    n = len(loaded.tokens)
    keys = [mx.contiguous(c.keys[..., :n, :]) for c in loaded.caches]
    values = [mx.contiguous(c.values[..., :n, :]) for c in loaded.caches]
    mx.eval(keys, values, loaded.logits)
    nbytes = sum(a.nbytes for a in keys) + sum(a.nbytes for a in values) + loaded.logits.nbytes
    return ResidentKV(key, list(loaded.tokens), keys, values, loaded.logits, chunk_size, nbytes, loaded.load_seconds)


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
                 min_reuse_tokens: int = BLOCK, verify_digests: bool = True, allow_lossy: bool = False):
        self.lm = lm
        self.agent = Agent(lm, store, min_reuse_tokens=min_reuse_tokens, verify_digests=verify_digests,
                           allow_lossy=allow_lossy)
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
        while True:
            # take new jobs (block only when idle)
            try:
                while True:
                    job = self.jobs.get(block=not self.active)
                    if job is None:
                        return
                    self.active.append((job, self._run(job)))
            except queue.Empty:
                pass
            for item in list(self.active):  # one step of every active job, round robin
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
                loaded = agent.load_entry(entry, tokens, reuse,
                                          load_path="copy" if agent.load_path == "overlap" else None)
                if loaded is None:
                    excluded.append(entry.key)
                    continue
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
            logits = prefill(self.lm.model, suffix, caches, chunk)
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


# ---- HTTP -------------------------------------------------------------------------------------


class BadRequest(Exception):
    pass


def _params(body: dict) -> Params:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}]")
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else float(temperature)
    if temperature < 0:
        raise BadRequest("temperature must be >= 0")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n=1 is supported")
    seed = body.get("seed")
    return Params(max_tokens, temperature, None if seed is None else int(seed), bool(body.get("ignore_eos", False)))


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise BadRequest("stop must be a string or up to 4 strings")
    return [s for s in stops if s]


def _content(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                parts.append(p.get("text", ""))
            else:
                raise BadRequest("only text content parts are supported")
        return "".join(parts)
    raise BadRequest("message content must be a string or a list of text parts")


class Server:
    """The Starlette app around an Engine."""

    def __init__(self, engine: Engine, model_name: str | None = None):
        self.engine = engine
        self.lm = engine.lm
        self.model_name = model_name or engine.lm.model_id
        self.created = int(time.time())
        self.app = self._app()

    def _app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/kvmlx/stats", self.stats, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    # -- simple endpoints --

    async def health(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"status": "ok"})

    async def models(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kvmlx"}]})

    async def stats(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse(self.engine.stats())

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse
        return PlainTextResponse(prometheus(self.engine.stats()), media_type="text/plain; version=0.0.4")

    # -- generation --

    @staticmethod
    def _error(status: int, message: str, kind: str = "invalid_request_error"):
        from starlette.responses import JSONResponse
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)

    async def completions(self, request):
        try:
            body = await request.json()
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                tokens = list(self.lm.tokenizer.encode(prompt))
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                tokens = [int(t) for t in prompt]
                vocab = self.lm.config.get("vocab_size")
                if isinstance(vocab, int) and any(not 0 <= t < vocab for t in tokens):
                    raise BadRequest("prompt token id outside the vocabulary")
            else:
                raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt per request)")
            if not tokens:
                raise BadRequest("the prompt is empty")
            params, stops = _params(body), _stops(body)
        except (BadRequest, ValueError, TypeError) as e:
            return self._error(400, str(e))
        return await self._respond(request, body, tokens, params, stops, chat=False)

    async def chat(self, request):
        try:
            body = await request.json()
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages must be a non-empty list")
            msgs = []
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise BadRequest("each message needs a role")
                msgs.append({"role": m["role"], "content": _content(m.get("content"))})
            try:
                tokens = _render(self.lm, msgs)
            except ChatTemplateError as e:
                raise BadRequest(str(e))
            params, stops = _params(body), _stops(body)
        except (BadRequest, ValueError, TypeError) as e:
            return self._error(400, str(e))
        return await self._respond(request, body, tokens, params, stops, chat=True)

    async def _respond(self, request, body: dict, tokens: list[int], params: Params, stops: list[str], chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(tokens, params, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        out = _Output(self.lm.tokenizer, self.engine.eos, stops)
        self.engine.submit(job)

        if not body.get("stream"):
            try:
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(events.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancelled.set()
                            return self._error(499, "client disconnected")
                        continue
                    if kind == "error":
                        return self._error(500, payload, "server_error")
                    if out.feed(kind, payload):
                        job.cancelled.set()  # a stop string: stop generating
                        break
                    if kind == "done":
                        break
            except BaseException:
                job.cancelled.set()
                raise
            text = out.final_text()
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": out.finish,
                       "logprobs": None} if chat else
                      {"index": 0, "text": text, "finish_reason": out.finish, "logprobs": None})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                 "choices": [choice], "usage": out.usage(), "kvmlx": out.extension()})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False, **extra) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                if first:
                    d = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                          "model": self.model_name, "choices": [choice], **extra}) + "\n\n"

        async def stream():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    kind, payload = await events.get()
                    if kind == "error":
                        yield "data: " + json.dumps({"error": {"message": payload, "type": "server_error"}}) + "\n\n"
                        return
                    stopped = out.feed(kind, payload)
                    if stopped:
                        job.cancelled.set()
                    delta = out.pending(final=stopped or kind == "done")
                    if stopped or kind == "done":
                        extra = {"kvmlx": out.extension()}
                        if not include_usage:
                            extra["usage"] = out.usage()
                        yield chunk(delta, out.finish, **extra)
                        if include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                                         "model": self.model_name, "choices": [],
                                                         "usage": out.usage()}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if delta:
                        yield chunk(delta, None)
            finally:  # normal end, or the client went away (Starlette cancels the stream)
                job.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Output:
    """Collects one request's tokens; text, stop strings, usage and the `kvmlx` extension field."""

    def __init__(self, tokenizer, eos: set[int], stops: list[str]):
        self.tokenizer, self.eos, self.stops = tokenizer, eos, stops
        self.tokens: list[int] = []
        self.info: dict = {}
        self.finish: str | None = None
        self.sent = 0  # characters already streamed
        self.cut: int | None = None  # text length after a stop string was found

    def text(self) -> str:
        ids = [t for t in self.tokens if t not in self.eos]
        text = self.tokenizer.decode(ids) if ids else ""
        return text[: self.cut] if self.cut is not None else text

    def feed(self, kind: str, payload) -> bool:
        """Take one engine event; True when a stop string ended the output."""
        if kind == "start":
            self.info = payload
        elif kind == "token":
            self.tokens.append(payload)
            if self.stops:
                text = self.text()
                hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
                if hits:
                    self.cut, self.finish = min(hits), "stop"
                    return True
        elif kind == "done":
            self.finish = payload
        return False

    def pending(self, final: bool = False) -> str:
        """New text to stream (held back while it may still be a stop string or a partial character)."""
        text = self.text()
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            if self.stops:
                end = min(end, len(text) - (max(len(s) for s in self.stops) - 1))
        end = max(end, self.sent)
        delta, self.sent = text[self.sent:end], end
        return delta

    def final_text(self) -> str:
        return self.text()

    def usage(self) -> dict:
        prompt = self.info.get("prompt_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": len(self.tokens), "total_tokens": prompt + len(self.tokens),
                "prompt_tokens_details": {"cached_tokens": self.info.get("cached_tokens", 0)}}

    def extension(self) -> dict:
        return {"tokens": list(self.tokens), **self.info}


# ---- entry point ------------------------------------------------------------------------------


def serve(lm: LoadedModel, store: Store | str | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_resident_bytes: int | None = None, min_reuse_tokens: int = BLOCK, verify_digests: bool = True,
          allow_lossy: bool = False, model_name: str | None = None, log_level: str = "warning",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run the server until interrupted (uvicorn; one engine thread does all model work)."""
    import uvicorn

    engine = Engine(lm, store, max_resident_bytes=max_resident_bytes, min_reuse_tokens=min_reuse_tokens,
                    verify_digests=verify_digests, allow_lossy=allow_lossy).start()
    server = Server(engine, model_name)
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, lifespan="off")
    userver = uvicorn.Server(config)
    if on_ready is not None:
        orig = userver.startup

        async def startup(sockets=None):
            await orig(sockets=sockets)
            on_ready(f"http://{host}:{port}/v1")

        userver.startup = startup
    try:
        userver.run()
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m kvmlx.serving.engine`: the same options as `kvmlx serve`."""
    import argparse
    import sys

    from ..models import load_model
    from ..runtime.store import parse_size

    ap = argparse.ArgumentParser(prog="python -m kvmlx.serving.engine", description=__doc__.split("\n")[0])
    ap.add_argument("--model", "-m", default=None)
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--store", default=None)
    ap.add_argument("--host", default=DEFAULT_HOST)
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--max-resident-bytes", default=None)
    ap.add_argument("--min-reuse-tokens", type=int, default=BLOCK)
    ap.add_argument("--allow-lossy", action="store_true")
    ap.add_argument("--no-verify-digests", action="store_true")
    a = ap.parse_args(argv)
    lm = load_model(a.model, a.dtype)
    serve(lm, Store(a.store), host=a.host, port=a.port,
          max_resident_bytes=parse_size(a.max_resident_bytes) if a.max_resident_bytes else None,
          min_reuse_tokens=a.min_reuse_tokens, verify_digests=not a.no_verify_digests, allow_lossy=a.allow_lossy,
          on_ready=lambda url: print(f"kvmlx serve: {lm.model_id} at {url}", file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
