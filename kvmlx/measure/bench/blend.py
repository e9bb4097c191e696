"""`kvmlx bench --blend`: position-independent reuse against full prefill, on a real model.

Documents are cut from kvmlx/data/corpus.txt (consecutive paragraphs, `doc_tokens` long), published
once each (their own token ids, as a publisher would, so each starts at position 0 of its artifact).
Each prompt is the model's chat template around a system prompt and a user turn holding 3-6 of them
in a random order, then a question about one: the documents sit at offsets they were not computed at.
For every prompt: full prefill (the reference), then a blended prefill for every rule and R, each
decoding `answer_tokens` greedy tokens. Per (rule, R): the share of prompts whose greedy answer is
identical to the reference's, the first divergence position (answer_tokens when identical), the KL
divergence KL(full || blended) of the first answer token's distribution, and the time to the first
token (lookup, load, re-rotation and compute, from the prompt's tokens). R = 1.0 recomputes every
token whatever the rule, so it runs once per prompt (rule `all`).

Rows are appended to `rows_path` (JSON lines) as they come, so an interrupted run keeps its prompts;
run again with the same file and settings, it goes on from the prompts it lacks (the plan is a
function of the settings and the seed; a file from another plan is refused), and `summarize_blend`
rebuilds the summary from such a file.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...models import LoadedModel, default_corpus
from ...runtime.blend import RULES, BlendSettings, document_index, prepare
from ...runtime.generate import decode_timed, from_scratch
from ...runtime.publish import DEFAULT_CHUNK
from ...runtime.store import Store
from .machine import machine_info

RS = (0.0, 0.05, 0.15, 0.3, 1.0)
SYSTEM = "You are a careful assistant. Answer the question using only the documents the user gives you."
QUESTIONS = ("What is document {k} about? Answer in one sentence.", "Summarize document {k} briefly.",
             "According to document {k}, what is the main point?", "What does document {k} say? Be brief.")
AGREEMENT_TARGET = 0.9
TTFT_TARGET = 2.0


def corpus_documents(lm: LoadedModel, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """`n` documents of `lo`..`hi` tokens: consecutive paragraphs of the corpus, wrapping around."""
    paragraphs = [p.strip() for p in default_corpus().split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(seed)
    docs, i = [], 0
    for _ in range(n * 4):
        target = rng.randint(lo, hi)
        text, tokens = "", []
        while len(tokens) < target:
            text = (text + "\n\n" if text else "") + paragraphs[i % len(paragraphs)]
            i += 1
            tokens = list(lm.tokenizer.encode(text, add_special_tokens=False))
        tokens = tokens[:hi]
        docs.append(tokens)
        if len(docs) == n:
            break
    return docs


def render(lm: LoadedModel, docs: Sequence[Sequence[int]], question: str) -> list[int]:
    """The chat prompt's token ids: system turn, then the documents and the question in the user turn
    (the documents' own token ids are spliced in, separated by "\\n\\n")."""
    tok = lm.tokenizer
    marker = "\x00DOCS\x00"
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": marker + question}],
                                   tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    sep = list(tok.encode("\n\n", add_special_tokens=False))
    out = list(tok.encode(head, add_special_tokens=False))
    for k, d in enumerate(docs):
        out += list(tok.encode(f"Document {k + 1}:\n", add_special_tokens=False)) + list(d) + sep
    return out + list(tok.encode(tail, add_special_tokens=False))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p, q = _softmax(p_logits), _softmax(q_logits)
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


def run_blend_bench(lm: LoadedModel, *, prompts: int = 40, documents: int = 20, per_prompt: tuple[int, int] = (3, 6),
                    doc_tokens: tuple[int, int] = (150, 600), rs: Sequence[float] = RS, rules: Sequence[str] = RULES,
                    answer_tokens: int = 16, chunk_size: int = DEFAULT_CHUNK, seed: int = 0,
                    directory: str | os.PathLike | None = None, rows_path: str | os.PathLike | None = None,
                    shard: tuple[int, int] = (0, 1), progress: Callable[[int, int, str], None] | None = None) -> dict:
    """The benchmark (module docstring); returns the result dict (config, machine, rows, summary).
    `shard` (K, N): only the prompts p with p mod N = K run (one process per core)."""
    rng = random.Random(seed)
    docs = corpus_documents(lm, documents, *doc_tokens, seed=seed)
    plan = []
    for _ in range(prompts):
        chosen = rng.sample(range(len(docs)), rng.randint(*per_prompt))
        plan.append((chosen, rng.choice(QUESTIONS).format(k=rng.randint(1, len(chosen)))))
    kept = _resumed(rows_path, plan)
    todo = [p for p in range(prompts) if p not in kept and p % shard[1] == shard[0]]
    used = sorted({d for p in todo for d in plan[p][0]})
    steps = len(used) + len(todo)
    done = 0
    with tempfile.TemporaryDirectory(prefix="kvmlx-blend-", dir=directory) as tmp:
        store = Store(Path(tmp) / "store")
        t0 = time.perf_counter()
        for d in used:
            store.publish(lm, docs[d], chunk_size=chunk_size)
            done += 1
            if progress:
                progress(done, steps, "publish")
        publish_seconds = time.perf_counter() - t0
        from ...artifact.identity import model_fingerprint, tokenizer_fingerprint

        identity = (model_fingerprint(lm), tokenizer_fingerprint(lm), lm.dtype)
        document_index(store, identity)  # built once, as a server keeps it
        rows = [kept[p] for p in sorted(kept)]
        sink = open(rows_path, "a", encoding="utf-8") if rows_path else None
        try:
            for p in todo:
                chosen, question = plan[p]
                row = _one_prompt(lm, store, identity, [docs[d] for d in chosen], question, rs, rules, answer_tokens,
                                  chunk_size, warm=p == todo[0])
                row.update(prompt=p, documents=chosen)
                rows.append(row)
                if sink:
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                done += 1
                if progress:
                    progress(done, steps, "prompt")
        finally:
            if sink:
                sink.close()
    result = summarize_blend(rows, rs=rs, rules=rules, answer_tokens=answer_tokens)
    result["config"] = {"model": lm.model_id, "dtype": lm.dtype, "prompts": prompts, "resumed_prompts": len(kept),
                        "shard": list(shard),
                        "documents": documents,
                        "documents_used": len(used), "per_prompt": list(per_prompt), "doc_tokens": list(doc_tokens),
                        "rs": list(rs), "rules": list(rules), "answer_tokens": answer_tokens, "chunk_size": chunk_size,
                        "seed": seed, "publish_seconds": publish_seconds}
    result["machine"] = machine_info()
    result["load_average"] = os.getloadavg()
    return result


def _resumed(rows_path, plan) -> dict[int, dict]:
    """{prompt index: row} already in `rows_path` from this same plan (a row of another plan: refused)."""
    if not rows_path or not Path(rows_path).exists():
        return {}
    kept = {}
    for row in load_rows(rows_path):
        p = row.get("prompt")
        if not isinstance(p, int) or p >= len(plan) or row.get("documents") != plan[p][0] \
                or row.get("question") != plan[p][1]:
            raise ValueError(f"{rows_path}: holds rows of another plan (prompt {p}); pick a new --blend-rows file "
                             "or the settings and seed that wrote it")
        kept[p] = row
    return kept


def _one_prompt(lm, store, identity, docs, question, rs, rules, answer_tokens, chunk_size, warm=False) -> dict:
    tokens = render(lm, docs, question)
    ref = from_scratch(lm, tokens, [], chunk_size=chunk_size, max_tokens=answer_tokens, stop_at_eos=False,
                       keep_logits=True)
    row = {"prompt_tokens": len(tokens), "doc_lengths": [len(d) for d in docs], "question": question,
           "full": {"ttft": ref.first_token_seconds, "tokens": ref.tokens}, "runs": []}
    first = warm
    for r in rs:
        for rule in (("all",) if r >= 1.0 else rules):
            settings = BlendSettings(r, "cacheblend" if rule == "all" else rule)
            if first:  # the per-model gate runs once per model (prepare caches it): not inside a timed run
                prepare(lm, store, tokens, BlendSettings(0.0, "epic"), identity=identity, chunk_size=chunk_size)
                first = False
            t0 = time.perf_counter()
            b = prepare(lm, store, tokens, settings, identity=identity, chunk_size=chunk_size)
            gen = decode_timed(lm, b.caches, b.logits, answer_tokens, started=t0, reused=0, prefilled=0,
                               stop_at_eos=False, keep_logits=True)
            diverge = next((i for i, (a, c) in enumerate(zip(gen.tokens, ref.tokens)) if a != c), answer_tokens)
            s = b.stats
            row["runs"].append({
                "rule": rule, "r": r, "ttft": gen.first_token_seconds, "identical": gen.tokens == ref.tokens,
                "first_divergence": diverge, "kl_first": _kl(ref.logits[0], gen.logits[0]),
                "reused": s.reused_tokens, "recomputed": s.recomputed_tokens, "computed": s.computed_tokens,
                "documents_found": len(s.documents), "approximate": s.approximate, "tokens": gen.tokens})
    return row


def summarize_blend(rows: Sequence[dict], *, rs: Sequence[float] = RS, rules: Sequence[str] = RULES,
                    answer_tokens: int = 16) -> dict:
    """Per (rule, R): agreement, first divergence, KL, TTFT and speedup; the default R and the targets."""
    summary = []
    full_ttft = [row["full"]["ttft"] for row in rows]
    for r in rs:
        for rule in (("all",) if r >= 1.0 else rules):
            runs = [(row, x) for row in rows for x in row["runs"] if x["rule"] == rule and x["r"] == r]
            if not runs:
                continue
            summary.append({
                "rule": rule, "r": r, "prompts": len(runs),
                "identical": sum(x["identical"] for _, x in runs) / len(runs),
                "first_divergence_mean": statistics.fmean(x["first_divergence"] for _, x in runs),
                "kl_first_mean": statistics.fmean(x["kl_first"] for _, x in runs),
                "kl_first_median": statistics.median(x["kl_first"] for _, x in runs),
                "ttft_median": statistics.median(x["ttft"] for _, x in runs),
                "speedup_median": statistics.median(row["full"]["ttft"] / max(x["ttft"], 1e-9) for row, x in runs),
                "recomputed_share": sum(x["recomputed"] for _, x in runs) / max(1, sum(x["recomputed"] + x["reused"]
                                                                                     for _, x in runs)),
                "documents_found_mean": statistics.fmean(x["documents_found"] for _, x in runs),
            })
    targets = {}
    for rule in rules:
        reaching = [s for s in summary if s["rule"] in (rule, "all") and s["identical"] >= AGREEMENT_TARGET]
        default = min(reaching, key=lambda s: s["r"]) if reaching else None
        targets[rule] = {"default_r": default["r"] if default else None,
                         "identical_at_default": default["identical"] if default else None,
                         "speedup_at_default": default["speedup_median"] if default else None}
    own = {s["r"]: s["identical"] for s in summary if s["rule"] == "anchored"}
    cb = {s["r"]: s["identical"] for s in summary if s["rule"] == "cacheblend"}
    both = [r for r in cb if r in own]
    r1 = [x["identical"] for row in rows for x in row["runs"] if x["rule"] == "all"]
    return {"rows": list(rows), "summary": summary, "full_ttft_median": statistics.median(full_ttft) if full_ttft else None,
            "targets": {"agreement": AGREEMENT_TARGET, "speedup": TTFT_TARGET, "by_rule": targets,
                        "anchored_at_least_cacheblend": all(own[r] >= cb[r] for r in both) if both else None,
                        "r1_identical_tokens": all(r1) if r1 else None}}


def format_blend_table(result: dict) -> str:
    """The summary as a Markdown table."""
    lines = ["| rule | R | prompts | identical 16-token answer | first divergence (mean) | KL first token (mean / median) "
             "| TTFT median (s) | speedup vs full | recomputed share |", "|" + "---|" * 9]
    for s in result["summary"]:
        lines.append(f"| {s['rule']} | {s['r']:g} | {s['prompts']} | {100 * s['identical']:.0f}% | "
                     f"{s['first_divergence_mean']:.1f} | {s['kl_first_mean']:.3f} / {s['kl_first_median']:.3f} | "
                     f"{s['ttft_median']:.2f} | {s['speedup_median']:.2f}x | {100 * s['recomputed_share']:.1f}% |")
    if result.get("full_ttft_median") is not None:
        lines.append(f"\nfull prefill TTFT median: {result['full_ttft_median']:.2f} s")
    return "\n".join(lines)


def plot_blend(result: dict, path: str | os.PathLike) -> Path:
    """Agreement and speedup against R, one line per rule."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = {"cacheblend": "tab:blue", "epic": "tab:orange", "anchored": "tab:green"}
    full = [s for s in result["summary"] if s["rule"] == "all"]
    for rule, color in colors.items():
        pts = sorted([s for s in result["summary"] if s["rule"] == rule] + full, key=lambda s: s["r"])
        if not pts:
            continue
        ax1.plot([s["r"] for s in pts], [100 * s["identical"] for s in pts], "o-", color=color, label=rule)
        ax2.plot([s["r"] for s in pts], [s["speedup_median"] for s in pts], "o-", color=color, label=rule)
    ax1.axhline(100 * AGREEMENT_TARGET, color="grey", ls="--", lw=1)
    ax2.axhline(TTFT_TARGET, color="grey", ls="--", lw=1)
    ax2.axhline(1.0, color="black", lw=0.5)
    ax1.set(xlabel="R (share of reused tokens recomputed)", ylabel="identical greedy answer (%)", ylim=(0, 105))
    ax2.set(xlabel="R", ylabel="TTFT speedup vs full prefill (median)")
    ax1.legend()
    fig.suptitle(f"kvmlx bench --blend: {result.get('config', {}).get('model', '')}, "
                 f"{len(result['rows'])} prompts")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Rows written by a (possibly interrupted) run."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["RS", "corpus_documents", "format_blend_table", "load_rows", "plot_blend", "render", "run_blend_bench",
           "summarize_blend"]
