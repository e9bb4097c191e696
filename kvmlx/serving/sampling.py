"""One request's sampling: the fields `mlx_lm.server` accepts (temperature, top_p, top_k, min_p,
repetition / presence / frequency penalties and their context sizes, logit_bias, logprobs,
top_logprobs, seed), turned into mlx-lm's own sampler and logits processors so they mean exactly what
they mean there (`mlx_lm.sample_utils.make_sampler` / `make_logits_processors`).

One difference, on purpose: `mlx_lm.server` honours `seed` by seeding MLX's global generator and
serving that request alone (unbatched). Here a seeded request gets its own generator key, split once
per token, so it can run in the batch with others and still give the same tokens for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default


@dataclass
class Params:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 0.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    presence_context_size: int = 20
    frequency_penalty: float = 0.0
    frequency_context_size: int = 20
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    seed: int | None = None
    ignore_eos: bool = False


def make_request_sampler(p: Params):
    """None for greedy (the batch's shared argmax), else a sampler taking log-probabilities [B, V]."""
    if p.temperature == 0:
        return None
    if p.seed is None:
        return make_sampler(p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
    filters = []  # the order make_sampler applies them in
    if 0 < p.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, p.top_p))
    if p.min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, p.min_p, 1))
    if p.top_k > 0:
        filters.append(lambda x: apply_top_k(x, p.top_k))
    state = {"key": mx.random.key(p.seed)}

    def sampler(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1.0 / p.temperature), key=sub)

    return sampler


def make_request_processors(p: Params) -> list:
    return make_logits_processors(p.logit_bias or None, p.repetition_penalty, p.repetition_context_size,
                                  p.presence_penalty, p.presence_context_size, p.frequency_penalty,
                                  p.frequency_context_size)


def sample_first(logits: mx.array, context: list[int], sampler, processors) -> tuple[int, mx.array]:
    """The first token from a prompt's last logits row [V] (what BatchGenerator does for later tokens):
    processors over the prompt as context, log-softmax, the sampler. Returns (token, logprobs [V])."""
    logits = logits[None].astype(mx.float32)
    if processors:
        ctx = mx.array(context, dtype=mx.int32)
        for proc in processors:
            logits = proc(ctx, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = sampler(logprobs) if sampler is not None else mx.argmax(logprobs, axis=-1)
    return int(token.item()), logprobs[0]


def logprob_info(logprobs: mx.array, token: int, top: int) -> dict:
    """{"logprob": the token's, "top": [(id, logprob), ...] best first} from a log-probability row."""
    info = {"logprob": float(logprobs[token].item()), "top": []}
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        vals = logprobs[ids]
        order = mx.argsort(-vals)
        info["top"] = list(zip(ids[order].tolist(), vals[order].tolist()))
    return info
