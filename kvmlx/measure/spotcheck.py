"""Spot verification: is this artifact's KV what the model computes from the tokens it claims?

Digests and signatures prove that a file is the one its publisher wrote; they say nothing about
whether the publisher computed it honestly. A publisher could store the KV of other text (or of
another model) under innocent-looking token ids, and the agent would follow it. `spot_check`
recomputes parts of the KV with the agent's own model and compares, exactly on MLX's CPU backend:

- **prefix** (`recompute=N`): prefill the first N tokens from scratch, in the artifact's chunk size as
  the publisher did, and compare every layer's keys and values at positions 0..N-1 (and the stored
  logits row when N covers the whole document). Independent of everything stored. Costs a prefill
  of N tokens.
- **sample** (`sample=K`): recompute from scratch up to K random prefix lengths. Each sampled length l
  needs the KV of every position before it, so it costs a prefill of l tokens; the lengths are
  visited in increasing order, extending one cache, so K samples cost one prefill of the longest
  (on average L·K/(K+1) tokens: most of a full prefill once K is more than a few).
- **probe** (`probe=K`): recompute K random single positions p (always including the last one, which
  also checks the stored logits) *from the stored KV before them*: one forward step of token p over
  the stored positions 0..p-1, compared with the stored KV at p in every layer. One decode step
  each, whatever p is. It checks that the stored KV at p is what the model computes from the claimed
  token at p and the stored KV before it. Layer 0 of p depends only on the token id and the position,
  so a wrong token fails; an edited position fails; and an edit left without recomputing what
  follows also makes the later positions fail (the last one, always probed, attends to it). The
  forgery probes can miss is a *consistent* one: a region [q, r) of forged KV followed by positions
  recomputed honestly on top of it. Only positions in [q, r) fail, so K probes find it with
  probability about 1 - (1 - (r - q)/L)^K, while a from-scratch check (prefix or sample) that
  reaches q finds it for certain.

Nothing here catches a forgery confined to positions no check looked at; only a full recompute
(`recompute=num_tokens`, the cost of the prefill the artifact was meant to save) proves the whole
artifact. See docs/SECURITY.md.

Structure, signature, model binding and every digest are checked first, exactly as
`kvmlx.runtime.load.load_artifact` does; the stored KV compared is the one its copy path loads.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..artifact.format import Artifact
from ..artifact.identity import (
    check_binding,
)
from ..artifact.trust import SignatureStatus, TrustList, check_signature
from ..caches import all_plain
from ..errors import RecomputeMismatchError, UnsupportedModelError
from ..models import LoadedModel
from ..runtime.distributed import open_part, verify_parts
from ..runtime.load import _release, check_tokens_and_logits, read_caches
from ..runtime.publish import prefill

DEFAULT_RECOMPUTE = 64
DEFAULT_PROBE = 8


@dataclass
class Check:
    """One recomputation compared with the stored KV."""

    kind: str  # "prefix", "sample" or "probe"
    start: int  # first position compared
    end: int  # one past the last position compared
    tokens_run: int  # tokens this check ran through the model
    max_abs_diff: float  # largest |recomputed - stored| over keys and values of every layer (nan: non-finite)
    worst: str | None  # the tensor where it occurred
    logits_diff: float | None  # against the stored logits row, when this check reached the last position
    seconds: float
    ok: bool

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "positions": [self.start, self.end], "tokens_run": self.tokens_run,
            "max_abs_diff": _finite(self.max_abs_diff), "worst": self.worst, "logits_diff": _finite(self.logits_diff),
            "seconds": self.seconds, "ok": self.ok,
        }


@dataclass
class SpotCheckReport:
    """Everything `spot_check` checked and what it found."""

    path: str
    num_tokens: int
    file_bytes: int
    kv_dtype: str
    encoding: str
    chunk_size: int
    signature: SignatureStatus
    digests_verified: int  # tensors whose digest was checked (0 with verify_digests=False)
    model: str | None  # the model the KV was bound to and recomputed with (None: no model given)
    tolerance: float
    seed: int
    checks: list[Check] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def tokens_run(self) -> int:
        return sum(c.tokens_run for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict:
        return {
            "artifact": self.path, "ok": self.ok, "num_tokens": self.num_tokens, "file_bytes": self.file_bytes,
            "kv_dtype": self.kv_dtype, "encoding": self.encoding, "chunk_size": self.chunk_size,
            "signature": self.signature.to_json(), "digests_verified": self.digests_verified, "model": self.model,
            "tolerance": self.tolerance, "seed": self.seed, "tokens_run": self.tokens_run,
            "fraction_of_full_prefill": self.tokens_run / self.num_tokens,
            "checks": [c.to_json() for c in self.checks], "seconds": self.seconds,
        }

    def describe(self) -> str:
        """A few human-readable lines."""
        rows = [
            ("structure", f"ok: {self.num_tokens} tokens of {self.kv_dtype} KV ({self.encoding}), {self.file_bytes / 1e6:.2f} MB"),
            ("digests", f"ok: {self.digests_verified} tensors verified" if self.digests_verified else "skipped (--no-verify-digests)"),
            ("signature", self.signature.describe()),
            ("model", f"{self.model}: fingerprint, tokenizer, dtype and geometry match" if self.model else "not checked (no model)"),
        ]
        by_kind: dict[str, list[Check]] = {}
        for c in self.checks:
            by_kind.setdefault(c.kind, []).append(c)
        for kind, checks in by_kind.items():
            worst = max(checks, key=lambda c: -1.0 if c.max_abs_diff == 0 else (math.inf if math.isnan(c.max_abs_diff) else c.max_abs_diff))
            if kind == "sample":
                spans = "prefix lengths " + ", ".join(str(c.end) for c in checks[:8])
            else:
                spans = "positions " + ", ".join(f"{c.start}" if c.end - c.start == 1 else f"{c.start}-{c.end - 1}" for c in checks[:8])
            spans += ", …" if len(checks) > 8 else ""
            verdict = "ok" if all(c.ok for c in checks) else "MISMATCH"
            diff = "0 (bit-exact)" if worst.max_abs_diff == 0 else f"{worst.max_abs_diff:.3g} in {worst.worst}"
            logits = [c.logits_diff for c in checks if c.logits_diff is not None]
            extra = f"; logits max |diff| {max(logits):.3g}" if logits else ""
            rows.append((kind, f"{verdict}: {spans}: max |diff| {diff}{extra}; "
                               f"{sum(c.tokens_run for c in checks)} tokens run in {sum(c.seconds for c in checks):.3f} s"))
        if self.model:
            rows.append(("cost", f"{self.tokens_run} tokens run = {self.tokens_run / self.num_tokens:.1%} of a full prefill "
                                 f"(tolerance {self.tolerance:g}, seed {self.seed})"))
        rows.append(("verdict", "OK" if self.ok else "FAILED: the stored KV is not what this model computes from the claimed tokens"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def raise_if_failed(self) -> None:
        """Raise RecomputeMismatchError (one line) if any recomputation differed beyond the tolerance."""
        if self.ok:
            return
        c = self.failures[0]
        where = f"position {c.start}" if c.end - c.start == 1 else f"positions {c.start}-{c.end - 1}"
        what = f"{c.max_abs_diff:.3g} in {c.worst}" if c.worst else f"logits {c.logits_diff:.3g}"
        raise RecomputeMismatchError(
            f"{os.path.basename(self.path)}: recomputed KV differs from the stored KV ({c.kind} check, {where}: max |diff| "
            f"{what}, tolerance {self.tolerance:g}); it does not encode its claimed tokens with this model"
        )


def spot_check(
    path: str | os.PathLike,
    lm: LoadedModel | None = None,
    *,
    recompute: int = DEFAULT_RECOMPUTE,
    sample: int = 0,
    probe: int = DEFAULT_PROBE,
    probe_at: Sequence[int] = (),
    tolerance: float = 0.0,
    seed: int | None = None,
    verify_digests: bool = True,
    require_signed: bool = False,
    trust_list: TrustList | None = None,
) -> SpotCheckReport:
    """Check an artifact as `load_artifact` does, then recompute parts of its KV with `lm` (see the module doc).

    Structural, digest, signature and binding failures raise their typed errors. Recomputation
    results are in the report (`report.ok`, `report.raise_if_failed()`); `tolerance` is the largest
    accepted absolute difference (0: bit-exact). `probe_at` adds chosen positions to the random probes.
    Without `lm`, only the file itself is checked.
    """
    if recompute < 0 or sample < 0 or probe < 0 or tolerance < 0 or math.isnan(tolerance):
        raise ValueError("recompute, sample, probe and tolerance must be non-negative")
    seed = random.SystemRandom().randrange(1 << 32) if seed is None else seed
    t0 = time.perf_counter()
    art = Artifact(path, populate=True)
    try:
        signature = check_signature(art, require_signed, trust_list)
        h = art.header
        report = SpotCheckReport(
            str(path), h["kv"]["num_tokens"], h["file_bytes"], h["kv"]["dtype"], str(h["kv"].get("encoding", "raw")),
            h["kv"]["chunk_size"], signature, 0, lm.model_id if lm else None, tolerance, seed,
        )
        report.seconds["open"] = time.perf_counter() - t0
        if lm is None:
            t1 = time.perf_counter()
            if verify_digests:
                art.verify_all()
                report.digests_verified = len(art.tensors) + verify_parts(art)  # a manifest's parts found beside it
            report.seconds["digests"] = time.perf_counter() - t1
            return report
        if not all_plain(lm.model) or h.get("caches") is not None:
            raise UnsupportedModelError("recomputing positions supports plain-KV artifacts; for sliding-window, recurrent "
                                        "or quantized KV use `kvmlx generate --verify`")
        art = open_part(art, lm)  # the artifact's parallel layout, or refused by name; under mlx.launch, this rank's part
        h = art.header
        check_binding(h, lm)
        check_tokens_and_logits(h, lm)  # before any prefill: an id past the embedding table reads out of bounds
        t1 = time.perf_counter()
        caches, logits, _ = read_caches(art, verify_digests=verify_digests, headroom=0, load_path="copy")
        report.digests_verified = len(art.tensors) if verify_digests else 0
        report.seconds["load"] = time.perf_counter() - t1
    finally:
        _release(art)

    tokens = list(h["document"]["tokens"])
    n, chunk = len(tokens), h["kv"]["chunk_size"]
    stored = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in caches]
    rng = random.Random(seed)
    t2 = time.perf_counter()
    cache = make_prompt_cache(lm.model)
    done = 0  # positions the from-scratch cache holds
    if recompute:
        done = min(recompute, n)
        report.checks.append(_extend(lm, cache, tokens, 0, done, chunk, stored, logits, tolerance, "prefix"))
    for length in sorted(set(rng.randint(1, n) for _ in range(sample))):
        if length <= done:  # already covered by the prefix or an earlier sample
            report.checks.append(Check("sample", 0, length, 0, 0.0, None, None, 0.0, True))
            continue
        report.checks.append(_extend(lm, cache, tokens, done, length, chunk, stored, logits, tolerance, "sample"))
        done = length
    del cache
    positions = {p for p in probe_at if 0 <= p < n}
    if len(positions) != len(set(probe_at)):
        raise ValueError(f"probe positions must lie in 0..{n - 1}")
    if probe:
        positions |= {n - 1} | set(rng.sample(range(n - 1), min(probe - 1, n - 1)))
    if positions:
        for p in sorted(positions):
            report.checks.append(_probe(lm, tokens, p, stored, logits, tolerance))
    report.seconds["recompute"] = time.perf_counter() - t2
    report.seconds["total"] = time.perf_counter() - t0
    return report


def _extend(lm, cache, tokens, start, end, chunk, stored, logits, tolerance, kind) -> Check:
    """Prefill tokens[start:end] into `cache` on the publisher's chunk grid; compare positions start..end-1."""
    t = time.perf_counter()
    last = None
    pos = start
    while pos < end:  # cut at multiples of `chunk`, as the publisher's prefill did
        stop = min(end, (pos // chunk + 1) * chunk)
        last = prefill(lm.model, tokens[pos:stop], cache, stop - pos, logits=stop == len(tokens))
        pos = stop
    diff, worst = _compare([(c.keys[..., start:end, :], c.values[..., start:end, :]) for c in cache],
                           [(k[..., start:end, :], v[..., start:end, :]) for k, v in stored])
    logits_diff = _diff(last, logits) if end == len(tokens) else None
    ok = _within(diff, tolerance) and (logits_diff is None or _within(logits_diff, tolerance))
    return Check(kind, start, end, end - start, diff, worst, logits_diff, time.perf_counter() - t, ok)


def _probe(lm, tokens, p, stored, logits, tolerance) -> Check:
    """Run token p over the stored KV of positions 0..p-1 and compare the KV it produces at p."""
    t = time.perf_counter()
    cache = []
    for keys, values in stored:
        c = KVCache()
        if p:
            c.keys, c.values, c.offset = keys[..., :p, :], values[..., :p, :], p
        cache.append(c)
    out = lm.model(mx.array([[tokens[p]]]), cache=cache)[0, -1]
    diff, worst = _compare([(c.keys[..., p : p + 1, :], c.values[..., p : p + 1, :]) for c in cache],
                           [(k[..., p : p + 1, :], v[..., p : p + 1, :]) for k, v in stored])
    logits_diff = _diff(out, logits) if p == len(tokens) - 1 else None
    ok = _within(diff, tolerance) and (logits_diff is None or _within(logits_diff, tolerance))
    return Check("probe", p, p + 1, 1, diff, worst, logits_diff, time.perf_counter() - t, ok)


def _compare(recomputed: Sequence[tuple[mx.array, mx.array]], stored: Sequence[tuple[mx.array, mx.array]]) -> tuple[float, str | None]:
    diffs, names = [], []
    for i, ((rk, rv), (sk, sv)) in enumerate(zip(recomputed, stored)):
        for kind, a, b in (("keys", rk, sk), ("values", rv, sv)):
            diffs.append(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))
            names.append(f"layers.{i}.{kind}")
    mx.eval(diffs)
    values = [float(d.item()) for d in diffs]
    worst = max(range(len(values)), key=lambda i: math.inf if math.isnan(values[i]) else values[i])
    value = values[worst]
    return value, (names[worst] if value != 0 else None)


def _diff(a: mx.array, b: mx.array) -> float:
    if a.shape != b.shape:
        return math.inf
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def _within(diff: float, tolerance: float) -> bool:
    return diff <= tolerance  # NaN (a non-finite stored or recomputed value) is never within


def _finite(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return str(x)  # JSON has no nan/inf
