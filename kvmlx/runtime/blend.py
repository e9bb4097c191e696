"""Position-independent reuse (opt-in, approximate): published documents anywhere in a prompt.

    from kvmlx.runtime.blend import BlendSettings, blend_generate
    out = agent.generate(prompt, blend=0.15)             # or Agent(lm, blend=BlendSettings(0.15, "cacheblend"))
    out.blend == {"reused_tokens": ..., "recomputed_tokens": ..., "computed_tokens": ..., "approximate": True, ...}

How a prompt is served (`blend_prefill`):

1. Find stored documents of this model, tokenizer and dtype inside the prompt's token ids at any offset
   (blend_find.py); the prompt's last token is never reused.
2. Load each found document and move its keys from their stored positions to their positions in the
   prompt with the model's own RoPE (caches/rope.py; the per-model gate runs once per model).
3. Selective recompute, layer by layer over the publisher's chunks:
   - layers 0..check (CacheBlend and `anchored`; none for EPIC) are computed for every token, exactly
     as a prefill computes them;
   - the tokens to recompute are chosen among the reused ones, a fraction R of them:
     `cacheblend`: the top R by squared deviation of the recomputed keys from the moved stored keys at
       the check layer (summed over heads);
     `epic`: the first ceil(R · length) tokens of each reused document;
     `anchored` (kvmlx's own): the first tokens of each document (up to ANCHOR each, the positions
       where a standalone document's attention sink sits, at most half the budget), then the rest of
       the budget by CacheBlend's deviation;
   - later layers compute only the prompt's other tokens and the chosen ones (their queries at their
     own positions, attending causally to every key); every other reused token keeps its moved
     stored keys and values.
   A chunk whose tokens are all computed runs exactly as prefill runs it (the model's own mask and
   rotation), so R = 1.0 gives bit-identical tokens and logits to a full prefill of the same prompt
   in the same chunk size.
4. Decode greedily from the filled caches. `approximate` is true whenever any reused token kept
   stored KV (any R < 1 with a document found).

Supported: decoder stacks built like llama/qwen2/qwen3/mistral in mlx-lm (embed, layers(h, mask,
cache), norm, head) with plain KV caches; everything else is refused by name (caches/rope.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

from ..caches.rope import Rope, check_blend_support, gate, move_keys, rotate_at
from ..errors import BlendUnsupportedError, KvmlxError
from ..models import LoadedModel
from .blend_find import BLOCK, MIN_TOKENS, DocumentIndex, Span
from .generate import decode_timed
from .load import LoadedKV, load_artifact
from .publish import DEFAULT_CHUNK

RULES = ("cacheblend", "epic", "anchored")
DEFAULT_R = 0.15
DEFAULT_RULE = "anchored"
CHECK_LAYER = 1  # CacheBlend's default: layers 0 and 1 computed for every token, deviation measured at 1
ANCHOR = 4  # `anchored`: tokens recomputed at the start of each document (at most half the budget)
EPIC_MAX = 32  # EPIC's k <= 32 per document
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class BlendSettingsError(KvmlxError, ValueError):
    """A --blend value or a request's `blend` field is not a fraction in [0, 1] with a known rule."""


@dataclass(frozen=True)
class BlendSettings:
    """R (fraction of reused tokens recomputed), the selection rule, and CacheBlend's check layer."""

    r: float = DEFAULT_R
    rule: str = DEFAULT_RULE
    check_layer: int = CHECK_LAYER
    min_tokens: int = MIN_TOKENS  # shortest document match reused

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)) or not 0.0 <= float(self.r) <= 1.0 \
                or math.isnan(self.r):
            raise BlendSettingsError(f"blend R must be a number from 0 to 1, not {self.r!r}")
        if self.rule not in RULES:
            raise BlendSettingsError(f"unknown blend rule {self.rule!r}; choose from {', '.join(RULES)}")
        if not isinstance(self.check_layer, int) or self.check_layer < 0:
            raise BlendSettingsError(f"blend check layer must be a layer index >= 0, not {self.check_layer!r}")

    @classmethod
    def of(cls, value: Any) -> "BlendSettings | None":
        """None/False: off; True: the defaults; a number: R; "R", "rule" or "rule:R"; a dict; settings."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, (int, float)):
            return cls(r=float(value))
        if isinstance(value, str):
            rule, _, r = value.partition(":") if ":" in value else (("", "", value) if _number(value) else (value, "", ""))
            if r and not _number(r):
                raise BlendSettingsError(f"blend R must be a number from 0 to 1, not {r!r}")
            return cls(r=float(r) if r else DEFAULT_R, rule=rule or DEFAULT_RULE)
        if isinstance(value, dict):
            unknown = set(value) - {"r", "rule", "check_layer", "min_tokens"}
            if unknown:
                raise BlendSettingsError(f"unknown blend field {sorted(unknown)[0]!r}")
            return cls(**value)
        raise BlendSettingsError(f"blend must be a number, a rule or an object, not {type(value).__name__}")

    def to_json(self) -> dict:
        return {"r": self.r, "rule": self.rule, "check_layer": self.check_layer, "min_tokens": self.min_tokens}


def _number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@dataclass
class BlendStats:
    """What a blended prefill did: `reused + recomputed + computed == prompt_tokens`."""

    prompt_tokens: int
    reused_tokens: int  # tokens whose KV (after the full layers) came from a stored document
    recomputed_tokens: int  # tokens found in a stored document but recomputed
    computed_tokens: int  # tokens in no stored document
    full_layers: int  # layers computed for every token (CacheBlend's 0..check)
    documents: list[dict] = field(default_factory=list)  # the spans found (blend_find.Span.to_json)
    settings: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    load_seconds: float = 0.0
    chunk_size: int = DEFAULT_CHUNK

    @property
    def approximate(self) -> bool:
        return self.reused_tokens > 0

    def to_json(self) -> dict:
        return {"reused_tokens": self.reused_tokens, "recomputed_tokens": self.recomputed_tokens,
                "computed_tokens": self.computed_tokens, "approximate": self.approximate,
                "prompt_tokens": self.prompt_tokens, "full_layers": self.full_layers, "documents": self.documents,
                "settings": self.settings, "gate": self.gate, "load_seconds": self.load_seconds,
                "chunk_size": self.chunk_size}


# ---- the model's pieces ------------------------------------------------------------------------


def check_model(lm: LoadedModel, kv_quant=None) -> list[Rope]:
    """Refuse what blending cannot serve (caches/rope.py's refusals, and forwards it cannot split)."""
    ropes = check_blend_support(lm, kv_quant=kv_quant)
    inner = getattr(lm.model, "model", None)
    model_type = lm.config.get("model_type")
    if model_type not in MODEL_TYPES or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise BlendUnsupportedError(f"blend's layer-by-layer forward supports {', '.join(MODEL_TYPES)}, not {model_type}")
    return ropes


def _head(model, h: mx.array) -> mx.array:
    out = model.model.norm(h)
    return model.lm_head(out) if "lm_head" in model else model.model.embed_tokens.as_linear(out)


class _AtPositions(nn.Module):
    """Stands in for a layer's rope during a call: token j is rotated at `positions[j]` (the cache offset
    the attention passes is ignored)."""

    def __init__(self, rope, positions: mx.array):
        super().__init__()
        self.inner = rope
        self.positions = positions

    def __call__(self, x, offset=0):
        return rotate_at(x, self.positions, self.inner)


class _Blended:
    """A layer's cache during a partly recomputed chunk: the chunk's keys and values are the moved stored
    ones with the recomputed tokens' fresh ones written in at `idx`, then appended to the real cache."""

    def __init__(self, cache, keys: mx.array, values: mx.array, idx: mx.array):
        self.cache, self.keys, self.values, self.idx = cache, keys, values, idx

    @property
    def offset(self) -> int:
        return self.cache.offset

    def update_and_fetch(self, k: mx.array, v: mx.array):
        keys, values = mx.array(self.keys), mx.array(self.values)
        keys[:, :, self.idx, :] = k
        values[:, :, self.idx, :] = v
        return self.cache.update_and_fetch(keys, values)


# ---- selection --------------------------------------------------------------------------------


def select(rule: str, r: float, spans: Sequence[Span], deviation: np.ndarray | None, reused: np.ndarray) -> np.ndarray:
    """Boolean [N]: the reused tokens chosen for recompute (a fraction `r` of them by `rule`)."""
    n_reused = int(reused.sum())
    chosen = np.zeros_like(reused)
    budget = min(n_reused, math.ceil(r * n_reused - 1e-9))
    if budget <= 0:
        return chosen
    if budget >= n_reused:
        return reused.copy()
    if rule == "epic":
        for s in spans:
            chosen[s.start : s.start + min(s.length, max(1, math.ceil(r * s.length - 1e-9)))] = True
        return chosen
    if rule == "anchored":
        per = min(ANCHOR, budget // (2 * max(1, len(spans))))
        for s in spans:
            chosen[s.start : s.start + min(per, s.length)] = True
    left = budget - int(chosen.sum())
    if left > 0:
        score = np.where(reused & ~chosen, deviation, -np.inf)
        chosen[np.argsort(-score, kind="stable")[:left]] = True
    return chosen


# ---- the blended prefill ----------------------------------------------------------------------


def stored_kv(lm: LoadedModel, tokens_n: int, spans: Sequence[Span], docs: dict[str, LoadedKV],
              ropes: Sequence[Rope]) -> tuple[list[mx.array], list[mx.array]]:
    """Per layer, [1, H, N, D] keys and values: each span's stored KV moved to its prompt positions
    (zeros elsewhere)."""
    keys, values = [], []
    for layer, rope in enumerate(ropes):
        kparts, vparts, at = [], [], 0
        for s in spans:
            c = docs[s.key].caches[layer]
            k, v = c.keys[..., s.doc_start : s.doc_end, :], c.values[..., s.doc_start : s.doc_end, :]
            if s.start > at:
                kparts.append(mx.zeros((*k.shape[:2], s.start - at, k.shape[3]), k.dtype))
                vparts.append(mx.zeros((*v.shape[:2], s.start - at, v.shape[3]), v.dtype))
            kparts.append(move_keys(k, s.delta, rope))
            vparts.append(v)
            at = s.end
        if tokens_n > at:
            k, v = kparts[-1], vparts[-1]
            kparts.append(mx.zeros((*k.shape[:2], tokens_n - at, k.shape[3]), k.dtype))
            vparts.append(mx.zeros((*v.shape[:2], tokens_n - at, v.shape[3]), v.dtype))
        keys.append(mx.concatenate(kparts, axis=2))
        values.append(mx.concatenate(vparts, axis=2))
    mx.eval(keys, values)
    return keys, values


def blend_prefill(lm: LoadedModel, tokens: Sequence[int], spans: Sequence[Span], docs: dict[str, LoadedKV],
                  settings: BlendSettings, ropes: Sequence[Rope], chunk_size: int = DEFAULT_CHUNK
                  ) -> tuple[list, mx.array, BlendStats]:
    """Fill fresh caches with `tokens` reusing `spans` of `docs` (module docstring); (caches, last logits, stats)."""
    model = lm.model
    inner = model.model
    layers = inner.layers
    n = len(tokens)
    if not tokens:
        raise ValueError("cannot prefill an empty token sequence")
    if any(s.end >= n for s in spans):
        raise ValueError("the prompt's last token must be computed")
    reused = np.zeros(n, dtype=bool)
    for s in spans:
        reused[s.start : s.end] = True
    caches = make_prompt_cache(model)
    chunks = [(c0, min(c0 + chunk_size, n)) for c0 in range(0, n, chunk_size)]
    h = [inner.embed_tokens(mx.array(list(tokens[c0:c1]))[None]) for c0, c1 in chunks]
    full = 0 if settings.rule == "epic" or not spans else min(settings.check_layer + 1, len(layers))
    for li in range(full):  # every token, exactly as prefill computes it
        for ci in range(len(chunks)):
            h[ci] = layers[li](h[ci], create_attention_mask(h[ci], caches[li]), caches[li])
        mx.eval(h, caches[li].state)
    rk, rv = stored_kv(lm, n, spans, docs, ropes) if spans else ([], [])
    deviation = None
    if full and spans:
        fresh = caches[full - 1].keys[..., :n, :].astype(mx.float32)
        deviation = np.array(mx.sum((fresh - rk[full - 1].astype(mx.float32)) ** 2, axis=(0, 1, 3)))
    chosen = select(settings.rule, settings.r, spans, deviation, reused)
    computed = ~reused | chosen
    idx = [np.flatnonzero(computed[c0:c1]) for c0, c1 in chunks]
    h = [x if len(i) == c1 - c0 else (x[:, mx.array(i)] if len(i) else None) for x, i, (c0, c1) in zip(h, idx, chunks)]
    for li in range(full, len(layers)):
        layer, cache = layers[li], caches[li]
        for ci, (c0, c1) in enumerate(chunks):
            i = idx[ci]
            if len(i) == c1 - c0:  # all computed: exactly as prefill
                h[ci] = layer(h[ci], create_attention_mask(h[ci], cache), cache)
            elif not len(i):  # all reused
                cache.update_and_fetch(rk[li][..., c0:c1, :], rv[li][..., c0:c1, :])
            else:
                pos = mx.array(c0 + i)
                mask = mx.arange(c1)[None, :] <= pos[:, None]
                attn = layer.self_attn
                rope = attn.rope
                attn.rope = _AtPositions(rope, pos)
                try:
                    h[ci] = layer(h[ci], mask, _Blended(cache, rk[li][..., c0:c1, :], rv[li][..., c0:c1, :], mx.array(i)))
                finally:
                    attn.rope = rope
        mx.eval([x for x in h if x is not None], cache.state)
    logits = _head(model, h[-1])[0, -1]
    mx.eval(logits)
    n_chosen = int(chosen.sum())
    stats = BlendStats(n, int(reused.sum()) - n_chosen, n_chosen, int((~reused).sum()), full,
                       [s.to_json() for s in spans], settings.to_json(), chunk_size=chunk_size)
    return caches, logits, stats


# ---- the store's documents --------------------------------------------------------------------

_INDEXES: dict[tuple, tuple[frozenset, DocumentIndex]] = {}
_GATES: dict[int, dict] = {}


def document_index(store, identity: tuple[str, str, str], *, allow_lossy: bool = False,
                   block: int = BLOCK) -> tuple[DocumentIndex, dict]:
    """The block-hash index of the store's plain-KV documents for this identity, and {key: Entry}
    (rebuilt only when the set of entries changes)."""
    model_fp, tokenizer_fp, variant = identity
    entries = {e.key: e for e in store.ls()
               if e.model_fingerprint == model_fp and e.tokenizer_fingerprint == tokenizer_fp and e.dtype == variant
               and e.restore is None and (e.lossless or allow_lossy) and e.path.exists()}
    cache_key = (str(getattr(store, "root", id(store))), identity, allow_lossy, block)
    keys = frozenset(entries)
    hit = _INDEXES.get(cache_key)
    if hit is None or hit[0] != keys:
        hit = (keys, DocumentIndex({k: store.tokens(k) for k in keys}, block))
        _INDEXES[cache_key] = hit
    return hit[1], entries


def model_gate(lm: LoadedModel, ropes: Sequence[Rope], keys: mx.array) -> dict:
    """The per-model gate (caches/rope.py), run once per loaded model, on a stored block of keys."""
    key = id(lm.model)
    if key not in _GATES:
        _GATES[key] = gate(lm, ropes, keys)
    return _GATES[key]


@dataclass
class Blended:
    """A prompt's caches after a blended prefill, ready for decoding from `logits`."""

    caches: list
    logits: mx.array
    stats: BlendStats
    quarantined: list[dict] = field(default_factory=list)


def prepare(lm: LoadedModel, store, tokens: Sequence[int], settings: BlendSettings, *, identity: tuple[str, str, str],
            chunk_size: int | None = None, kv_quant=None, verify_digests: bool = True, allow_lossy: bool = False,
            on_failed_load: Callable[[str, str], None] | None = None) -> Blended:
    """Find, load, move and blend: the one call a server or an agent makes for a blended prompt."""
    ropes = check_model(lm, kv_quant)
    tokens = [int(t) for t in tokens]
    index, entries = document_index(store, identity, allow_lossy=allow_lossy)
    spans = index.find(tokens, min_tokens=settings.min_tokens, limit=len(tokens) - 1)
    t0 = time.perf_counter()
    docs: dict[str, LoadedKV] = {}
    quarantined = []
    for key in dict.fromkeys(s.key for s in spans):
        try:
            docs[key] = load_artifact(entries[key].path, lm, verify_digests=verify_digests, require_exact=not allow_lossy)
            if docs[key].tokens != index.documents[key]:
                raise KvmlxError(f"store entry {key[:12]}: file tokens differ from the index")
        except (KvmlxError, OSError) as e:
            docs.pop(key, None)
            if isinstance(e, BlendUnsupportedError):
                raise
            quarantined.append({"key": key, "reason": f"load failed: {e}"})
            if on_failed_load:
                on_failed_load(key, f"load failed: {e}")
    spans = [s for s in spans if s.key in docs]
    load_seconds = time.perf_counter() - t0
    report = {}
    if spans:
        first = docs[spans[0].key].caches[0]
        report = model_gate(lm, ropes, first.keys[..., : min(64, first.offset), :])
    caches, logits, stats = blend_prefill(lm, tokens, spans, docs, settings, ropes,
                                          chunk_size or (entries[spans[0].key].chunk_size if spans else DEFAULT_CHUNK))
    stats.gate, stats.load_seconds = report, load_seconds
    return Blended(caches, logits, stats, quarantined)


# ---- generation (the agent's blended path) ----------------------------------------------------


@dataclass
class BlendGeneration:
    """One greedy continuation of a blended prompt: the agent's fields, plus what blending did."""

    tokens: list[int]
    text: str
    prompt_tokens: int
    reused_tokens: int  # reused stored KV (the tokens recomputed or computed are counted apart)
    recomputed_tokens: int
    computed_tokens: int
    approximate: bool
    first_token_seconds: float
    total_seconds: float
    load_seconds: float
    chunk_size: int
    blend: BlendStats
    logits: list[np.ndarray] = field(default_factory=list, repr=False)
    quarantined: list[dict] = field(default_factory=list)
    key: str | None = None  # the first document reused (several may be: see blend.documents)
    artifact: str | None = None
    artifact_bytes: int = 0

    @property
    def prefilled_tokens(self) -> int:
        return self.recomputed_tokens + self.computed_tokens

    def to_json(self) -> dict:
        return {
            "text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens, "recomputed_tokens": self.recomputed_tokens,
            "computed_tokens": self.computed_tokens, "prefilled_tokens": self.prefilled_tokens,
            "approximate": self.approximate, "key": self.key, "artifact": self.artifact,
            "artifact_bytes": self.artifact_bytes, "load_seconds": self.load_seconds,
            "first_token_seconds": self.first_token_seconds, "total_seconds": self.total_seconds,
            "chunk_size": self.chunk_size, "quarantined": self.quarantined, "blend": self.blend.to_json(),
        }


def blend_generate(agent, prompt, settings: BlendSettings, *, max_tokens: int, on_token=None, stop_at_eos: bool = True,
                   keep_logits: bool = False) -> BlendGeneration:
    """`Agent.generate` with documents reused anywhere in the prompt (`agent.generate(..., blend=R)`)."""
    t0 = time.perf_counter()
    tokens = agent._tokens(prompt)
    lm = agent.lm

    def discard(key: str, reason: str) -> None:
        agent.store.discard(key, reason)

    b = prepare(lm, agent.store, tokens, settings, identity=agent.identity, chunk_size=agent.chunk_size,
                kv_quant=agent.kv_quant, verify_digests=agent.verify_digests, allow_lossy=agent.allow_lossy,
                on_failed_load=discard)
    s = b.stats
    gen = decode_timed(lm, b.caches, b.logits, max_tokens, started=t0, reused=s.reused_tokens,
                       prefilled=s.recomputed_tokens + s.computed_tokens, stop_at_eos=stop_at_eos, on_token=on_token,
                       keep_logits=keep_logits)
    first = s.documents[0]["key"] if s.documents else None
    entry = agent.store.get(first) if first else None
    return BlendGeneration(
        tokens=gen.tokens, text=lm.tokenizer.decode(gen.tokens), prompt_tokens=len(tokens),
        reused_tokens=s.reused_tokens, recomputed_tokens=s.recomputed_tokens, computed_tokens=s.computed_tokens,
        approximate=s.approximate, first_token_seconds=gen.first_token_seconds, total_seconds=gen.total_seconds,
        load_seconds=s.load_seconds, chunk_size=s.chunk_size, blend=s, logits=gen.logits,
        quarantined=b.quarantined, key=first, artifact=str(entry.path) if entry else None,
        artifact_bytes=entry.file_bytes if entry else 0)


# ---- serving (the engine's hook) --------------------------------------------------------------

METRICS = ("kvmlx_blend_requests_total", "kvmlx_blend_approximate_requests_total", "kvmlx_blend_reused_tokens_total",
           "kvmlx_blend_recomputed_tokens_total", "kvmlx_blend_computed_tokens_total")


def request_caches(lm: LoadedModel, store, tokens: Sequence[int], settings: BlendSettings, *,
                   identity: tuple[str, str, str], chunk_size: int | None = None,
                   on_failed_load: Callable[[str, str], None] | None = None) -> tuple[list, list[int], BlendStats]:
    """A server request's caches, blended: (caches holding `tokens[:-1]`, the suffix `tokens[-1:]` to prefill
    as any other request's, stats). The caches are the request's own (nothing resident is shared)."""
    tokens = [int(t) for t in tokens]
    if len(tokens) < 2:
        return make_prompt_cache(lm.model), tokens, BlendStats(len(tokens), 0, 0, len(tokens), 0)
    b = prepare(lm, store, tokens[:-1], settings, identity=identity, chunk_size=chunk_size,
                on_failed_load=on_failed_load)
    s = b.stats
    s.prompt_tokens, s.computed_tokens = s.prompt_tokens + 1, s.computed_tokens + 1
    return b.caches, tokens[-1:], s


def usage_fields(stats: BlendStats | None) -> dict:
    """The fields a response's `usage` carries for a blended request (none for an exact one)."""
    if stats is None:
        return {}
    return {"reused_tokens": stats.reused_tokens, "recomputed_tokens": stats.recomputed_tokens,
            "computed_tokens": stats.computed_tokens, "approximate": stats.approximate}


def count(metrics: dict, stats: BlendStats) -> None:
    """Add one blended request to `metrics` ({name: number}, the names in METRICS)."""
    for name, value in zip(METRICS, (1, int(stats.approximate), stats.reused_tokens, stats.recomputed_tokens,
                                     stats.computed_tokens)):
        metrics[name] = metrics.get(name, 0) + value
