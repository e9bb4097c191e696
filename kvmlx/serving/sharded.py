"""`kvmlx serve` under mlx.launch: rank 0 serves HTTP, every rank runs the same model work on its shard.

As `mlx_lm.server` does in distributed mode: before each engine step, rank 0 sends every rank one
small JSON message (the jobs that arrived, the ids cancelled since, or stop), so all ranks add,
step, cancel and finish the same jobs in the same order, and each sharded forward's collectives pair
up. Only rank 0 has clients: the other ranks' jobs emit nothing. Cancellations take effect at the
next message (never between two ranks' steps); sampling with a temperature gets a seed chosen by
rank 0, so every rank draws the same token; a resident document's size is summed over the ranks, so
the pool's LRU evicts the same documents everywhere.
"""

from __future__ import annotations

import queue
import secrets
import time
from dataclasses import asdict, replace

from ..models import LoadedModel
from ..runtime.distributed import gather, share
from ..runtime.store import Store
from .engine import Engine, Job, KVPool, Params, ResidentKV


class ShardedPool(KVPool):
    """A `KVPool` whose documents weigh what all ranks hold of them together (the same on every rank)."""

    def __init__(self, lm: LoadedModel, max_bytes: int | None):
        super().__init__(max_bytes)
        self.lm = lm

    def put(self, r: ResidentKV) -> None:
        r.nbytes = sum(row[0] for row in gather(self.lm, [r.nbytes], what="sizing a resident document"))
        super().put(r)


class ShardedEngine(Engine):
    """The engine of one rank: jobs come from rank 0's queue, shared with every rank before each step.

    Every decision that could differ between ranks is rank 0's and travels in the message: which jobs
    start, which are cancelled, and when a deadline passed (so no rank drops a job on its own clock).
    """

    def __init__(self, lm: LoadedModel, store: Store | None = None, **kwargs):
        super().__init__(lm, store, **kwargs)
        self.pool = ShardedPool(lm, kwargs.get("max_resident_bytes"))
        self.rank = lm.group.rank()
        self._clients: dict[str, Job] = {}  # rank 0: the HTTP layer's jobs by id (their `cancelled` is theirs)
        self._jobs: dict[str, Job] = {}  # every rank: the engine's own copy of each live job, by id

    def _take_jobs(self) -> bool:
        message = share(self.lm, self._message() if self.rank == 0 else None)
        for spec in message["new"]:
            client = self._clients.get(spec["id"])
            job = Job(spec["tokens"], Params(**spec["params"]), client.emit if client else _silent, id=spec["id"])
            self._jobs[job.id] = job
            self.waiting.append(job)
        for job_id, reason in message["cancel"]:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                if reason == "timeout":
                    job.emit("timeout", "the request's deadline passed before it finished")
                job.cancelled.set()
            self._clients.pop(job_id, None)
        live = self._live()
        self._jobs = {i: job for i, job in self._jobs.items() if i in live}
        return not message["stop"]

    def _live(self) -> set[str]:
        jobs = [*self.waiting, *(p.job for p in self.prefilling), *(d.job for d in self.decoding.values()),
                *(d.job for d in self.solo)]
        return {job.id for job in jobs}

    def _message(self) -> dict:
        """Rank 0: the jobs queued since the last step (waiting for one when idle), cancellations
        (a client gone, or its deadline passed), stop."""
        new, stop = [], False
        try:
            while True:
                job = self.inbox.get(block=not self._busy() and not new)
                if job is None:
                    stop = True
                    break
                if job.params.temperature > 0 and job.params.seed is None:  # every rank must draw the same token
                    job.params = replace(job.params, seed=secrets.randbelow(1 << 31))
                self._clients[job.id] = job
                new.append({"id": job.id, "tokens": list(job.tokens), "params": asdict(job.params)})
        except queue.Empty:
            pass
        live, now = self._live(), time.monotonic()
        cancel = [(i, "timeout" if not job.cancelled.is_set() else "cancelled") for i, job in self._clients.items()
                  if i in live and (job.cancelled.is_set() or (job.deadline is not None and now > job.deadline))]
        keep = live | {spec["id"] for spec in new}  # finished jobs' clients are forgotten
        self._clients = {i: job for i, job in self._clients.items() if i in keep}
        return {"new": new, "cancel": cancel, "stop": stop}


def _silent(kind: str, payload) -> None:
    """Ranks other than 0 have no client to answer."""


def serve_sharded(lm: LoadedModel, store: Store | str | None = None, **kwargs) -> None:
    """Rank 0: the OpenAI-compatible server (`kvmlx.serving.openai.serve`) over a `ShardedEngine`.
    Other ranks: the same engine without HTTP, following rank 0 until it stops."""
    from .openai import serve

    if lm.group.rank() == 0:
        serve(lm, store, engine_class=ShardedEngine, **kwargs)
        return
    keys = ("max_resident_bytes", "min_reuse_tokens", "verify_digests", "allow_lossy", "kv_quant", "max_batch", "max_queued")
    ShardedEngine(lm, store, **{k: kwargs[k] for k in keys if k in kwargs}, request_timeout=None)._loop()
