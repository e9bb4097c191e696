"""Automatic reuse: an agent sends its whole prompt; kvmlx reuses the stored KV sharing its longest prefix.

    from kvmlx.runtime.agent import Agent
    agent = Agent(lm)                                        # the default store, $KVMLX_HOME/store
    agent.publish(open("paper.txt").read())                  # once, by anyone, into the store
    out = agent.generate(paper_text + "\\n\\nQuestion: ...")   # no artifact named
    out.reused_tokens, out.prefilled_tokens, out.key, out.text

    caches, suffix, reused = agent.caches_for(prompt_tokens)  # plain mlx-lm caches:
    mlx_lm.stream_generate(lm.model, lm.tokenizer, prompt=suffix, prompt_cache=caches)

How a prompt is served: tokenize it as the model's tokenizer does (special tokens included, like
`kvmlx.runtime.publish` tokenizes documents), ask the store for the artifact of this model, tokenizer and
dtype sharing the longest token prefix, load it, trim it to the shared prefix, prefill the rest in
the artifact's chunk size and decode greedily. At least one prompt token is always computed, except
when the prompt *is* an artifact's whole document: then the artifact's stored last logits give the
first token with no model call. Without a match the whole prompt is prefilled.

Everything the agent computes (each prompt, each continuation it decodes) goes into the store's prefix
cache (`kvmlx.runtime.prefix`, docs/STORE.md): the next prompt reuses the deeper of the published match
and the cached prefix, so a conversation's next turn prefills only the new turn, in this process or
any other.

Chat: `chat_prefix_tokens(lm, document, system)` is the token prefix of a templated conversation
[system?, user: document + "\\n\\n" + question] that does not depend on the question; publish it
(`agent.publish(document, chat=True)`) and any `chat_prompt_tokens(lm, document, question)` reuses it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..artifact.identity import model_fingerprint, tokenizer_fingerprint
from ..caches import KVQuantization
from ..caches.quantized import apply as apply_quantization
from ..errors import KvmlxError, TrustError
from ..models import LoadedModel
from .generate import (
    DEFAULT_MAX_TOKENS,
    Generation,
    compare,
    decode_timed,
    from_scratch,
)
from .distributed import check_parallel_support, gather, running_layout
from .load import LoadedKV, load_artifact
from .prefix import PrefixCache, PrefixCacheError
from .publish import DEFAULT_CHUNK, auto_checkpoint_every, prefill
from .restore import caches_at
from .store import BLOCK, Entry, Store, StorePublish
from .store.keys import kv_variant

TokenFn = Callable[[int], None]
CHAT_SEPARATOR = "\n\n"  # between the document and the question inside the user turn
# Question openings of different character classes: the chat prefix is what all their renders share,
# so a boundary merge (a BPE token spanning the document's end and the question) is never published.
CHAT_PROBES = ("What", "what is it?", " why", "Why?", "1", "42.", "?", "\n", "\tx", "Q:", "(a)", "[1]", "-", "'", '"',
               ".", "#", "<", "Ü", "é", "中文", "🙂", " ", "  ")
MAX_LOAD_ATTEMPTS = 5


def blend_settings(value):
    """`BlendSettings.of(value)` (runtime/blend.py), importing blending only when it is asked for."""
    if value is None or value is False:
        return None
    from .blend import BlendSettings

    return BlendSettings.of(value)


class ChatTemplateError(KvmlxError):
    """The model's tokenizer has no chat template, or the template gives no question-independent prefix."""


@dataclass
class Reuse:
    """A prompt's caches, ready for its suffix: unpacks as `caches, suffix_tokens, reused`."""

    caches: list
    suffix_tokens: list[int]
    reused: int  # prompt tokens whose KV came from the store (the caches' offset)
    entry: Entry | None = None  # the store entry used, None without a match
    matched: int = 0  # tokens the prompt shares with the entry (reused can be one less: see module doc)
    logits: mx.array | None = None  # the entry's stored last logits, set only when suffix_tokens is empty
    chunk_size: int = DEFAULT_CHUNK  # prefill the suffix in this chunk size (the artifact's)
    load_seconds: float = 0.0
    load_path: str | None = None
    quarantined: list[dict] = field(default_factory=list)  # entries that failed to load: {"key", "reason", "path"}
    tiers: dict = field(default_factory=dict)  # reused tokens by where they came from: published, memory, disk
    written: list = field(default_factory=list)  # prefix-cache writes of this prompt (kvmlx.runtime.prefix.Saved)
    base: tuple | None = None  # (key, tokens) of the published entry the prompt's cached KV continues

    def __iter__(self):
        return iter((self.caches, self.suffix_tokens, self.reused))

    @property
    def key(self) -> str | None:
        return self.entry.key if self.entry else None


@dataclass
class AgentGeneration:
    """One greedy continuation of a prompt and what was reused for it."""

    tokens: list[int]
    text: str
    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    key: str | None
    artifact: str | None
    first_token_seconds: float  # from the call to the first generated token (lookup, load, prefill)
    total_seconds: float
    load_seconds: float
    chunk_size: int
    artifact_bytes: int = 0
    logits: list[np.ndarray] = field(default_factory=list, repr=False)  # float32 rows, if kept
    quarantined: list[dict] = field(default_factory=list)  # store entries that failed to load on the way
    tiers: dict = field(default_factory=dict)  # reused tokens by tier: published, memory, disk
    cache_written: dict = field(default_factory=dict)  # what this run left in the prefix cache

    def to_json(self) -> dict:
        return {
            "text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens, "prefilled_tokens": self.prefilled_tokens,
            "key": self.key, "artifact": self.artifact, "artifact_bytes": self.artifact_bytes,
            "load_seconds": self.load_seconds, "first_token_seconds": self.first_token_seconds,
            "total_seconds": self.total_seconds, "chunk_size": self.chunk_size, "quarantined": self.quarantined,
            "reused_by_tier": self.tiers, "cache_written": self.cache_written,
        }


@dataclass
class AgentVerification:
    """Automatic reuse against prefilling the same prompt from scratch (tokens and logits).

    The headline fields compare with the same split (the reused part, then the rest, each in the
    artifact's chunk size: docs/FORMAT.md's "same chunking"); `plain` compares with prefilling the
    whole prompt in that chunk size from position 0, what an agent without a store would run.
    """

    token_exact: bool
    tokens_compared: int
    max_abs_logit_diff: float
    logits_identical: bool
    first_mismatch: int | None
    reuse: AgentGeneration
    scratch: Generation
    plain: dict
    single_pass: dict | None = None

    def to_json(self) -> dict:
        out = {
            "token_exact": self.token_exact, "tokens_compared": self.tokens_compared,
            "max_abs_logit_diff": self.max_abs_logit_diff, "logits_identical": self.logits_identical,
            "first_mismatch": self.first_mismatch, "reused_tokens": self.reuse.reused_tokens,
            "prefilled_tokens": self.reuse.prefilled_tokens, "prompt_tokens": self.reuse.prompt_tokens,
            "key": self.reuse.key, "artifact": self.reuse.artifact, "artifact_bytes": self.reuse.artifact_bytes,
            "load_seconds": self.reuse.load_seconds, "prefill_seconds": self.scratch.first_token_seconds,
            "reuse_first_token_seconds": self.reuse.first_token_seconds,
            "speedup_first_token": self.scratch.first_token_seconds / max(self.reuse.first_token_seconds, 1e-9),
            "plain": self.plain, "tokens": self.reuse.tokens, "reference_tokens": self.scratch.tokens,
        }
        if self.single_pass is not None:
            out["single_pass"] = self.single_pass
        return out


class Agent:
    """Generate from prompts, reusing whatever KV in `store` matches the start of each prompt.

    `min_reuse_tokens` (default one block, 16): shorter matches are not worth loading an artifact
    (a store of chat prefixes shares `<|im_start|>...` with every templated prompt). A stored document
    whose caches cannot be trimmed (recurrent state, a wrapped sliding window) is reused from its
    deepest state checkpoint at or below the shared prefix. `kv_quant`: mlx-lm's `--kv-bits` settings;
    only KV published with the same settings is reused, and prefill and decode quantize as mlx-lm does.

    `cache` (default True): the store's prefix cache (`kvmlx.runtime.prefix.PrefixCache`, or one made with
    its defaults): every prompt this agent prefills, and every continuation it decodes, is kept there
    and reused by the next prompt sharing it, from this agent, a server or another process; the deeper
    of a published match and a cached one wins. False: published KV only. Under mlx.launch it is off.
    """

    def __init__(
        self,
        lm: LoadedModel,
        store: Store | str | os.PathLike | None = None,
        *,
        min_reuse_tokens: int = BLOCK,
        chunk_size: int | None = None,
        verify_digests: bool = True,
        load_path: str = "auto",
        allow_lossy: bool = False,
        require_signed: bool = False,
        trust_list=None,
        kv_quant: KVQuantization | None = None,
        cache: PrefixCache | bool = True,
        blend=None,
    ):
        check_parallel_support(lm, kv_quant=kv_quant)  # under mlx.launch: plain KV only
        # documents anywhere in the prompt, approximate (runtime/blend.py): None (exact, the default), R or settings
        self.blend = blend_settings(blend)
        self.lm = lm
        self.kv_quant = kv_quant  # mlx-lm's --kv-bits settings this agent runs with (only KV computed with them matches)
        self.store = store if isinstance(store, Store) else Store(store)
        self.min_reuse_tokens = max(1, min_reuse_tokens)
        self.chunk_size = chunk_size  # for prompts with no match (default DEFAULT_CHUNK)
        self.verify_digests = verify_digests
        self.load_path = load_path
        self.allow_lossy = allow_lossy  # reuse quantised (lossily encoded) KV too: faster, no longer exact
        self.require_signed, self.trust_list = require_signed, trust_list  # accepted publishers (kvmlx.artifact.trust)
        self.layout = running_layout(lm)  # under mlx.launch, only KV published under this sharding is reused
        self.last_reuse: Reuse | None = None
        self.cache_off: str | None = None  # why there is no prefix cache, when there is none
        if cache is True:
            try:
                cache = PrefixCache(lm, self.store.root, kv_quant=kv_quant)
            except PrefixCacheError as e:
                cache, self.cache_off = None, str(e)
        self.cache: PrefixCache | None = cache or None

    # ---- identity and tokens --------------------------------------------------------------------

    @property
    def identity(self) -> tuple[str, str, str]:
        """(model fingerprint, tokenizer fingerprint, KV variant): what a stored artifact must match (the
        variant is the dtype, plus the `--kv-bits` settings when the agent quantizes its KV), and `layout`."""
        return (model_fingerprint(self.lm), tokenizer_fingerprint(self.lm),
                kv_variant(self.lm.dtype, self.kv_quant.to_json() if self.kv_quant else None))

    def encode(self, prompt: str) -> list[int]:
        """A full prompt's token ids, special tokens added as the tokenizer adds them (as publish does)."""
        return list(self.lm.tokenizer.encode(prompt))

    def _tokens(self, prompt: str | Sequence[int]) -> list[int]:
        tokens = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise ValueError("the prompt is empty")
        return tokens

    def lookup(self, prompt: str | Sequence[int]) -> tuple[Entry, int] | None:
        """The store entry sharing the longest prefix with the prompt, and the shared length."""
        return self.store.lookup(*self.identity, self._tokens(prompt), min_tokens=self.min_reuse_tokens,
                                 exact_only=not self.allow_lossy, layout=self.layout)

    # ---- caches ---------------------------------------------------------------------------------

    def caches_for(self, prompt: str | Sequence[int], *, allow_empty_suffix: bool = False) -> Reuse:
        """mlx-lm caches holding the longest stored prefix of the prompt, and the tokens still to run.

        The suffix is never empty unless `allow_empty_suffix` and the prompt is exactly a stored
        document (then `logits` holds the stored next-token logits). An entry that fails to load
        (removed meanwhile, corrupt) is taken out of service and the next best match is used.
        """
        tokens = self._tokens(prompt)
        n = len(tokens)
        excluded: list[str] = []
        quarantined: list[dict] = []
        cached = self.cache.match(tokens[: n - 1]) if self.cache else 0  # reads no record
        for _ in range(MAX_LOAD_ATTEMPTS):
            match = self.match(tokens, excluded, allow_empty_suffix=allow_empty_suffix)
            if match is None:
                break
            entry, matched, reuse = match
            base, more = self.continuation(tokens, entry, reuse)
            if max(reuse, more) <= cached:
                break  # the prefix cache alone goes at least as deep: use it
            loaded = self.load_entry(entry, tokens, reuse, quarantined=quarantined)
            if loaded is None:
                excluded.append(entry.key)
                continue
            self.store.record_load(entry.key, loaded)  # its use (LRU), and its identity if this load hashed it
            # trimming only moves each cache's offset back (the overlap path's layers may still be arriving);
            # caches that cannot be trimmed come from the state checkpoint at `reuse`
            caches = caches_at(loaded, reuse, copy=False)
            total, tiers, seconds = reuse, {"published": reuse}, 0.0
            if more > reuse:
                loaded.wait()
                caches, total, tiers, seconds = self.extend(tokens, base, caches)
            r = Reuse(caches, tokens[total:], total, entry, matched, loaded.logits if total == n else None,
                      entry.chunk_size, loaded.load_seconds + seconds, loaded.load_path, quarantined, tiers, base=base)
            self.last_reuse = r
            return r
        chunk = self.chunk_size or DEFAULT_CHUNK
        restored = self.cache.fetch(tokens, limit=n - 1, min_tokens=self.min_reuse_tokens) if cached else None
        if restored is not None:
            r = Reuse(restored.caches, tokens[restored.tokens:], restored.tokens, None, restored.tokens, None, chunk,
                      restored.seconds, "cache", quarantined, restored.tiers)
        else:
            r = Reuse(make_prompt_cache(self.lm.model), tokens, 0, None, 0, None, chunk, quarantined=quarantined)
        self.last_reuse = r
        return r

    def continuation(self, tokens: Sequence[int], entry: Entry, reuse: int) -> tuple[tuple | None, int]:
        """(base, depth): when `reuse` is the whole published `entry` and the prompt goes on, what this
        prompt computes after it is cached as the entry's continuation (`base`: its key and length), and
        `depth` is how far the prompt cached after it reaches (0: nowhere); else (None, 0)."""
        n = len(tokens)
        if self.cache is None or reuse != entry.num_tokens or reuse >= n:
            return None, 0
        base = (entry.key, reuse)
        return base, self.cache.match(tokens[: n - 1], base)

    def extend(self, tokens: Sequence[int], base: tuple, caches: list) -> tuple[list, int, dict, float]:
        """(caches, reused, tiers, seconds): the published entry's `caches` followed by its cached
        continuation up to the prompt's last token; the entry's caches alone if that cannot be read."""
        restored = self.cache.fetch(tokens, limit=len(tokens) - 1, base=base, base_caches=caches)
        if restored is None:
            return caches, base[1], {"published": base[1]}, 0.0
        return restored.caches, restored.tokens, {"published": base[1], **restored.tiers}, restored.seconds

    def match(self, tokens: Sequence[int], excluded: Sequence[str], *, allow_empty_suffix: bool = True):
        """(entry, matched, reuse) for the best store entry not in `excluded`, or None.

        `reuse` is how many prompt tokens the entry supplies: all of them only when the prompt is exactly
        the stored document (its stored logits give the next token), else at least one token is left to
        run; for a document with state checkpoints, the deepest restorable position at or below that.
        """
        hit = self.store.lookup(*self.identity, tokens, exclude=excluded, min_tokens=self.min_reuse_tokens,
                                exact_only=not self.allow_lossy, layout=self.layout)
        if hit is None:
            return None
        entry, matched = hit
        n = len(tokens)
        if matched < n:
            reuse = matched
        elif allow_empty_suffix and entry.num_tokens == n:
            reuse = n  # the whole prompt is the whole document: its stored logits are valid
        else:
            reuse = n - 1  # the stored logits belong to a longer document: run the last token
        reuse = entry.deepest(reuse)
        return (entry, matched, reuse) if reuse >= self.min_reuse_tokens else None

    def load_entry(self, entry, tokens: Sequence[int], reuse: int, *, load_path: str | None = None,
                   all_checkpoints: bool = False, quarantined: list[dict] | None = None) -> LoadedKV | None:
        """Load a store entry for `tokens[:reuse]` (with the state checkpoint at `reuse`, or with
        `all_checkpoints` every one), or None when it cannot serve: a publisher this agent does not
        accept (skipped), or a file that fails to load or disagrees with the index (quarantined, and
        reported in `quarantined` as {"key", "reason", "path"})."""
        try:
            loaded = load_artifact(entry.path, self.lm, verify_digests=self.verify_digests,
                                   load_path=load_path or self.load_path, require_exact=not self.allow_lossy,
                                   require_signed=self.require_signed, trust_list=self.trust_list,
                                   kv_quant=self.kv_quant, at=None if all_checkpoints else reuse,
                                   verified=self.store.verified_identity(entry.key))
            if loaded.tokens[:reuse] != list(tokens[:reuse]):
                raise KvmlxError(f"store entry {entry.key[:12]}: file tokens differ from the index")
        except TrustError:
            loaded = None
        except (KvmlxError, OSError) as e:
            loaded = None
            reason = f"load failed: {e}"
            moved = self.store.discard(entry.key, reason)
            if quarantined is not None:
                quarantined.append({"key": entry.key, "reason": reason, "path": str(moved) if moved else None})
        if self.layout is not None:  # the ranks go on together: an entry any rank could not load serves none
            if not all(row[0] for row in gather(self.lm, [loaded is not None], what="loading a store entry")):
                return None
        return loaded

    def _start(self, prompt: str | Sequence[int]) -> tuple[Reuse, mx.array]:
        tokens = self._tokens(prompt)
        r = self.caches_for(tokens, allow_empty_suffix=True)
        if not r.suffix_tokens:
            return r, r.logits
        on_chunk = None
        if self.cache is not None and self.cache.snap:  # state snapshots at the auto spacing inside long prompts
            every, last = [None], [r.reused]

            def on_chunk(done: int) -> None:
                at = r.reused + done
                every[0] = every[0] or auto_checkpoint_every(r.caches, self.cache.snap, r.chunk_size, self.kv_quant)
                if done < len(r.suffix_tokens) and at - last[0] >= every[0]:
                    r.written.append(self.cache.save(tokens[:at], r.caches, base=r.base))
                    last[0] = at
        logits = prefill(self.lm.model, r.suffix_tokens, r.caches, r.chunk_size, quant=self.kv_quant, on_chunk=on_chunk,
                         split_last=True)
        return r, logits

    def _save_prompt(self, tokens: list[int], r: Reuse) -> None:
        """The prompt's KV (what the next turn shares), once its first token is out (not in its latency)."""
        if self.cache is not None and r.suffix_tokens:
            r.written.append(self.cache.save(tokens, r.caches, base=r.base))

    def _keep(self, prompt: list[int], generated: list[int], r: Reuse) -> dict:
        """After decoding: keep the conversation so far (the last token was never run) in the prefix cache;
        what this prompt wrote there, in all."""
        if self.cache is None:
            return {}
        if r.suffix_tokens or generated[:-1]:  # (what is stored already is skipped: nothing is written twice)
            r.written.append(self.cache.save(prompt + generated[:-1], r.caches, base=r.base))
        return {"records": sum(w.records for w in r.written), "bytes": sum(w.bytes for w in r.written),
                "tokens": sum(w.tokens for w in r.written), "seconds": sum(w.seconds for w in r.written)}

    # ---- generation -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        on_token: TokenFn | None = None,
        stop_at_eos: bool = True,
        keep_logits: bool = False,
        blend=None,
    ) -> AgentGeneration:
        """Greedy continuation of a full prompt (text, or token ids), reusing the longest stored prefix.

        `blend` (this call; default: the agent's): reuse published documents anywhere in the prompt,
        recomputing a fraction R of their tokens (runtime/blend.py); approximate unless R = 1.
        """
        settings = self.blend if blend is None else blend_settings(blend)
        if settings is not None:
            from .blend import blend_generate

            return blend_generate(self, prompt, settings, max_tokens=max_tokens, on_token=on_token,
                                  stop_at_eos=stop_at_eos, keep_logits=keep_logits)
        t0 = time.perf_counter()
        prompt = self._tokens(prompt)
        n = len(prompt)
        r, logits = self._start(prompt)
        first = [True]

        def token(t: int) -> None:
            if on_token:
                on_token(t)
            if first[0]:  # the caches still hold exactly the prompt
                first[0] = False
                self._save_prompt(prompt, r)

        gen = decode_timed(self.lm, r.caches, logits, max_tokens, started=t0, reused=r.reused,
                           prefilled=len(r.suffix_tokens), stop_at_eos=stop_at_eos, on_token=token,
                           keep_logits=keep_logits, quant=self.kv_quant)
        written = self._keep(prompt, gen.tokens, r)
        return AgentGeneration(
            tokens=gen.tokens, text=self.lm.tokenizer.decode(gen.tokens), prompt_tokens=n, reused_tokens=r.reused,
            prefilled_tokens=len(r.suffix_tokens), key=r.key, artifact=str(r.entry.path) if r.entry else None,
            first_token_seconds=gen.first_token_seconds, total_seconds=gen.total_seconds,
            load_seconds=r.load_seconds, chunk_size=r.chunk_size,
            artifact_bytes=r.entry.file_bytes if r.entry else 0, logits=gen.logits, quarantined=r.quarantined,
            tiers=r.tiers, cache_written=written,
        )

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop_at_eos: bool = True) -> Iterator[int]:
        """Yield greedy token ids one by one; `agent.last_reuse` says what was reused."""
        tokens = self._tokens(prompt)
        r, logits = self._start(tokens)
        eos = set(self.lm.tokenizer.eos_token_ids) if stop_at_eos else set()
        out: list[int] = []
        try:
            for i in range(max_tokens):
                token = int(mx.argmax(logits).item())
                out.append(token)
                yield token
                if i == 0:
                    self._save_prompt(tokens, r)
                if token in eos or i + 1 == max_tokens:
                    return
                logits = self.lm.model(mx.array([[token]]), cache=r.caches)[0, -1]
                apply_quantization(self.kv_quant, r.caches)
        finally:  # also when the caller stops early: what was computed is kept
            self._keep(tokens, out, r)

    def verify(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        single_pass: bool = False,
        on_token: TokenFn | None = None,
    ) -> AgentVerification:
        """Generate with reuse, then prefill the prompt from scratch, and compare tokens and logits.

        Both sides decode exactly `max_tokens` tokens (through EOS).
        """
        tokens = self._tokens(prompt)
        reuse = self.generate(tokens, max_tokens=max_tokens, stop_at_eos=False, keep_logits=True, on_token=on_token)
        k, chunk = reuse.reused_tokens, reuse.chunk_size
        # the reference prefills what was reused as its publisher did, then the rest as a request's suffix
        doc, suffix = tokens[:k], tokens[k:]
        kw = dict(max_tokens=max_tokens, stop_at_eos=False, keep_logits=True, quant=self.kv_quant)
        scratch = from_scratch(self.lm, doc, suffix, chunk_size=chunk, **kw)
        report = compare(reuse, scratch)
        # without a split (no match, or the whole prompt reused) the reference already is the plain prefill
        plain = dict(report) if not (doc and suffix) else compare(reuse, from_scratch(self.lm, [], tokens, chunk_size=chunk,
                                                                                       **kw))
        extra = None
        if single_pass:
            extra = compare(reuse, from_scratch(self.lm, tokens, [], chunk_size=len(tokens), **kw))
            extra.pop("first_mismatch")
        return AgentVerification(reuse=reuse, scratch=scratch, plain=plain, single_pass=extra, **report)

    # ---- publishing and chat --------------------------------------------------------------------

    def publish(
        self,
        document: str | Sequence[int],
        *,
        chat: bool = False,
        system: str | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        **publish_kwargs,
    ) -> StorePublish:
        """Publish a document into the agent's store (with `chat`, its chat-templated prefix).

        Other keyword arguments (`encoding=`, `sign=`, `force=`, `checkpoint_every=`) go to `Store.publish`;
        the agent's `kv_quant` settings are published with."""
        if chat:
            if not isinstance(document, str):
                raise TypeError("chat=True needs the document as text")
            document = chat_prefix_tokens(self.lm, document, system)
        elif system is not None:
            raise ValueError("system= needs chat=True")
        return self.store.publish(self.lm, document, chunk_size=chunk_size, progress=progress, kv_quant=self.kv_quant,
                                  **publish_kwargs)

    def ask(self, document: str, question: str, *, system: str | None = None, **kwargs) -> AgentGeneration:
        """Generate the assistant's answer to a templated question about `document`."""
        return self.generate(chat_prompt_tokens(self.lm, document, question, system), **kwargs)


def chat_messages(document: str, question: str, system: str | None = None) -> list[dict]:
    """The conversation kvmlx templates: [system?, user: document + "\\n\\n" + question]."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": document + CHAT_SEPARATOR + question}]


def _render(lm: LoadedModel, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"{lm.model_id} has no chat template")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # the rendered text carries its own special tokens (BOS included where the template writes one)
    return list(tok.encode(text, add_special_tokens=False))


def chat_prompt_tokens(lm: LoadedModel, document: str, question: str, system: str | None = None) -> list[int]:
    """Token ids of the templated conversation asking `question` about `document` (ready for the answer)."""
    return _render(lm, chat_messages(document, question, system))


def chat_prefix_tokens(lm: LoadedModel, document: str, system: str | None = None) -> list[int]:
    """The longest token prefix shared by the templated conversation whatever the question.

    Renders the conversation with CHAT_PROBES as questions and keeps their longest common token
    prefix: the system turn, the start of the user turn and the document, cut before any token the
    question could merge with. A question whose first characters still tokenize differently only
    loses reuse of the last few tokens (the lookup matches token ids, never text).
    """
    renders = [np.asarray(_render(lm, chat_messages(document, q, system)), dtype=np.int64) for q in CHAT_PROBES]
    n = min(len(r) for r in renders)
    first = renders[0][:n]
    for r in renders[1:]:
        diff = np.flatnonzero(r[:n] != first)
        n = int(diff[0]) if diff.size else n
        first = first[:n]
    if n == 0:
        raise ChatTemplateError(f"{lm.model_id}'s chat template gives no prefix independent of the question")
    return first.tolist()
