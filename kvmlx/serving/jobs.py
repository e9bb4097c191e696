"""The engine's bookkeeping: a request (`Job`) and its state in each stage (`_Prefill`, `_Decode`,
`_Solo`), per-document counters, and the refusal when too many requests wait (`QueueFull`)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

from ..runtime.publish import DEFAULT_CHUNK
from .sampling import Params


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; `retry_after` is a hint in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy: too many queued requests; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request. `emit(kind, payload)` is called from the engine thread with kind "start" (usage
    info), "token" ((token id, logprob info or None)), "done" (finish reason), "timeout" or "error"."""

    tokens: list[int]
    params: Params
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    blend: Any = None  # BlendSettings: reuse published documents anywhere in the prompt (approximate; runtime/blend.py)


@dataclass
class _Prefill:
    job: Job
    caches: list | None = None
    suffix: list[int] = field(default_factory=list)
    pos: int = 0
    chunk: int = DEFAULT_CHUNK
    logits: mx.array | None = None  # the stored logits when the whole prompt is the document
    reused: int = 0  # prompt tokens whose KV came from published or cached KV
    base: tuple | None = None  # the published entry (key, tokens) its cached KV continues
    snapped: int = 0  # where the last state snapshot inside this prompt was taken


@dataclass
class _Decode:
    job: Job
    logprobs: bool
    top: int
    started: bool = False  # its first token came out of the batch
    base: tuple | None = None  # (as _Prefill.base)


@dataclass
class _Solo:
    """A request decoding alone: its caches, sampler and processors, prompt + tokens so far."""

    job: Job
    caches: list
    sampler: Any
    processors: list
    context: list[int]
    count: int
    base: tuple | None = None


@dataclass
class DocStats:
    num_tokens: int
    loads: int = 0
    requests: int = 0
    tokens_saved: int = 0
    load_seconds: float = 0.0
