"""The OpenAI-compatible HTTP layer over the engine: `/v1/models`, `/v1/completions`,
`/v1/chat/completions` (both with `"stream": true` as server-sent events), `/v1/kvmlx/stats` (JSON
counters) and `/metrics` (Prometheus text); OpenAI-shaped errors (the checks themselves are in
requests.py), the model name and its aliases (an unknown `model` is 404 `model_not_found`, as vLLM
answers), 429 + Retry-After when the engine's queue is full, logprobs in OpenAI's shapes; `serve()`,
which runs it on uvicorn with one engine (engine.py). docs/SERVER.md has the design.

    kvmlx serve --model builtin:tiny --store ~/.cache/kvmlx/store --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="builtin:tiny", prompt=paper_text + "\\n\\nQuestion: ...", max_tokens=64)
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable, Sequence

from ..errors import KvmlxError
from ..models import LoadedModel
from ..runtime.agent import ChatTemplateError, _render
from ..runtime.blend import BlendSettings
from ..runtime.blend import check_model as check_blend
from ..runtime.store import BLOCK, Store
from . import requests as req
from .engine import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUED,
    DEFAULT_REQUEST_TIMEOUT,
    Engine,
    Job,
    QueueFull,
)
from .metrics import prometheus
from .requests import BadRequest, parse_body
from .sampling import Params

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 32k-token prompt is ~150 KB of text, ~250 KB of token ids


def context_length(lm: LoadedModel) -> int | None:
    """The model's context length from its config (None when it names none)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = lm.config.get(name)
        if isinstance(v, int) and v > 0:
            return v
    return None


class Server:
    """The Starlette app around an Engine."""

    def __init__(self, engine: Engine, model_name: str | None = None, *, aliases: Sequence[str] = (),
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
                 blend: BlendSettings | None = None):
        self.engine = engine
        self.blend = blend  # `--blend`: the default of requests that say nothing (None: exact reuse only)
        self._blend_refusal: str | None = None  # why this model cannot blend, once checked
        self.lm = engine.lm
        self.model_name = model_name or engine.lm.model_id
        self.names = [self.model_name] + [a for a in aliases if a != self.model_name]
        self.max_body_bytes = max_body_bytes
        self.max_prompt_tokens = max_prompt_tokens or context_length(self.lm)
        vocab = self.lm.config.get("vocab_size")
        self.vocab_size = vocab if isinstance(vocab, int) else None
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
            {"id": name, "object": "model", "created": self.created, "owned_by": "kvmlx"} for name in self.names]})

    async def stats(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse(self.engine.stats())

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse
        return PlainTextResponse(prometheus(self.engine.stats()), media_type="text/plain; version=0.0.4")

    # -- generation --

    @staticmethod
    def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict | None = None):
        from starlette.responses import JSONResponse
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status, headers=headers)

    async def _body(self, request) -> dict:
        """The body, read up to `max_body_bytes`, parsed and checked to be a JSON object."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BadRequest(f"the body is larger than {self.max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body_bytes:
                raise BadRequest(f"the body is larger than {self.max_body_bytes} bytes", code="request_too_large")
        body = parse_body(bytes(raw))
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise BadRequest("model must be a string", "model")
            if model not in self.names:
                raise BadRequest(f"the model {model[:200]!r} does not exist; this server serves "
                                 + ", ".join(repr(n) for n in self.names), "model", "model_not_found", 404)
        return body

    def _check_length(self, tokens: list[int], param: str) -> None:
        if self.max_prompt_tokens is not None and len(tokens) > self.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(tokens)} tokens; this server takes at most "
                             f"{self.max_prompt_tokens}", param, "context_length_exceeded")

    async def completions(self, request):
        return await self._handle(request, chat=False, param="prompt",
                                  tokenize=lambda body: req.prompt_tokens(body, self.lm.tokenizer, self.vocab_size))

    async def chat(self, request):
        return await self._handle(request, chat=True, param="messages", tokenize=self._chat_tokens)

    def _chat_tokens(self, body: dict) -> list[int]:
        msgs = req.messages(body)
        try:
            return _render(self.lm, msgs)
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages")
        except Exception as e:  # a template that raises on this conversation (e.g. roles out of order)
            raise BadRequest(f"the chat template cannot render these messages: {str(e)[:200]}", "messages")

    async def _handle(self, request, *, chat: bool, param: str, tokenize: Callable[[dict], list[int]]):
        """Read, check and tokenize a request (counted as arriving meanwhile: `Engine.arrival`), then answer it."""
        with self.engine.arrival() as arrived:
            try:
                body = await self._body(request)
                tokens = tokenize(body)
                self._check_length(tokens, param)
                params, stops = req.params(body, self.vocab_size, chat=chat), req.stops(body)
                blend = self._blend(body)
            except BadRequest as e:
                return self._error(e.status, str(e), param=e.param, code=e.code)
            return await self._respond(request, body, tokens, params, stops, chat=chat, blend=blend,
                                       arrived=arrived)

    def _blend(self, body: dict) -> BlendSettings | None:
        """The request's blend settings (its `blend` field, else the server's default), or a 400 naming
        the field when this model or this server cannot blend."""
        blend = req.blend(body, self.blend)
        if blend is None:
            return None
        if self.lm.group is not None:
            raise BadRequest("blend runs in one process only (this server runs under mlx.launch)", "blend")
        if self._blend_refusal is None:
            try:
                check_blend(self.lm, self.engine.agent.kv_quant)
                self._blend_refusal = ""
            except KvmlxError as e:
                self._blend_refusal = str(e)
        if self._blend_refusal:
            raise BadRequest(self._blend_refusal, "blend")
        return blend

    async def _respond(self, request, body: dict, tokens: list[int], params: Params, stops: list[str], chat: bool,
                       blend: BlendSettings | None, arrived: Callable[[], None]):
        from starlette.responses import JSONResponse, StreamingResponse

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(tokens, params, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
                  blend=blend)
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        out = _Output(self.lm.tokenizer, self.engine.eos, stops)
        arrived()  # before it is queued: an idle engine taking it must not wait for it as still arriving
        try:
            self.engine.submit(job)
        except QueueFull as e:
            return self._error(429, str(e), "rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(e.retry_after)})

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
                    if kind == "timeout":
                        return self._error(503, payload, "timeout_error", code="deadline_exceeded",
                                           headers={"Retry-After": "1"})
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
            lp = out.logprobs(chat) if params.logprobs else None
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": out.finish,
                       "logprobs": lp} if chat else
                      {"index": 0, "text": text, "finish_reason": out.finish, "logprobs": lp})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                 "choices": [choice], "usage": out.usage(), "kvmlx": out.extension()})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False, logprobs=None, **extra) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                if first:
                    d = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
            return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                          "model": self.model_name, "choices": [choice], **extra}) + "\n\n"

        async def stream():
            sent_lp = 0  # tokens whose logprobs were streamed
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    kind, payload = await events.get()
                    if kind in ("error", "timeout"):
                        kind_ = "timeout_error" if kind == "timeout" else "server_error"
                        yield "data: " + json.dumps({"error": {"message": payload, "type": kind_}}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    stopped = out.feed(kind, payload)
                    if stopped:
                        job.cancelled.set()
                    final = stopped or kind == "done"
                    delta = out.pending(final=final)
                    lp = None
                    if params.logprobs and (delta or final) and sent_lp < len(out.tokens):
                        lp, sent_lp = out.logprobs(chat, sent_lp), len(out.tokens)
                    if final:
                        extra = {"kvmlx": out.extension()}
                        if not include_usage:
                            extra["usage"] = out.usage()
                        yield chunk(delta, out.finish, logprobs=lp, **extra)
                        if include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                                         "model": self.model_name, "choices": [],
                                                         "usage": out.usage()}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if delta:
                        yield chunk(delta, None, logprobs=lp)
            finally:  # normal end, or the client went away (Starlette cancels the stream)
                job.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Output:
    """Collects one request's tokens; text, stop strings, usage and the `kvmlx` extension field."""

    def __init__(self, tokenizer, eos: set[int], stops: list[str]):
        self.tokenizer, self.eos, self.stops = tokenizer, eos, stops
        self.tokens: list[int] = []
        self.lps: list[dict | None] = []  # per token: {"logprob", "top": [(id, logprob)]} when asked for
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
            token, info = payload
            self.tokens.append(token)
            self.lps.append(info)
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

    def logprobs(self, chat: bool, start: int = 0) -> dict:
        """The tokens' log-probabilities from `start` on, in OpenAI's shape for chat or completions."""
        piece = self.tokenizer.decode
        rows = [(t, lp) for t, lp in zip(self.tokens[start:], self.lps[start:]) if lp is not None]
        if chat:
            def entry(t, v):
                s = piece([t])
                return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8", "replace")), "id": t}
            return {"content": [dict(entry(t, lp["logprob"]), top_logprobs=[entry(i, v) for i, v in lp["top"]])
                                for t, lp in rows]}
        strs = [piece([t]) for t, _ in rows]
        offsets, pos = [], len(self.tokenizer.decode([t for t in self.tokens[:start] if t not in self.eos])) if start else 0
        for s in strs:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": strs, "token_logprobs": [lp["logprob"] for _, lp in rows],
                "top_logprobs": [{piece([i]): v for i, v in lp["top"]} for _, lp in rows], "text_offset": offsets}

    def usage(self) -> dict:
        prompt = self.info.get("prompt_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": len(self.tokens), "total_tokens": prompt + len(self.tokens),
                "prompt_tokens_details": {"cached_tokens": self.info.get("cached_tokens", 0)},
                **self.info.get("blend", {})}

    def extension(self) -> dict:
        return {"tokens": list(self.tokens), **self.info}


# ---- entry point ------------------------------------------------------------------------------


def serve(lm: LoadedModel, store: Store | str | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_resident_bytes: int | None = None, min_reuse_tokens: int = BLOCK, verify_digests: bool = True,
          allow_lossy: bool = False, model_name: str | None = None, aliases: Sequence[str] = (),
          max_batch: int = DEFAULT_MAX_BATCH, max_queued: int = DEFAULT_MAX_QUEUED,
          max_prompt_tokens: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT, log_level: str = "warning",
          on_ready: Callable[[str], None] | None = None, kv_quant=None, engine_class: type[Engine] = Engine,
          cache=True, blend: BlendSettings | None = None) -> None:
    """Run the server until interrupted (uvicorn; one engine thread does all model work). `kv_quant`:
    mlx-lm's --kv-bits settings (`kvmlx.caches.KVQuantization`) the engine runs with. `cache`: the
    prefix cache (a `kvmlx.runtime.prefix.PrefixCache`, True for one with its defaults, False for none).

    Under mlx.launch use `kvmlx.serving.sharded.serve_sharded`: rank 0 runs this with a `ShardedEngine`."""
    import uvicorn

    engine = engine_class(lm, store, max_resident_bytes=max_resident_bytes, min_reuse_tokens=min_reuse_tokens,
                          verify_digests=verify_digests, allow_lossy=allow_lossy, max_batch=max_batch,
                          max_queued=max_queued, request_timeout=request_timeout, kv_quant=kv_quant,
                          cache=cache).start()
    server = Server(engine, model_name, aliases=aliases, max_body_bytes=max_body_bytes,
                    max_prompt_tokens=max_prompt_tokens, blend=blend)
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
