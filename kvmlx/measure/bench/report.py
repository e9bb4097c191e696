"""The bench's output: its results as plain-text tables (with the targets met or missed) and as a plot.

`format_table` renders a model- or shape-mode result (reuse vs prefill, loads in every regime,
saves and bytes, the roofline and each path's fraction of it, the targets); `plot` draws time vs
document length with the paper's M1 Pro figures for reference; `format_compression_table` renders
the compression study. Nothing here measures: it reads the JSON-ready results only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .harness import PAPER_M1_PRO


def _dur(stats: dict | None) -> str:
    """'12.3 ms [11.9-13.0]': median and min-max, in ms below a second, else in s."""
    if not stats:
        return "-"
    scale, unit = (1e3, "ms") if stats["median"] < 1 else (1.0, "s")
    fmt = lambda x: f"{x * scale:.3g}" if x * scale < 100 else f"{x * scale:.0f}"  # noqa: E731
    return f"{fmt(stats['median'])} {unit} [{fmt(stats['min'])}-{fmt(stats['max'])}]"


def _num(x: float | None, fmt: str = ".3g", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()  # noqa: E731
    return ["", title, line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_table(result: dict) -> str:
    """The result as plain-text tables: reuse vs prefill, loads, saves and bytes, roofline, targets."""
    m, c, rows = result["machine"], result["config"], result["results"]
    if result["mode"] == "model":
        what = f"{c['model']} ({c['dtype']})"
    else:
        sh = c["shape"]
        what = (f"synthetic {sh['name']} KV ({sh['num_layers']} layers x {sh['num_kv_heads']} KV heads x "
                f"head_dim {sh['head_dim']}, {sh['dtype']}), no model")
    out = [
        f"kvmlx bench: {what}",
        f"machine: {m['cpu']}, {m['cores']} cores, {_num((m['memory_bytes'] or 0) / 2**30, '.0f')} GiB, "
        f"{m['platform']}; MLX {m['versions']['mlx']} on {m['mlx_device']}, mlx-lm {m['versions']['mlx-lm']}, "
        f"kvmlx {m['versions']['kvmlx']}" + (f" ({m['versions']['kvmlx_git']})" if m["versions"]["kvmlx_git"] else ""),
        f"median [min-max] of {c['runs']} runs; load path: {', '.join(sorted({r['load_path'] for r in rows}))}; "
        "GB/s = KV bytes / s",
        "warm = file in page cache, memory already touched; fresh = file in page cache, new memory; "
        "cold = file evicted from page cache",
    ]
    if m.get("load_average"):
        out.append(f"load average at the end (1/5/15 min): {' / '.join(map(str, m['load_average']))}")
    if c["cold_note"]:
        out.append(c["cold_note"])
    ratio = lambda x: _num(x, ".1f", "x")  # noqa: E731
    if result["mode"] == "model":
        out += _table(
            "Prefill vs reuse (reuse = load + one model step over the agent's first suffix token; warm)",
            ["tokens", "prefill", "decode step", "prefill/step", "paper M1 Pro", "kvmlx load+1st", "prefill/that",
             "mlx-lm load+1st", "prefill/that"],
            [[str(r["tokens"]), _dur(r["prefill_s"]), _dur(r["decode_step_s"]), ratio(r["prefill_over_decode_step"]),
              ratio(r["paper_prefill_over_decode_step"]), _dur(r["load_first_token_s"]),
              ratio(r["prefill_over_load_first_token"]), _dur(r["mlx_lm_load_first_token_s"]),
              ratio(r["prefill_over_mlx_lm_load_first_token"])] for r in rows])
        if c["cold"]:
            out += _table(
                "Reuse from a cold file (evicted from the page cache)",
                ["tokens", "kvmlx load+1st", "prefill/that", "mlx-lm load+1st", "prefill/that"],
                [[str(r["tokens"]), _dur(r["load_first_token_cold_s"]), ratio(r["prefill_over_load_first_token_cold"]),
                  _dur(r["mlx_lm_load_first_token_cold_s"]), ratio(r["prefill_over_mlx_lm_load_first_token_cold"])]
                 for r in rows])
        paths = c["load_paths"]
        out += _table(
            "Load paths: load + first token (warm); the first step after a load vs a resident step",
            ["tokens", *[f"{p} load+1st" for p in paths], "first step after load", "resident step", "ratio"],
            [[str(r["tokens"]), *[_dur(r["load_first_token_by_path"][p]) for p in paths],
              _dur(r["first_step_after_load_s"]), _dur(r["decode_step_s"]), _num(r["first_step_over_resident"], ".2f", "x")]
             for r in rows])
    regimes = ("warm", "fresh", "cold") if c["cold"] else ("warm", "fresh")
    out += _table(
        "kvmlx loads: first load of the file (every digest hashed), re-load of it unchanged (checked at first load), "
        "no verification",
        ["tokens", "KV MB", *regimes, *[f"{g} re-load" for g in regimes], *[f"{g} no-verify" for g in regimes]],
        [[str(r["tokens"]), _num(r["kv_bytes"] / 1e6, ".1f"),
          *[_dur(r[f"kvmlx_load_{g}{how}_s"]) for how in ("", "_reload", "_noverify") for g in regimes]] for r in rows])
    out += _table(
        "mlx-lm load_prompt_cache of the same KV, and kvmlx's speedup (mlx-lm time / kvmlx time; first load, re-load)",
        ["tokens", *[f"mlx-lm {g}" for g in regimes], *[f"speedup {g}" for g in regimes],
         *[f"re-load {g}" for g in regimes]],
        [[str(r["tokens"]), *[_dur(r[f"mlx_lm_load_{g}_s"]) for g in regimes],
          *[_num(r.get(f"kvmlx_load_{g}{how}_speedup_vs_mlx_lm"), ".2f", "x") for how in ("", "_reload") for g in regimes]]
         for r in rows])
    if any("kvmlx_load_newproc_s" in r for r in rows):
        out += _table(
            "A new process loading a store entry (spawned; the load only: kvmlx with the store's verified identity)",
            ["tokens", "kvmlx", "digests", "mlx-lm", "speedup"],
            [[str(r["tokens"]), _dur(r["kvmlx_load_newproc_s"]), ",".join(r["kvmlx_load_newproc_digests"]),
              _dur(r["mlx_lm_load_newproc_s"]), _num(r["kvmlx_load_newproc_speedup_vs_mlx_lm"], ".2f", "x")]
             for r in rows if "kvmlx_load_newproc_s" in r])
    out += _table(
        "Saves and bytes (kvmlx: publish's write, fsync included; mlx-lm: save_prompt_cache, then + fsync)",
        ["tokens", "kvmlx save", "GB/s", "mlx-lm save", "+ fsync", "GB/s", "artifact MB", "vs KV", "mlx-lm MB",
         "vs KV"],
        [[str(r["tokens"]), _dur(r["kvmlx_save_s"]), _num(r["kvmlx_save_GBps"], ".2f"), _dur(r["mlx_lm_save_s"]),
          _dur(r["mlx_lm_save_durable_s"]), _num(r["mlx_lm_save_durable_GBps"], ".2f"),
          _num(r["artifact_bytes"] / 1e6, ".2f"), _num(100 * r["artifact_overhead"], "+.2f", "%"),
          _num(r["mlx_lm_file_bytes"] / 1e6, ".2f"), _num(100 * r["mlx_lm_file_overhead"], "+.2f", "%")] for r in rows])
    out += _table(
        "Roofline (GB/s, measured in this run at each KV size)",
        ["tokens", "memcpy", "page-cache read", "cold seq. read", "fsync write"],
        [[str(f["tokens"]), *[_num(f[f"{k}_GBps"], ".2f") for k in ("memcpy", "page_cache_read", "cold_read", "write_fsync")]]
         for f in result["roofline"]])
    out += _table(
        "Each path as a fraction of its ceiling (warm and fresh loads: memcpy; cold: sequential read; saves: write)",
        ["tokens", "kvmlx warm", "fresh", "cold", "save", "mlx-lm warm", "fresh", "cold", "save + fsync"],
        [[str(r["tokens"]), *[_pct(r.get(k)) for k in (
            "kvmlx_load_warm_frac_memcpy", "kvmlx_load_fresh_frac_memcpy", "kvmlx_load_cold_frac_seq_read",
            "kvmlx_save_frac_write", "mlx_lm_load_warm_frac_memcpy", "mlx_lm_load_fresh_frac_memcpy",
            "mlx_lm_load_cold_frac_seq_read", "mlx_lm_save_durable_frac_write")]] for r in rows])
    names = list(dict.fromkeys(t["name"] for t in result["targets"]))
    lengths = [r["tokens"] for r in rows]
    cells = {(t["name"], t["tokens"]): f"{t['value']:.3g} {'ok' if t['met'] else 'MISS'}" for t in result["targets"]}
    goals = {t["name"]: ("paper's" if t["key"] == "prefill_over_load_first_token" else
                         f"{'>=' if t['kind'] == 'min' else '<='} {t['goal']:g}") for t in result["targets"]}
    out += _table("Targets (benchmark figures, not tests)", ["target", "goal", *map(str, lengths)],
                  [[name, goals[name], *[cells.get((name, n), "-") for n in lengths]] for name in names])
    return "\n".join(out)


def plot(result: dict, path: str | os.PathLike) -> Path:
    """A PNG of time vs document length (log-log), with the paper's M1 Pro prefill and decode step for reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's backend
    from matplotlib.figure import Figure

    rows = result["results"]
    x = [r["tokens"] for r in rows]
    fig = Figure(figsize=(8.5, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def series(key: str, label: str, style: str, color: str) -> None:
        points = [(n, r[key]) for n, r in zip(x, rows) if r.get(key)]
        if not points:
            return
        med = np.array([s["median"] for _, s in points])
        spread = [med - [s["min"] for _, s in points], [s["max"] for _, s in points] - med]
        ax.errorbar([n for n, _ in points], med, yerr=spread, fmt=style, color=color, lw=2, ms=5, capsize=3, label=label)

    if result["mode"] == "model":
        series("prefill_s", "prefill (from scratch)", "o-", "black")
        series("decode_step_s", "one decode step over a resident KV", "s-", "tab:gray")
        series("load_first_token_s", "kvmlx load + first token (warm)", "o-", "tab:blue")
        series("load_first_token_cold_s", "kvmlx load + first token (cold)", "o:", "tab:blue")
        series("mlx_lm_load_first_token_s", "mlx-lm load_prompt_cache + first token (warm)", "^-", "tab:orange")
        series("mlx_lm_load_first_token_cold_s", "mlx-lm load_prompt_cache + first token (cold)", "^:", "tab:orange")
        title = f"{result['config']['model']} ({result['config']['dtype']})"
    else:
        series("kvmlx_load_warm_s", "kvmlx load (warm, first load: every digest hashed)", "o-", "tab:blue")
        series("kvmlx_load_warm_reload_s", "kvmlx re-load (warm, digests checked at first load)", "s--", "tab:cyan")
        series("kvmlx_load_cold_s", "kvmlx load (cold)", "o:", "tab:blue")
        series("mlx_lm_load_warm_s", "mlx-lm load_prompt_cache (warm)", "^-", "tab:orange")
        series("mlx_lm_load_cold_s", "mlx-lm load_prompt_cache (cold)", "^:", "tab:orange")
        title = f"synthetic {result['config']['shape']['name']} KV, load only"
    paper = sorted(PAPER_M1_PRO.items())
    ax.plot([n for n, _ in paper], [p for _, (p, _) in paper], "--", color="black", alpha=0.5, label="paper, M1 Pro: prefill")
    ax.plot([n for n, _ in paper], [d for _, (_, d) in paper], "--", color="tab:gray", alpha=0.6,
            label="paper, M1 Pro: one decode step (its reuse metric)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("seconds (median; bars: min-max)")
    m = result["machine"]
    ax.set_title(f"{title}\n{m['cpu']}, {m['cores']} cores, MLX {m['versions']['mlx']} {m['mlx_device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    out = Path(path)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def format_compression_table(result: dict) -> str:
    """The compression study as a readable table."""
    lines = [
        f"kvmlx bench --compression: {result['model']} ({result['dtype']}), {result['tokens']}-token document, "
        f"{result['raw_kv_bytes'] / 1e6:.1f} MB raw KV; best of {result['runs']} runs",
        f"note: {result['note']}",
        "",
        f"{'encoding':<15} {'lossless':>8} {'bit-exact':>9} {'B/token':>9} {'ratio':>6} {'enc GB/s':>8} {'dec GB/s':>8} "
        f"{'tokens':>7} {'max |dlogit|':>12}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['encoding']:<15} {str(r['lossless']):>8} {str(r['decoded_bit_exact']):>9} {r['bytes_per_token']:>9.0f} "
            f"{r['ratio_to_raw']:>6.3f} {_gbs(r['encode_gb_s']):>8} {_gbs(r['decode_gb_s']):>8} "
            f"{r['tokens_agree']:>3}/{r['tokens_compared']:<3} {r['max_abs_logit_diff']:>12.4g}"
        )
    return "\n".join(lines)


def _gbs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_family_table(result: dict) -> str:
    """The families table: per model, bytes per token, checkpoint overhead, load vs mlx-lm, exactness."""
    rows = []
    for r in result["rows"]:
        q = r["kv_quantization"]
        name = r["model"] + (f" --kv-bits {q['bits']}" if q else "")
        families = "+".join(sorted({g["family"] for g in r["groups"]}))
        ckpt = (f"{r['checkpoint_overhead'] * 100:.0f}% every {r['checkpoint_every']}" if r["checkpoint_every"] else "none needed")
        exact = "yes" if r["token_exact"] and r["max_abs_logit_diff"] == 0 else "NO"
        if r["prefix_token_exact"] is not None:
            exact += f"; from {r['prefix_reused']}: " + ("yes" if r["prefix_token_exact"] and not r["prefix_max_abs_logit_diff"] else "NO")
        rows.append([name, families, f"{r['state_bytes_per_token']:.0f}", f"{r['artifact_bytes_per_token']:.0f}", ckpt,
                     f"{r['load_seconds']['median'] * 1e3:.2f} / {r['first_load_seconds']['median'] * 1e3:.2f}",
                     f"{r['mlx_lm_load_seconds']['median'] * 1e3:.2f}",
                     f"{1 / max(r['load_ratio'], 1e-9):.2f}x", exact])
    lines = _table(f"cache families ({result['tokens']}-token document; medians of warm loads; speed: mlx-lm's "
                   "re-load time / kvmlx's)",
                   ["model", "families", "state B/tok", "file B/tok", "checkpoints", "load ms (re/first)", "mlx-lm ms", "speed",
                    "token-exact"], rows)
    for r in result["rows"]:
        if r["spacings"]:
            lines.append(f"  {r['model']}: checkpoint spacing -> overhead (mean tokens recomputed): " + ", ".join(
                f"{e}: {s['overhead'] * 100:.0f}% ({s['mean_recompute_tokens']:.0f})" for e, s in r["spacings"].items()))
        for g in r["groups"]:
            if g["family"] == "rotating":
                lines.append(f"  {r['model']} layers {g['layers']}: window {g['window']}: window checkpoints "
                             f"{g['checkpoint_bytes']} B vs every position's KV {g['every_position_bytes']} B")
    return "\n".join(lines)


def plot_families(result: dict, path: str | os.PathLike) -> Path:
    """Two panels: state bytes per token (and checkpoint bytes per token) per model; warm load ms, kvmlx vs mlx-lm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["model"].removeprefix("builtin:") + (f" q{r['kv_quantization']['bits']}" if r["kv_quantization"] else "")
             for r in rows]
    x = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar([i - 0.2 for i in x], [r["state_bytes_per_token"] for r in rows], 0.4, label="final state")
    a.bar([i + 0.2 for i in x], [r["checkpoint_bytes"] / result["tokens"] for r in rows], 0.4, label="checkpoints")
    a.set_ylabel("bytes per document token")
    b.bar([i - 0.2 for i in x], [r["load_seconds"]["median"] * 1e3 for r in rows], 0.4, label="kvmlx load")
    b.bar([i + 0.2 for i in x], [r["mlx_lm_load_seconds"]["median"] * 1e3 for r in rows], 0.4, label="mlx-lm load_prompt_cache")
    b.set_ylabel("warm load, ms (median)")
    for ax in (a, b):
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.legend()
    fig.suptitle(f"cache families, {result['tokens']}-token document")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _rng(span: dict | None, scale: float = 1.0, fmt: str = ".3g") -> str:
    """'12.3 [11.9-13.0]': median and min-max over repeats."""
    if not span:
        return "-"
    if span["n"] == 1:
        return f"{span['median'] * scale:{fmt}}"
    return f"{span['median'] * scale:{fmt}} [{span['min'] * scale:{fmt}}-{span['max'] * scale:{fmt}}]"


def format_serve_table(result: dict) -> str:
    """`kvmlx bench --serve`: throughput and TTFT per concurrency, first and restarted requests, targets."""
    c, m, s = result["config"], result["machine"], result["summary"]
    servers = c["servers"]
    out = [
        f"kvmlx bench --serve: {c['model']} ({c['dtype']}), {c['doc_tokens']}-token document, "
        f"{c['max_tokens']} tokens per answer, {c['rounds']} requests per client, {c['repeats']} repeat(s)",
        f"machine: {m['cpu']}, {m['cores']} cores; MLX {m['versions']['mlx']} on {m['mlx_device']}, "
        f"mlx-lm {m['versions']['mlx-lm']}; median [min-max] over repeats; TTFT in seconds",
    ]
    rows = []
    for conc in map(str, c["concurrency"]):
        row = [conc]
        for k in servers:
            lv = s[k]["levels"][conc]
            row += [_rng(lv["tokens_per_second"]), _rng(lv["ttft_p50"]), _rng(lv["ttft_p95"])]
        t = s.get("targets", {}).get("per_concurrency", {}).get(conc)
        row.append(_num(t["throughput_ratio"], ".2f", "x") if t else "-")
        rows.append(row)
    header = ["clients"] + [f"{k} {h}" for k in servers for h in ("tok/s", "TTFT p50", "TTFT p95")] + ["tok/s ratio"]
    out += _table("streaming clients at once (aggregate completion tokens/s over the level's wall time)", header, rows)
    rows = [[what] + [_rng(s[k][key]) for k in servers] for what, key in
            [("fresh server: first request TTFT", "first_ttft"), ("restarted server: first request TTFT", "restart_ttft"),
             ("server start-up (s)", "startup_seconds")]]
    if all("fairness_short_seconds" in s[k] for k in servers):
        rows.append([f"2-token request {c['probe_delay']:g} s after a {c['long_tokens']}-token prompt (s)"]
                    + [_rng(s[k]["fairness_short_seconds"]) + ("" if s[k]["fairness_answered"] else " (timed out)")
                       for k in servers])
    out += _table("first requests", ["", *servers], rows)
    t = s.get("targets")
    if t:
        def per(key: str) -> str:
            return ", ".join(f"{k}: {_num(v[key], '.2f', 'x')}" for k, v in t["per_concurrency"].items())

        def verdict(ok: bool) -> str:
            return "met" if ok else "MISSED"

        out += ["", "targets (the issue's):",
                f"  aggregate tok/s >= 1.0x mlx_lm.server at every concurrency: "
                f"{verdict(t['throughput_at_least_1x'])} ({per('throughput_ratio')})",
                f"  warm TTFT p50 <= mlx_lm.server's: {verdict(t['warm_ttft_p50_not_worse'])} "
                f"(mlx_lm / kvmlx: {per('ttft_p50_ratio')})",
                f"  fresh server's first TTFT >= 10x better: {verdict(t['first_ttft_at_least_10x'])} "
                f"({_num(t['first_ttft_speedup'], '.1f', 'x')}; after a restart "
                f"{_num(t['restart_ttft_speedup'], '.1f', 'x')})"]
    fair = [r.get("fairness") for r in result["runs"].get("kvmlx", []) if r.get("fairness")]
    if fair and fair[0].get("chunk_seconds"):
        out.append(f"  2-token request within one prefill chunk ({fair[0]['chunk_tokens']} tokens, "
                   f"{_num(fair[0]['chunk_seconds'], '.2f')} s) plus its own work: "
                   + ", ".join(f"{f['short_seconds']:.2f} s" for f in fair))
    return "\n".join(out)


def plot_serve(result: dict, path: str | os.PathLike) -> Path:
    """Aggregate tokens/s and TTFT p50 vs concurrent clients, both servers (median, bars: min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, s = result["config"], result["summary"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"kvmlx": "tab:blue", "mlx_lm": "tab:orange"}
    for k in c["servers"]:
        xs = c["concurrency"]
        for ax, key in ((a1, "tokens_per_second"), (a2, "ttft_p50")):
            spans = [s[k]["levels"][str(x)][key] for x in xs]
            pts = [(x, sp) for x, sp in zip(xs, spans) if sp]
            med = np.array([sp["median"] for _, sp in pts])
            err = [med - [sp["min"] for _, sp in pts], [sp["max"] for _, sp in pts] - med]
            ax.errorbar([x for x, _ in pts], med, yerr=err, fmt="o-", color=colors.get(k), capsize=3,
                        label={"kvmlx": "kvmlx serve", "mlx_lm": "mlx_lm.server"}.get(k, k))
    a1.set_ylabel("aggregate completion tokens/s")
    a2.set_ylabel("TTFT p50 (s)")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(c["concurrency"], [str(x) for x in c["concurrency"]])
        ax.set_xlabel("concurrent streaming clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"{c['model']} ({c['dtype']}), {c['doc_tokens']}-token document; {m['cpu']}, {m['cores']} cores",
                 fontsize=10)
    out = Path(path)
    fig.savefig(out, format="png", bbox_inches="tight")
    plt.close(fig)
    return out
