"""The serving engine: continuous batching on mlx-lm's `BatchGenerator`, fed from the resident pool
of published KV, on the one worker thread that does all model work.

A request (a `Job`) goes waiting -> prefilling -> decoding:

- **prefilling**: its prompt's token ids are looked up in the store (the agent runtime's rules,
  `kvmlx.runtime.agent.Agent.match`); the matching artifact is loaded once into a resident pool (LRU
  under `max_resident_bytes`) and the request gets its own caches holding the reused prefix from
  `kvmlx.runtime.resident.request_caches` (the one place that knows how a cache family is shared).
  Only the rest of the prompt is prefilled. Each engine step has a budget of one chunk of prefill
  tokens: a long prompt's chunks (the artifact's chunk size) run here one per step, round robin and
  interleaved with the decode steps, so a huge prompt delays everyone else by about one chunk; a
  prompt's last chunk (all of a short suffix) goes into the `BatchGenerator`, which prefills the
  last chunks of one step together in one batched forward. When the prompt *is* the document, the
  stored logits give the first token with no model call. An idle engine given the first request of
  a burst waits (at most `GATHER_SECONDS`) while the HTTP side still reads the others (`arrival`),
  so that the burst is prefilled and decoded together.
- **decoding**: the request's caches go into mlx-lm's `BatchGenerator` (`insert(..., caches=...)`):
  one batched forward per step for every decoding request, mlx-lm's samplers, logits processors and
  stop tokens; mlx-lm merges the caches into its batch cache (a copy), so the shared KV is never written.
  With `--kv-bits` (quantized KV) or caches mlx-lm cannot merge, requests prefill and decode alone, one
  token each per step, as mlx_lm.server serves them unbatched.

Why around `BatchGenerator` and not only through it: its prompt processing has one global step size
and right-pads the prompts it batches to the longest, so a 2-token request joining a 27k-token
prompt's batch would compute a whole padded step, and a long prompt would hold the batch for its
whole length; kvmlx keeps long prefills, their chunk size and the scheduling (fairness, cancellation
between chunks, deadlines) in its own hands, and gives mlx-lm the short, batchable work.

Limits: `max_batch` requests prefill or decode at once; at most `max_queued` requests are accepted
and not yet decoding (beyond that `submit` raises `QueueFull`, HTTP 429), each has a deadline (`request_timeout`), and a cancelled request (its
client went away, or a stop string matched) is dropped before the next step, prefill included.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from contextlib import contextmanager

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import make_prompt_cache

from ..caches import KVQuantization
from ..caches.quantized import apply as apply_quantization
from ..models import LoadedModel
from ..runtime import blend
from ..runtime.agent import MAX_LOAD_ATTEMPTS, Agent
from ..runtime.prefix import PrefixCache
from ..runtime.publish import DEFAULT_CHUNK, auto_checkpoint_every, prefill
from ..runtime.resident import KVPool, ResidentKV, resident_from_loaded  # noqa: F401 (re-exported)
from ..runtime.store import BLOCK, Store
from .jobs import DocStats, Job, QueueFull, _Decode, _Prefill, _Solo  # noqa: F401 (Job, QueueFull re-exported)
from .sampling import Params  # noqa: F401 (re-exported)
from .sampling import logprob_info, make_request_processors, make_request_sampler, sample_first

DEFAULT_MAX_BATCH = 32  # requests prefilling or decoding at once (mlx_lm.server's decode concurrency)
PREFILL_BATCH = 8  # last chunks BatchGenerator prefills in one forward (mlx_lm.server's prompt concurrency)
DEFAULT_MAX_QUEUED = 256  # requests waiting beyond those
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds from arrival to the last token
GATHER_SECONDS = 0.05  # from idle, the longest the first request waits for others still being parsed


class _Float32Logits:
    """The model, with logits cast to float32 before BatchGenerator normalises and samples them:
    argmax over float32 log-probabilities is the argmax of the raw logits (bf16 log-softmax could
    round two distinct logits to a tie and pick another token than the reference's argmax)."""

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs).astype(mx.float32)

    def __getattr__(self, name):
        return getattr(self._model, name)


# ---- the engine -------------------------------------------------------------------------------


class Engine:
    """Owns the model, the store, the resident KV and the BatchGenerator; one worker thread runs them."""

    def __init__(self, lm: LoadedModel, store: Store | None = None, *, max_resident_bytes: int | None = None,
                 min_reuse_tokens: int = BLOCK, verify_digests: bool = True, allow_lossy: bool = False,
                 max_batch: int = DEFAULT_MAX_BATCH, max_queued: int = DEFAULT_MAX_QUEUED,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT, prefill_chunk: int = DEFAULT_CHUNK,
                 kv_quant: KVQuantization | None = None, cache: PrefixCache | bool = True):
        self.lm = lm
        self.agent = Agent(lm, store, min_reuse_tokens=min_reuse_tokens, verify_digests=verify_digests,
                           allow_lossy=allow_lossy, kv_quant=kv_quant, cache=cache)
        self.store = self.agent.store
        self.cache = self.agent.cache  # the prefix cache (None: off); only the engine thread uses it
        if self.cache is not None:
            self.cache.write_in_background()  # its record files are written off the engine thread (prefix/writer.py)
        # caches that cannot be cut need a state snapshot at each prompt's end: such prompts are
        # prefilled here to their end (not inside the BatchGenerator), then join the batch
        self.own_prefill = self.cache is not None and bool(self.cache.snap)
        self.pool = KVPool(max_resident_bytes)
        self.eos = set(lm.tokenizer.eos_token_ids)
        self.max_batch, self.max_queued = max(1, max_batch), max(1, max_queued)
        self.request_timeout, self.prefill_chunk = request_timeout, prefill_chunk
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.prefilling: deque[_Prefill] = deque()
        self.decoding: dict[int, _Decode] = {}
        # mlx-lm batches only caches that can merge, and no --kv-bits (as mlx_lm.server): the rest decode alone
        self.batchable = kv_quant is None and all(hasattr(c, "merge") for c in make_prompt_cache(lm.model))
        self.solo: list[_Solo] = []
        self.bg: BatchGenerator | None = None
        self.docs: dict[str, DocStats] = {}
        self.totals = dict(requests=0, completed=0, cancelled=0, errors=0, rejected=0, timeouts=0, prompt_tokens=0,
                           cached_tokens=0, prefilled_tokens=0, completion_tokens=0)
        self.tiers = {"published": 0, "memory": 0, "disk": 0}  # cached tokens by where they came from
        self.blend_counts: dict[str, int] = {}  # blended requests and their tokens (runtime/blend.py's METRICS)
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.decode_steps = 0
        self.started = time.time()
        self._queued = 0  # submitted and not yet decoding or finished (read by the HTTP thread)
        self._arriving = 0  # requests the HTTP side is reading and tokenizing (`arrival`), not yet submitted
        self._joined = self._skipped = False  # requests joined the batch last step; long prompts sat out
        self._lock = threading.Lock()  # guards the counters read by the HTTP thread
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="kvmlx-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.cache is not None:
            self.cache.flush(timeout=30)  # what finished requests left is on disk for the next process

    def submit(self, job: Job) -> None:
        """Queue a job (from any thread); QueueFull when `max_queued` are already waiting."""
        with self._lock:
            if self._queued >= self.max_queued:
                self.totals["rejected"] += 1
                raise QueueFull(1 + self._queued // self.max_batch)
            self._queued += 1
            self.totals["requests"] += 1
        if job.deadline is None and self.request_timeout:
            job.deadline = time.monotonic() + self.request_timeout
        self.inbox.put(job)

    @contextmanager
    def arrival(self):
        """Around a request's reading and tokenizing; yields `arrived()`, to call just before it is
        submitted (leaving the block calls it too). While any request is arriving, an idle engine holds
        its first job back, at most `GATHER_SECONDS`, so that a burst is admitted, prefilled and decoded
        together rather than one request alone and then the rest (mlx_lm.server gets the same grouping
        by tokenizing every queued request on its generation thread before it steps)."""
        left = [True]

        def arrived() -> None:
            with self._lock:
                if left[0]:
                    left[0] = False
                    self._arriving -= 1

        with self._lock:
            self._arriving += 1
        try:
            yield arrived
        finally:
            arrived()

    def _busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding or self.solo)

    def _loop(self) -> None:
        _ = self.agent.identity  # fingerprint the model on the engine thread, before any request
        self._new_batch()
        while self._take_jobs():
            self._step_all()

    def _take_jobs(self) -> bool:
        """Move queued jobs to `waiting`, blocking only when idle; False once told to stop. From idle,
        the rest of a burst still being read (`arrival`) is waited for, at most `GATHER_SECONDS`."""
        idle, until = not self._busy(), 0.0
        while True:
            if not self._busy():
                job = self.inbox.get()
                until = time.monotonic() + GATHER_SECONDS
            else:
                gather = idle and self._arriving > 0 and time.monotonic() < until
                try:
                    job = self.inbox.get(timeout=0.002) if gather else self.inbox.get_nowait()
                except queue.Empty:
                    if gather:
                        continue
                    return True
            if job is None:
                return False
            self.waiting.append(job)

    def _step_all(self) -> None:
        """One engine step: drop cancelled and expired jobs, decode the batch, then prefill."""
        try:
            self._drop_finished()
            if self.decoding:
                self._decode_step()
            if self.solo:
                self._solo_step()
            self._prefill_step()
        except Exception as e:  # a failed step must not stop the engine: fail what was running
            self._fail_all(f"{type(e).__name__}: {e}")

    def _new_batch(self) -> None:
        self.bg = BatchGenerator(_Float32Logits(self.lm.model), stop_tokens=[[e] for e in self.eos],
                                 completion_batch_size=self.max_batch,
                                 prefill_batch_size=min(PREFILL_BATCH, self.max_batch))

    # -- cancellation, deadlines, failures --

    def _end(self, job: Job, counter: str, *, queued: bool) -> None:
        with self._lock:
            self.totals[counter] += 1
            if queued:
                self._queued -= 1

    def _gone(self, job: Job, queued: bool) -> bool:
        """True (and the job is ended) when its client cancelled it or its deadline passed."""
        if job.cancelled.is_set():
            self._end(job, "cancelled", queued=queued)
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.emit("timeout", "the request's deadline passed before it finished")
            self._end(job, "timeouts", queued=queued)
            return True
        return False

    def _drop_finished(self) -> None:
        self.waiting = deque(j for j in self.waiting if not self._gone(j, queued=True))
        self.prefilling = deque(p for p in self.prefilling if not self._gone(p.job, queued=True))
        self.solo = [d for d in self.solo if not self._gone(d.job, queued=False)]
        gone = [uid for uid, d in self.decoding.items() if self._gone(d.job, queued=False)]
        if gone:
            kept = self.bg.remove(gone, return_prompt_caches=self.cache is not None)
            left = {uid: self.decoding.pop(uid) for uid in gone}
            for uid, (caches, tokens) in kept.items():  # a stop string or a disconnect: what was computed is kept
                d = left.get(uid)
                self._keep(list(tokens), caches, d.base if d else None, job_blend=d.job.blend if d else None)

    def _fail_all(self, message: str) -> None:
        """After an unexpected error: every request in flight gets it, and the batch starts afresh."""
        for d in [*self.decoding.values(), *self.solo]:
            d.job.emit("error", message)
            self._end(d.job, "errors", queued=False)
        self.solo.clear()
        for p in self.prefilling:
            p.job.emit("error", message)
            self._end(p.job, "errors", queued=True)
        self.decoding.clear()
        self.prefilling.clear()
        self._new_batch()

    # -- decoding --

    def _decode_step(self) -> None:
        """BatchGenerator calls until one yields tokens: the batched prefill of the prompts handed to it,
        then one batched decode step for every decoding request; then the prompts that ended are kept."""
        ended: dict = {}
        with self.bg.stats() as st:
            while True:
                prompted, responses = self.bg.next()
                ended.update(self._ended_prompts(prompted))
                if responses or not prompted:
                    break
        with self._lock:
            self.prefill_seconds += st.prompt_time
            self.decode_seconds += st.wall_time - st.prompt_time
            self.decode_steps += st.generation_steps
        for r in responses:
            d = self.decoding.get(r.uid)
            if d is None:
                continue
            if not d.started:
                d.started, self._joined = True, True
            info = logprob_info(r.logprobs, r.token, d.top) if d.logprobs else None
            with self._lock:
                self.totals["completion_tokens"] += 1
            d.job.emit("token", (r.token, info))
            if r.finish_reason is not None:
                d.job.emit("done", r.finish_reason)
                del self.decoding[r.uid]
                self._end(d.job, "completed", queued=False)
                self._keep(list(r.all_tokens), r.prompt_cache, d.base, job_blend=d.job.blend)
        for uid, (caches, tokens) in ended.items():  # after the first tokens went out (finished: kept above)
            if (d := self.decoding.get(uid)) is not None:
                self._keep(list(tokens), caches, d.base, job_blend=d.job.blend)

    def _ended_prompts(self, prompted: list) -> dict:
        """{uid: (caches, tokens)} of the prompts whose prefill in the BatchGenerator just ended (all but
        their last token; copied out now, kept once the step's tokens are out). They go into
        the prefix cache at once, as mlx_lm.server keeps them: requests arriving while these still decode
        reuse them, not only those arriving after they finish. Under concurrent load that is what
        separated the two servers: 16 clients asking the same template of question over one published
        document prefilled 491 tokens in kvmlx against mlx_lm.server's 415 (docs/BENCHMARKS.md)."""
        ended = [r.uid for r in prompted if r.end_of_segment and not r.end_of_prompt and r.uid in self.decoding]
        if not ended or self.cache is None:
            return {}
        caches = self.bg.extract_cache(ended)
        mx.eval([c.state for cs, _ in caches.values() for c in cs])  # copies now: the batch's arrays move on
        return caches

    # -- prefilling --

    def _prefill_step(self) -> None:
        """One step's prefill work, within a budget of `prefill_chunk` tokens (the step's first chunk
        always runs). Waiting jobs are admitted while there is room, ahead of those already prefilling;
        then each prefilling job in turn, at most once: a prompt's last chunk (all of a short suffix)
        goes into the BatchGenerator, which prefills those of one step together in one batched forward
        and starts decoding them; an earlier chunk of a long prompt runs here, alone, in the artifact's
        chunk size, and the job goes to the back (round robin). Right after new requests joined the
        decode batch, long prompts sit out one step, so a short request's first tokens are not held
        behind a long chunk (they never sit out two steps running)."""
        while self.waiting and len(self.prefilling) + len(self.decoding) + len(self.solo) < self.max_batch:
            self.prefilling.appendleft(_Prefill(self.waiting.popleft()))  # new arrivals first
        skip_long, self._joined, self._skipped = self._joined and not self._skipped, False, False
        budget, deferred, unfinished = self.prefill_chunk, [], []
        for _ in range(len(self.prefilling)):
            p = self.prefilling.popleft()
            try:
                if p.caches is None:
                    self._prepare(p)
                left = len(p.suffix) - p.pos
                if left == 0:  # the prompt is the document (or was prefilled here): sample from its logits
                    self._first_token(p)
                    continue
                # unbatched, or a prompt whose end needs a state snapshot: every chunk runs here
                final = left <= p.chunk and self.batchable and not self.own_prefill
                if not final and skip_long:
                    deferred.append(p)
                    self._skipped = True
                    continue
                n = left if final else p.chunk
                if budget < self.prefill_chunk and n > budget:
                    self.prefilling.appendleft(p)  # it would overrun this step: first in the next one
                    break
                budget -= n
                with self._lock:
                    self.totals["prefilled_tokens"] += n
                if final:
                    self._enter_batch(p, p.suffix[p.pos:], p.job.tokens[: len(p.job.tokens) - left])
                    continue
                t0 = time.perf_counter()
                p.logits = prefill(self.lm.model, p.suffix[p.pos: p.pos + n], p.caches, p.chunk,
                                   quant=self.agent.kv_quant, logits=p.pos + n >= len(p.suffix), split_last=True)
                p.pos += n
                with self._lock:
                    self.prefill_seconds += time.perf_counter() - t0
                if p.pos < len(p.suffix):
                    self._snapshot_inside(p)
                    unfinished.append(p)
                else:
                    self._first_token(p)
                    if self.cache is not None:  # the prompt's end (after its first token went out: its
                        # caches join the batch, or decode alone, only from the next step on)
                        self._keep(p.job.tokens, p.caches, p.base, prompt_end=True, job_blend=p.job.blend)
            except Exception as e:  # this request failed (a bad artifact is handled by the agent's rules)
                p.job.emit("error", f"{type(e).__name__}: {e}")
                self._end(p.job, "errors", queued=True)
            if budget <= 0:
                break
        self.prefilling.extendleft(reversed(deferred))
        self.prefilling.extend(unfinished)  # to the back: the others get their chunk first

    def _prepare(self, p: _Prefill) -> None:
        if p.job.blend is not None:
            return self._prepare_blended(p)
        caches, suffix, reused, key, logits, chunk, tiers, base = self.prepare(p.job.tokens)
        p.caches, p.suffix, p.logits, p.chunk, p.reused, p.base = caches, suffix, logits, chunk, reused, base
        with self._lock:
            self.totals["prompt_tokens"] += len(p.job.tokens)
            self.totals["cached_tokens"] += reused
            for tier, n in tiers.items():
                self.tiers[tier] += n
            if key is not None:
                d = self.docs.setdefault(key, DocStats(reused))
                d.requests += 1
                d.tokens_saved += reused
        p.job.emit("start", {"prompt_tokens": len(p.job.tokens), "cached_tokens": reused, "cached_by_tier": tiers,
                             "prefilled_tokens": len(suffix), "key": key, "chunk_size": chunk})

    def _prepare_blended(self, p: _Prefill) -> None:
        """A request with `blend`: published documents anywhere in its prompt, moved to their positions
        and partly recomputed (one long step here), its last token prefilled as any other's. Approximate
        KV: never written to the prefix cache."""
        caches, suffix, stats = blend.request_caches(self.lm, self.store, p.job.tokens, p.job.blend,
                                                      identity=self.agent.identity, chunk_size=self.prefill_chunk,
                                                      on_failed_load=self.store.discard)
        p.caches, p.suffix, p.chunk = caches, suffix, self.prefill_chunk
        with self._lock:
            self.totals["prompt_tokens"] += len(p.job.tokens)
            self.totals["cached_tokens"] += stats.reused_tokens
            blend.count(self.blend_counts, stats)
        p.job.emit("start", {"prompt_tokens": len(p.job.tokens), "cached_tokens": stats.reused_tokens,
                             "prefilled_tokens": len(suffix), "key": None, "chunk_size": self.prefill_chunk,
                             "blend": blend.usage_fields(stats)})

    def _snapshot_inside(self, p: _Prefill) -> None:
        """Inside a long prompt prefilled here: a state snapshot at the `auto` checkpoint spacing."""
        if not self.own_prefill:
            return
        at = p.reused + p.pos
        every = auto_checkpoint_every(p.caches, self.cache.snap, p.chunk, self.agent.kv_quant)
        if at - max(p.snapped, p.reused) >= every:
            self._keep(p.job.tokens[:at], p.caches, p.base, prompt_end=True, job_blend=p.job.blend)
            p.snapped = at

    def _keep(self, tokens: list[int], caches: list, base: tuple | None = None, prompt_end: bool = False,
              job_blend=None) -> None:
        """A request's KV at its prompt's end (prefilled here), or when it leaves the batch (finished or
        cancelled): its prompt and the tokens generated so far, as far as the caches hold them, go into
        the prefix cache. A write that fails is counted, never passed on to the request."""
        if self.cache is None or not caches or job_blend is not None:  # blended KV is approximate: never kept
            return
        if not self.cache.cut:  # no layer says how many tokens it holds: only prompt ends are known
            if not prompt_end:
                return
            n = len(tokens)
        else:
            n = caches[self.cache.cut[0]].offset
        try:
            self.cache.save(tokens[:n], caches, base=base)
        except Exception as e:  # never fail a finished request over its cache write
            self.cache.counters.write_errors += 1
            self.cache.counters.extra["last_write_error"] = f"{type(e).__name__}: {e}"

    def _first_token(self, p: _Prefill) -> None:
        """The first token from the stored logits (no model call) or this engine's prefill, then the
        rest in the batch (or alone, for caches mlx-lm cannot batch)."""
        job, params = p.job, p.job.params
        sampler, processors = make_request_sampler(params), make_request_processors(params)
        token, logprobs = sample_first(p.logits, job.tokens, sampler, processors)
        info = logprob_info(logprobs, token, params.top_logprobs) if params.logprobs else None
        with self._lock:
            self.totals["completion_tokens"] += 1
        job.emit("token", (token, info))
        if token in self.eos and not params.ignore_eos:
            job.emit("done", "stop")
        elif params.max_tokens <= 1:
            job.emit("done", "length")
        elif self.batchable:
            self._enter_batch(p, [token], job.tokens, params.max_tokens - 1, sampler, processors)
            return
        else:
            self.solo.append(_Solo(job, p.caches, sampler, processors, list(job.tokens) + [token], 1, p.base))
            with self._lock:
                self._queued -= 1
            return
        self._end(job, "completed", queued=True)

    def _solo_step(self) -> None:
        """One token for each request decoding alone (mlx-lm's pipeline, one sequence at a time)."""
        for d in list(self.solo):
            t0 = time.perf_counter()
            logits = self.lm.model(mx.array([[d.context[-1]]]), cache=d.caches)[0, -1]
            apply_quantization(self.agent.kv_quant, d.caches)
            token, logprobs = sample_first(logits, d.context, d.sampler, d.processors)
            params = d.job.params
            info = logprob_info(logprobs, token, params.top_logprobs) if params.logprobs else None
            d.context.append(token)
            d.count += 1
            with self._lock:
                self.decode_seconds += time.perf_counter() - t0
                self.decode_steps += 1
                self.totals["completion_tokens"] += 1
            d.job.emit("token", (token, info))
            finish = "stop" if token in self.eos and not params.ignore_eos else (
                "length" if d.count >= params.max_tokens else None)
            if finish:
                d.job.emit("done", finish)
                self.solo.remove(d)
                self._end(d.job, "completed", queued=False)
                self._keep(d.context, d.caches, d.base, job_blend=d.job.blend)

    def _enter_batch(self, p: _Prefill, prompt: list[int], context: list[int], max_tokens: int | None = None,
                     sampler=None, processors=None) -> None:
        """Hand a request to the BatchGenerator: its caches (holding `context`), the prompt tokens still to
        run, its sampler and logits processors (mlx-lm's), EOS as its stop unless `ignore_eos`."""
        params = p.job.params
        if sampler is None:
            sampler, processors = make_request_sampler(params), make_request_processors(params)
        (uid,) = self.bg.insert([list(prompt)], max_tokens=[max_tokens or params.max_tokens], caches=[p.caches],
                                all_tokens=[list(context)], samplers=[sampler], logits_processors=[processors],
                                stop_sequences=[StopSequences()] if params.ignore_eos else None)
        self.decoding[uid] = _Decode(p.job, params.logprobs, params.top_logprobs, base=p.base)
        with self._lock:
            self._queued -= 1

    def prepare(self, tokens: list[int]):
        """(caches, suffix, reused, key, logits or None, chunk size, reused tokens by tier, base): the
        agent runtime's matching rules, with the resident pool for published KV; the prefix cache when it
        holds a deeper prefix, or a continuation of the published one (`base`: that entry's key and length)."""
        n = len(tokens)
        excluded: list[str] = []
        agent = self.agent
        cached = self.cache.match(tokens[: n - 1]) if self.cache is not None else 0  # reads no record
        for _ in range(MAX_LOAD_ATTEMPTS):
            match = agent.match(tokens, excluded)
            if match is None:
                break
            entry, _, reuse = match
            base, more = agent.continuation(tokens, entry, reuse)
            if max(reuse, more) <= cached:
                break
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
            caches, total, tiers = resident.request_caches(reuse), reuse, {"published": reuse}
            if more > reuse:  # the published document, then what earlier requests computed after it
                caches, total, tiers, _ = agent.extend(tokens, base, caches)
            logits = resident.logits if total == n else None
            return caches, tokens[total:], total, entry.key, logits, resident.chunk_size, tiers, base
        restored = self.cache.fetch(tokens, limit=n - 1, min_tokens=agent.min_reuse_tokens) if cached else None
        if restored is not None:
            return (restored.caches, tokens[restored.tokens:], restored.tokens, None, None, self.prefill_chunk,
                    restored.tiers, None)
        return make_prompt_cache(self.lm.model), tokens, 0, None, None, self.prefill_chunk, {}, None

    # -- counters --

    def stats(self) -> dict:
        with self._lock:
            totals = dict(self.totals)
            prefill_s, prefilled = self.prefill_seconds, totals["prefilled_tokens"]
            docs = {k: DocStats(**vars(d)) for k, d in self.docs.items()}
            queued = self._queued
            decode_s, steps = self.decode_seconds, self.decode_steps
            tiers = dict(self.tiers)
            blends = dict(self.blend_counts)
        decoding = len(self.decoding) + len(self.solo)
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
            "model": self.lm.model_id, "uptime_seconds": time.time() - self.started,
            "active_requests": queued + decoding, "queued_requests": queued, "decoding_requests": decoding,
            "max_batch": self.max_batch, "max_queued": self.max_queued,
            **totals, "prefill_seconds": prefill_s, "prefill_tokens_per_second": speed,
            "decode_seconds": decode_s, "decode_steps": steps,
            "compute_seconds_saved": (totals["cached_tokens"] / speed) if speed else None,
            "resident_bytes": sum(r.nbytes for r in resident.values()), "resident_documents": len(resident),
            "max_resident_bytes": self.pool.max_bytes, "documents": documents,
            "cached_tokens_by_tier": tiers, "blend": blends,
            "prefix_cache": self.cache.stats() if self.cache is not None else {"off": self.agent.cache_off or "disabled"},
        }
