"""Reuse and continue: load an artifact, prefill only the agent's suffix, decode; verify against prefill.

Decoding here is greedy and keeps every logits row when asked, because the point of kvmlx is that a
reused KV gives the same tokens *and* the same logits as prefilling from scratch. For sampling and
the rest of mlx-lm's options, pass `LoadedKV.caches` as `prompt_cache=` to `mlx_lm.stream_generate`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..caches import KVQuantization
from ..caches.quantized import apply as apply_quantization
from ..models import LoadedModel
from .load import LoadedKV, load_artifact, split_prompt
from .publish import prefill

DEFAULT_MAX_TOKENS = 32
TokenFn = Callable[[int], None]


@dataclass
class Generation:
    """One greedy continuation and what it cost."""

    tokens: list[int]
    reused_tokens: int
    prefilled_tokens: int
    first_token_seconds: float  # from the start (load or prefill) to the first generated token
    total_seconds: float
    logits: list[np.ndarray] = field(default_factory=list, repr=False)  # float32 rows, if kept


@dataclass
class Verification:
    """Reuse against from-scratch prefill of the same tokens with the same chunking."""

    token_exact: bool
    tokens_compared: int
    max_abs_logit_diff: float
    logits_identical: bool
    first_mismatch: int | None
    reuse: Generation
    scratch: Generation
    load_seconds: float
    artifact_bytes: int
    single_pass: dict | None = None  # the same comparison against one unchunked forward, if asked
    bytes_read: int | None = None  # bytes read from files by the load (LoadedKV.bytes_read)

    def to_json(self) -> dict:
        out = {
            "token_exact": self.token_exact,
            "tokens_compared": self.tokens_compared,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "logits_identical": self.logits_identical,
            "first_mismatch": self.first_mismatch,
            "reused_tokens": self.reuse.reused_tokens,
            "prefilled_tokens": self.reuse.prefilled_tokens,
            "artifact_bytes": self.artifact_bytes,
            "bytes_read": self.bytes_read,
            "load_seconds": self.load_seconds,
            "prefill_seconds": self.scratch.first_token_seconds,
            "reuse_first_token_seconds": self.reuse.first_token_seconds,
            "speedup_first_token": self.scratch.first_token_seconds / self.reuse.first_token_seconds,
            "tokens": self.reuse.tokens,
            "reference_tokens": self.scratch.tokens,
        }
        if self.single_pass is not None:
            out["single_pass"] = self.single_pass
        return out


def decode(
    model,
    cache: list,
    logits: mx.array,
    max_tokens: int,
    *,
    eos: Sequence[int] = (),
    on_token: TokenFn | None = None,
    keep_logits: bool = False,
    quant: KVQuantization | None = None,
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding from a logits row; stops after `max_tokens` or at an id in `eos`. With `quant`,
    caches are quantized after every step as mlx-lm's `--kv-bits` pipeline does."""
    tokens: list[int] = []
    rows: list[np.ndarray] = []
    for _ in range(max_tokens):
        token = int(mx.argmax(logits).item())
        if keep_logits:
            rows.append(np.array(logits.astype(mx.float32)))
        tokens.append(token)
        if on_token:
            on_token(token)
        if token in eos or len(tokens) == max_tokens:
            break
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        apply_quantization(quant, cache)
    return tokens, rows


def continue_from(
    lm: LoadedModel,
    loaded: LoadedKV,
    suffix: Sequence[int],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_size: int | None = None,
    stop_at_eos: bool = True,
    on_token: TokenFn | None = None,
    keep_logits: bool = False,
    started: float | None = None,
) -> Generation:
    """Prefill `suffix` over a loaded KV (in the artifact's chunk size) and decode greedily.

    With an empty suffix the first token comes from the logits stored in the artifact: no model call.
    """
    t0 = started if started is not None else time.perf_counter()
    chunk = chunk_size or loaded.header["kv"]["chunk_size"]
    quant = loaded.kv_quant
    logits = prefill(lm.model, list(suffix), loaded.caches, chunk, quant=quant, split_last=True) if suffix else loaded.logits
    return decode_timed(lm, loaded.caches, logits, max_tokens, stop_at_eos=stop_at_eos, on_token=on_token,
                        keep_logits=keep_logits, started=t0, reused=len(loaded.tokens), prefilled=len(suffix), quant=quant)


def from_scratch(
    lm: LoadedModel,
    document: Sequence[int],
    suffix: Sequence[int],
    *,
    chunk_size: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    stop_at_eos: bool = True,
    keep_logits: bool = False,
    quant: KVQuantization | None = None,
) -> Generation:
    """The reference: prefill document then suffix, each in `chunk_size` chunks as a publisher would
    (with `quant`, quantizing the caches as mlx-lm's `--kv-bits` pipeline does)."""
    t0 = time.perf_counter()
    cache = make_prompt_cache(lm.model)
    # the document as its publisher prefilled it (its logits read only when nothing follows); the suffix as
    # a request's: its last token alone
    logits = None
    if document:
        logits = prefill(lm.model, list(document), cache, chunk_size, quant=quant, logits=not suffix)
    if suffix:
        logits = prefill(lm.model, list(suffix), cache, chunk_size, quant=quant, split_last=True)
    return decode_timed(lm, cache, logits, max_tokens, stop_at_eos=stop_at_eos, keep_logits=keep_logits, started=t0,
                        reused=0, prefilled=len(document) + len(suffix), quant=quant)


def decode_timed(
    lm: LoadedModel,
    cache: list,
    logits: mx.array,
    max_tokens: int,
    *,
    started: float,
    reused: int,
    prefilled: int,
    stop_at_eos: bool = True,
    on_token: TokenFn | None = None,
    keep_logits: bool = False,
    quant: KVQuantization | None = None,
) -> Generation:
    """`decode`, timed from `started` (when the load or prefill began) to the first and last token."""
    t0 = started
    first: list[float] = []

    def mark(token: int) -> None:
        if not first:
            first.append(time.perf_counter() - t0)
        if on_token:
            on_token(token)

    eos = tuple(lm.tokenizer.eos_token_ids) if stop_at_eos else ()
    tokens, rows = decode(lm.model, cache, logits, max_tokens, eos=eos, on_token=mark, keep_logits=keep_logits, quant=quant)
    return Generation(tokens, reused, prefilled, first[0] if first else 0.0, time.perf_counter() - t0, rows)


def visible_text(tokenizer, tokens: Sequence[int]) -> str:
    """The text of generated tokens as `mlx_lm.generate` prints it: up to the first end-of-sequence
    token, without its marker (the token ids keep it)."""
    eos = set(tokenizer.eos_token_ids)
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokenizer.decode(list(tokens[:end]))


def encode_continuation(lm: LoadedModel, prompt: str) -> list[int]:
    """Token ids of text that continues a document (no BOS or other special tokens added)."""
    return list(lm.tokenizer.encode(prompt, add_special_tokens=False)) if prompt else []


def _load_with_prompt(artifact, lm: LoadedModel, prompt: str, verify_digests: bool, max_tokens: int,
                      require_exact: bool = False, **kwargs) -> tuple[LoadedKV, list[int]]:
    """Load with room for exactly what this run appends (the prompt's tokens, then `max_tokens`): the
    caches never grow, so the document's KV is never copied again and the peak memory is one copy
    of it (a load without spare slots, `native`, would grow it at the first append)."""
    continuation = encode_continuation(lm, prompt)
    loaded = load_artifact(artifact, lm, verify_digests=verify_digests, require_exact=require_exact,
                           headroom=len(continuation) + max_tokens, **kwargs)
    return loaded, split_prompt(loaded, loaded.tokens + continuation)


def generate(
    artifact: str | os.PathLike,
    lm: LoadedModel,
    prompt: str = "",
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    on_token: TokenFn | None = None,
    verify_digests: bool = True,
    require_exact: bool = False,
    require_signed: bool = False,
    trust_list=None,
    kv_quant: KVQuantization | None | str = "artifact",
) -> tuple[Generation, LoadedKV]:
    """Load `artifact` for `lm`, append `prompt` (text continuing the document) and decode greedily.

    `require_signed`/`trust_list`: see `kvmlx.runtime.load.load_artifact` (publisher signatures, kvmlx.artifact.trust).
    `kv_quant`: this run's `--kv-bits` settings ("artifact": continue with the artifact's; else a difference is refused).
    """
    t0 = time.perf_counter()
    loaded, suffix = _load_with_prompt(artifact, lm, prompt, verify_digests, max_tokens, require_exact,
                                       require_signed=require_signed, trust_list=trust_list, kv_quant=kv_quant)
    return continue_from(lm, loaded, suffix, max_tokens=max_tokens, on_token=on_token, started=t0), loaded


def verify(
    artifact: str | os.PathLike,
    lm: LoadedModel,
    prompt: str = "",
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    single_pass: bool = False,
    on_token: TokenFn | None = None,
    require_signed: bool = False,
    trust_list=None,
    kv_quant: KVQuantization | None | str = "artifact",
) -> Verification:
    """Generate from the artifact and from scratch (same chunking) and compare tokens and logits.

    Both sides decode exactly `max_tokens` tokens, through EOS, so every run compares the same count.
    With `single_pass`, also compare against one unchunked forward over document + prompt.
    """
    t0 = time.perf_counter()
    loaded, suffix = _load_with_prompt(artifact, lm, prompt, True, max_tokens, require_signed=require_signed, trust_list=trust_list,
                                       kv_quant=kv_quant)
    reuse = continue_from(lm, loaded, suffix, max_tokens=max_tokens, stop_at_eos=False, on_token=on_token,
                          keep_logits=True, started=t0)
    chunk = loaded.header["kv"]["chunk_size"]
    scratch = from_scratch(lm, loaded.tokens, suffix, chunk_size=chunk, max_tokens=max_tokens,
                           stop_at_eos=False, keep_logits=True, quant=loaded.kv_quant)
    report = compare(reuse, scratch)
    extra = None
    if single_pass:
        whole = list(loaded.tokens) + list(suffix)
        one = from_scratch(lm, whole, [], chunk_size=len(whole), max_tokens=max_tokens, stop_at_eos=False, keep_logits=True,
                           quant=loaded.kv_quant)
        extra = compare(reuse, one)
        extra.pop("first_mismatch")
    return Verification(
        reuse=reuse, scratch=scratch, load_seconds=loaded.load_seconds,
        artifact_bytes=loaded.header["file_bytes"], single_pass=extra, bytes_read=loaded.bytes_read, **report,
    )


def compare(a: Generation, b: Generation) -> dict:
    """Token equality and the largest absolute logit difference between two kept-logit runs."""
    n = min(len(a.tokens), len(b.tokens))
    mismatch = next((i for i in range(n) if a.tokens[i] != b.tokens[i]), None)
    if mismatch is None and len(a.tokens) != len(b.tokens):
        mismatch = n
    diff = max((float(np.max(np.abs(x - y))) for x, y in zip(a.logits, b.logits)), default=0.0)
    return {
        "token_exact": mismatch is None,
        "tokens_compared": n,
        "max_abs_logit_diff": diff,
        "logits_identical": diff == 0.0 and mismatch is None,
        "first_mismatch": mismatch,
    }
