"""Reading and validating an OpenAI request body, before any of it reaches the engine.

Everything a client sends is checked here and refused with `BadRequest` (HTTP 400, an OpenAI-shaped
error naming the field in `param`): a body over `max_body_bytes`, not JSON, nested deeper than
`MAX_DEPTH`, or not an object; numbers that are not finite (JSON's non-standard `NaN`/`Infinity`),
of the wrong type or out of range (a `seed` must fit in 64 bits unsigned, as `mx.random.seed` takes);
strings with lone surrogates (not encodable as UTF-8, so no tokenizer can take them); `stop` that is
not a string or a list of up to 4 strings; prompts longer than `max_prompt_tokens`. The sampling
fields and their ranges are `mlx_lm.server`'s (`validate_model_parameters`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..runtime.blend import BlendSettings, BlendSettingsError
from .sampling import DEFAULT_MAX_TOKENS, Params

MAX_DEPTH = 32  # a chat request needs about 5
MAX_TOKENS_LIMIT = 32768
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (mlx_lm.server: 11)
MAX_STOPS = 4
MAX_CONTEXT_SIZE = 1 << 20


class BadRequest(Exception):
    """A client error: `status` (400 unless said), a one-line message, the offending field and a code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def parse_body(raw: bytes) -> dict:
    """The request body as a dict, or BadRequest."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the JSON body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {str(e).splitlines()[0][:200]}", code="invalid_json")
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {_json_type(body)}", code="invalid_json")
    _check_depth(body)
    return body


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _check_depth(body: dict) -> None:
    todo = [(body, 1)]
    while todo:
        v, d = todo.pop()
        if d > MAX_DEPTH:
            raise BadRequest(f"the JSON body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)


# ---- fields -----------------------------------------------------------------------------------


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(f"{name} must be an integer", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {v}" if hi is not None else f"{name} must be >= {lo}", name)
    return v


def _number(body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise BadRequest(f"{name} must be a number", name)
    v = float(v)
    if not math.isfinite(v):
        raise BadRequest(f"{name} must be a finite number", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {v}" if hi is not None else f"{name} must be >= {lo}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be a boolean", name)
    return v


def text(v: Any, name: str) -> str:
    """A client string that can be tokenized: no lone surrogates."""
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be a string", name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} contains a lone surrogate (not valid Unicode text)", name)
    return v


def params(body: dict, vocab_size: int | None, *, chat: bool) -> Params:
    """The sampling and length fields, with mlx_lm.server's names, defaults and ranges."""
    mt = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, mt, DEFAULT_MAX_TOKENS, 1, MAX_TOKENS_LIMIT)
    if body.get("n") is not None and _int(body, "n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    if opts:
        _bool(opts, "include_usage")
    logprobs, top = _logprobs(body, chat)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadRequest("logit_bias must be an object of token id -> bias", "logit_bias")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise BadRequest("logit_bias must map token ids to numbers", "logit_bias")
        if any(not math.isfinite(v) for v in bias.values()) or any(
                k < 0 or (vocab_size is not None and k >= vocab_size) for k in bias):
            raise BadRequest("logit_bias must map token ids in the vocabulary to finite numbers", "logit_bias")
    return Params(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_int(body, "top_k", 0, 0),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 0.0),
        repetition_context_size=_int(body, "repetition_context_size", 20, 0, MAX_CONTEXT_SIZE),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        presence_context_size=_int(body, "presence_context_size", 20, 0, MAX_CONTEXT_SIZE),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        frequency_context_size=_int(body, "frequency_context_size", 20, 0, MAX_CONTEXT_SIZE),
        logit_bias=bias or {},
        logprobs=logprobs,
        top_logprobs=top,
        seed=_int(body, "seed", None, 0, 2**64 - 1),
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _logprobs(body: dict, chat: bool) -> tuple[bool, int]:
    """(logprobs wanted, how many top alternatives). Chat: `logprobs` true/false and `top_logprobs`
    0..20; completions also take OpenAI's legacy `logprobs: N` (N alternatives per token)."""
    lp = body.get("logprobs")
    top = _int(body, "top_logprobs", 0, -1, MAX_TOP_LOGPROBS)  # -1: mlx_lm.server's "none"
    if lp is None:
        return top > 0, max(top, 0)
    if isinstance(lp, bool):
        return lp, max(top, 0) if lp else 0
    if not chat and isinstance(lp, int):
        n = _int(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
        return True, max(n, top)
    raise BadRequest("logprobs must be a boolean" + ("" if chat else " or an integer in [0, 20]"), "logprobs")


def stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop must be a string or a list of up to {MAX_STOPS} strings", "stop")
    return [text(s, "stop") for s in stop if s]


def prompt_tokens(body: dict, tokenizer, vocab_size: int | None) -> list[int]:
    """A completion's prompt: a string (tokenized as publish tokenizes documents) or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        tokens = list(tokenizer.encode(text(prompt, "prompt")))
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens = list(prompt)
        if any(t < 0 or (vocab_size is not None and t >= vocab_size) for t in tokens):
            raise BadRequest("prompt token id outside the vocabulary", "prompt")
    else:
        raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt per request)", "prompt")
    if not tokens:
        raise BadRequest("the prompt is empty", "prompt")
    return tokens


def messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role", "messages")
        out.append({"role": text(m["role"], "messages"), "content": _content(m.get("content"), i)})
    return out


def _content(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return text(content, "messages")
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text":
                raise BadRequest(f"messages[{i}]: only text content parts are supported", "messages")
            parts.append(text(p.get("text", ""), "messages"))
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")


def blend(body: dict, default: BlendSettings | None) -> BlendSettings | None:
    """The request's `blend` field (docs/SERVER.md): absent or null, the server's `--blend` default; false,
    exact reuse only; true, the server's default settings (or the built-in ones); a number R, a string
    "R", "rule" or "rule:R", or an object {"r", "rule"}: those settings for this request."""
    value = body.get("blend")
    if value is None:
        return default
    if value is True:
        return default or BlendSettings()
    try:
        return BlendSettings.of(value)
    except BlendSettingsError as e:
        raise BadRequest(str(e), "blend") from None
    except TypeError:
        raise BadRequest("blend must be a number from 0 to 1, a rule, or an object {r, rule}", "blend") from None
