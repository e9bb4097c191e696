"""The OpenAI-compatible HTTP layer over the engine: `/v1/models`, `/v1/completions`,
`/v1/chat/completions` (both with `"stream": true` as server-sent events), `/v1/kvmlx/stats` (JSON
counters) and `/metrics` (Prometheus text); request validation and OpenAI-shaped errors; `serve()`,
which runs it on uvicorn with one engine (engine.py). docs/SERVER.md has the design.

    kvmlx serve --model builtin:tiny --store ~/.cache/kvmlx/store --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="kvmlx", prompt=paper_text + "\\n\\nQuestion: ...", max_tokens=64)
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

from ..models import LoadedModel
from ..runtime.agent import ChatTemplateError, _render
from ..runtime.store import BLOCK, Store
from .engine import DEFAULT_MAX_TOKENS, Engine, Job, Params, prometheus

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_TOKENS_LIMIT = 32768


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
          on_ready: Callable[[str], None] | None = None, kv_quant=None, engine_class: type[Engine] = Engine) -> None:
    """Run the server until interrupted (uvicorn; one engine thread does all model work). `kv_quant`:
    mlx-lm's --kv-bits settings (`kvmlx.caches.KVQuantization`) the engine runs with.

    Under mlx.launch use `kvmlx.serving.sharded.serve_sharded`: rank 0 runs this with a `ShardedEngine`."""
    import uvicorn

    engine = engine_class(lm, store, max_resident_bytes=max_resident_bytes, min_reuse_tokens=min_reuse_tokens,
                          verify_digests=verify_digests, allow_lossy=allow_lossy, kv_quant=kv_quant).start()
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
