"""`kvmlx bench --agent`: one agent's multi-turn conversation against `kvmlx serve` and `mlx_lm.server`.

The conversation is what a local agent sends: a system prompt and a document (published into the
store with its chat prefix, as `kvmlx publish --chat --system` does), then `turns` turns, each adding
the previous answer and a tool output (`tool_tokens` tokens of the bundled text) with a question.
Every turn is one streaming chat request (greedy, `answer_tokens` tokens). Each server runs it twice:
in **one lifetime** (one process for every turn) and **restarted** before every turn (a new process;
kvmlx keeps its prefix cache on disk, mlx_lm.server starts from nothing). Per turn: time to first
token (TTFT), prompt and cached tokens as each server reports them, and for kvmlx the bytes its
prefix cache wrote and the server's peak RSS. The summary checks the issue's targets: TTFT over turns
2..N against mlx_lm.server's, the restarted speedup, that each turn reused every token computed
before, bytes written against the KV bytes of the conversation's distinct tokens, and the budgets.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import httpx
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ...models import load_model
from ...runtime import prefix
from ...runtime.agent import _render, chat_prefix_tokens
from ...runtime.store import Store
from .machine import machine_info
from .serving import SERVERS, _client, _server, document_text

SYSTEM = ("You are a careful research agent. You read documents and tool outputs, keep track of what you "
          "learned, and answer each question in one or two sentences, citing the part of the text you used.")


def kv_bytes_per_token(lm) -> int:
    """KV bytes one token adds to the layers that grow with the context (plain and quantized KV)."""
    cache = make_prompt_cache(lm.model)
    lm.model(mx.array([[1, 2]]), cache=cache)
    total = 0
    for c in cache:
        keys = getattr(c, "keys", None)
        if isinstance(keys, mx.array) and not hasattr(c, "max_size"):
            total += keys.nbytes // keys.shape[2] + c.values.nbytes // c.values.shape[2]  # per position
    return total


def _peak_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _turn(base: str, name: str, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, text, usage, ids = None, [], None, None
    stream = _client(base).chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                   temperature=0.0, stream=True,
                                                   stream_options={"include_usage": True})
    for ch in stream:
        if ch.choices and ch.choices[0].delta and ch.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            text.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            usage = ch.usage
        ext = (getattr(ch, "model_extra", None) or {}).get("kvmlx")
        if isinstance(ext, dict) and isinstance(ext.get("tokens"), list):
            ids = ext["tokens"]  # kvmlx's final chunk names the generated token ids
    total = time.perf_counter() - t0
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {"ttft": first if first is not None else total, "seconds": total, "text": "".join(text), "ids": ids,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cached_tokens": (getattr(details, "cached_tokens", None) or 0) if details else 0}


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _kvmlx_stats(base: str) -> dict:
    return httpx.get(base + "/v1/kvmlx/stats", timeout=30).json()


def run_agent_bench(model: str = "builtin:small", *, turns: int = 5, doc_tokens: int = 600, tool_tokens: int = 150,
                    answer_tokens: int = 16, servers: tuple[str, ...] = SERVERS, modes: tuple[str, ...] = ("lifetime", "restart"),
                    cache_ram: str | None = None, cache_disk: str | None = None,
                    progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Run the conversation on every server in every mode; a JSON-ready dict with a summary and targets."""
    lm = load_model(model)
    document = document_text(lm, doc_tokens)
    pool = document_text(lm, doc_tokens + tool_tokens * (turns + 1))
    ids = list(lm.tokenizer.encode(pool))
    tools = [lm.tokenizer.decode(ids[doc_tokens + k * tool_tokens: doc_tokens + (k + 1) * tool_tokens]) for k in range(turns)]
    extra = tuple(x for flag, v in (("--cache-ram", cache_ram), ("--cache-disk", cache_disk)) if v for x in (flag, v))
    steps, done = len(modes) * len(servers) * turns, 0
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvmlx-bench-agent-") as tmp:
        store = Store(os.path.join(tmp, "store"))
        pub = store.publish(lm, chat_prefix_tokens(lm, document, SYSTEM))
        for mode in modes:
            for kind in servers:
                prefix.purge(store.root)  # each run starts from the published document alone
                messages = [{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": document + "\n\nQuestion 1: what is this document about?"}]
                rows: list[dict] = []
                server, computed = None, []
                try:
                    for k in range(turns):
                        if server is None or mode == "restart":
                            if server is not None:
                                server.__exit__(None, None, None)
                            info: dict = {}
                            server = _server(kind, model, lm.path, store, tmp, extra, info)
                            base, name, _ = server.__enter__()
                        before = _kvmlx_stats(base) if kind == "kvmlx" else None
                        row = _turn(base, name, messages, answer_tokens)
                        row["turn"] = k + 1
                        prompt_ids = _render(lm, messages)
                        # what this prompt repeats of what the server computed last turn (prompt + answer)
                        row["reusable"] = _common(computed, prompt_ids)
                        computed = prompt_ids + (row.pop("ids") or [])
                        if kind == "kvmlx":
                            after = _kvmlx_stats(base)
                            pc, pc0 = after.get("prefix_cache", {}), before.get("prefix_cache", {})
                            row["bytes_written"] = pc.get("bytes_written", 0) - pc0.get("bytes_written", 0)
                            row["by_tier"] = {t: after["cached_tokens_by_tier"][t] - before["cached_tokens_by_tier"][t]
                                              for t in after["cached_tokens_by_tier"]}
                            row["ram_bytes"], row["disk_bytes"] = pc.get("ram_bytes"), pc.get("disk_bytes")
                            row["ram_budget"], row["disk_budget"] = pc.get("ram_budget_bytes"), pc.get("disk_budget_bytes")
                        row["peak_rss"] = _peak_rss(info["pid"])
                        rows.append(row)
                        messages = messages + [
                            {"role": "assistant", "content": row.pop("text")},
                            {"role": "user", "content": f"Tool output:\n{tools[k]}\n\nQuestion {k + 2}: what changed?"}]
                        done += 1
                        if progress:
                            progress(done, steps, f"{kind} {mode} turn {k + 1}")
                finally:
                    if server is not None:
                        server.__exit__(None, None, None)
                runs.setdefault(mode, {})[kind] = rows
    result = {"mode": "agent", "machine": machine_info(),
              "config": {"model": model, "dtype": lm.dtype, "turns": turns, "doc_tokens": doc_tokens,
                         "published_prefix_tokens": pub.entry.num_tokens, "tool_tokens": tool_tokens,
                         "answer_tokens": answer_tokens, "servers": list(servers), "modes": list(modes),
                         "cache_ram": cache_ram, "cache_disk": cache_disk,
                         "kv_bytes_per_token": kv_bytes_per_token(lm)},
              "runs": runs}
    result["summary"] = summarize_agent(result)
    return result


def summarize_agent(result: dict) -> dict:
    """The issue's targets from the per-turn rows (None where a server or mode was not run)."""
    runs, cfg = result["runs"], result["config"]
    out: dict = {}

    def ttft_after_first(mode, kind):
        rows = runs.get(mode, {}).get(kind)
        return sum(r["ttft"] for r in rows[1:]) if rows and len(rows) > 1 else None

    for mode in runs:
        k, m = ttft_after_first(mode, "kvmlx"), ttft_after_first(mode, "mlx_lm")
        out[mode] = {"kvmlx_ttft_turns_2_n": k, "mlx_lm_ttft_turns_2_n": m,
                     "speedup": m / k if k and m else None}
    rows = runs.get("lifetime", {}).get("kvmlx") or runs.get("restart", {}).get("kvmlx")
    if rows:
        # every turn reuses all the previous turn computed: its prompt and its answer
        # (every token of its prompt that repeats, position for position, a token computed last turn;
        # the last answer token may not have run: it is not counted)
        reuse = [r["cached_tokens"] >= min(r["reusable"], r["prompt_tokens"] - 1) - 1 for r in rows[1:]]
        distinct = rows[-1]["prompt_tokens"] + rows[-1]["completion_tokens"] - cfg["published_prefix_tokens"]
        written = sum(r.get("bytes_written", 0) for r in rows)
        kv = distinct * cfg["kv_bytes_per_token"]
        out["kvmlx"] = {
            "reuses_everything_before": all(reuse) if reuse else None, "per_turn_reuse": reuse,
            "bytes_written": written, "distinct_tokens": distinct, "kv_bytes_of_distinct_tokens": kv,
            "bytes_ratio": written / kv if kv else None,
            "budgets_held": all((r["ram_bytes"] or 0) <= (r["ram_budget"] or 0) and
                                (r["disk_bytes"] or 0) <= (r["disk_budget"] or 0) for r in rows),
            "peak_rss": max((r["peak_rss"] or 0) for r in rows),
        }
    out["targets"] = {
        "lifetime_at_least_1x": (out.get("lifetime", {}).get("speedup") or 0) >= 1.0 if "lifetime" in out else None,
        "restart_at_least_10x": (out.get("restart", {}).get("speedup") or 0) >= 10.0 if "restart" in out else None,
        "reuses_everything_before": out.get("kvmlx", {}).get("reuses_everything_before"),
        "bytes_at_most_1_25x": (out["kvmlx"]["bytes_ratio"] or 99) <= 1.25 if "kvmlx" in out else None,
        "budgets_held": out.get("kvmlx", {}).get("budgets_held"),
    }
    return out


def format_agent_table(result: dict) -> str:
    cfg, runs, s = result["config"], result["runs"], result["summary"]
    lines = [f"kvmlx bench --agent: {cfg['model']} ({cfg['dtype']}), {cfg['turns']} turns, document "
             f"{cfg['doc_tokens']} tokens (published chat prefix {cfg['published_prefix_tokens']}), tool outputs "
             f"{cfg['tool_tokens']}, answers {cfg['answer_tokens']}; load average {result['machine'].get('load_average')}"]
    for mode, by_kind in runs.items():
        lines.append(f"\n{mode}: TTFT s (prompt tokens / cached tokens)")
        kinds = list(by_kind)
        lines.append("turn  reusable" + "".join(f"{k:>28}" for k in kinds) + ("   kvmlx wrote" if "kvmlx" in kinds else ""))
        for i in range(max(len(v) for v in by_kind.values())):
            cells = []
            for k in kinds:
                r = by_kind[k][i] if i < len(by_kind[k]) else None
                cells.append(f"{r['ttft']:8.2f} ({r['prompt_tokens']:>5} / {r['cached_tokens']:>5})" if r else "")
            reusable = by_kind[kinds[0]][i]["reusable"]
            wrote = by_kind.get("kvmlx", [])[i].get("bytes_written") if "kvmlx" in kinds else None
            lines.append(f"{i + 1:>4}  {reusable:>8}" + "".join(f"{c:>28}" for c in cells)
                         + (f"   {wrote / 1e6:8.2f} MB" if wrote is not None else ""))
        m = s.get(mode, {})
        if m.get("speedup"):
            lines.append(f"turns 2..N TTFT: kvmlx {m['kvmlx_ttft_turns_2_n']:.2f} s, mlx_lm.server "
                         f"{m['mlx_lm_ttft_turns_2_n']:.2f} s: {m['speedup']:.1f}x")
    if "kvmlx" in s:
        k = s["kvmlx"]
        lines.append(f"\nkvmlx wrote {k['bytes_written'] / 1e6:.2f} MB for {k['distinct_tokens']} distinct tokens "
                     f"({k['kv_bytes_of_distinct_tokens'] / 1e6:.2f} MB of KV): {k['bytes_ratio']:.2f}x; peak RSS "
                     f"{k['peak_rss'] / 1e6:.0f} MB; budgets held: {k['budgets_held']}")
    lines.append("targets: " + ", ".join(f"{n} {'met' if v else ('missed' if v is not None else 'n/a')}"
                                          for n, v in s["targets"].items()))
    return "\n".join(lines)


def plot_agent(result: dict, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"kvmlx": "-o", "mlx_lm": "--s"}
    for mode, by_kind in result["runs"].items():
        for kind, rows in by_kind.items():
            ax.plot([r["turn"] for r in rows], [r["ttft"] for r in rows], styles.get(kind, "-"),
                    alpha=1.0 if mode == "lifetime" else 0.55,
                    label=f"{'kvmlx serve' if kind == 'kvmlx' else 'mlx_lm.server'}, {mode}")
    ax.set_yscale("log")
    ax.set_xticks(range(1, result["config"]["turns"] + 1))
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (s)")
    cfg = result["config"]
    ax.set_title(f"Agent conversation: {cfg['model']}, {cfg['turns']} turns", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
