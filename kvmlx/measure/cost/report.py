"""The cost model's output: one JSON-ready report, a plain-text table, and a plot of cost per reader.

`report_dict` gathers inputs, derived quantities, sources and every strategy's cost; `format_table`
renders them as text; `plot` draws cost per reader vs number of readers (log-log) with the
break-even points marked (matplotlib's Agg backend, imported only there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import CostError
from .economics import BYTES_PER_GB, CostInputs, StrategyCost, _require, cost_curve, strategy_costs


def _gb_unit_name(bytes_per_gb: float) -> str:
    for name, value in BYTES_PER_GB.items():
        if value == bytes_per_gb:
            return name
    return f"{bytes_per_gb:g} B"


def report_dict(inputs: CostInputs, costs: Sequence[StrategyCost] | None = None,
                sources: Mapping[str, str] | None = None, plot_path: str | None = None) -> dict[str, Any]:
    """One JSON-ready object: inputs, derived quantities, sources and every strategy's cost."""
    costs = strategy_costs(inputs) if costs is None else costs
    fields = {k: getattr(inputs, k) for k in CostInputs.__dataclass_fields__}
    out: dict[str, Any] = {
        "inputs": fields,
        "derived": {
            "prefill_cost": inputs.prefill_cost,
            "load_compute_cost": inputs.load_compute_cost,
            "kv_bytes": inputs.kv_bytes,
            "kv_gb": inputs.kv_gb,
            "gb_unit": _gb_unit_name(inputs.bytes_per_gb),
        },
        "sources": dict(sources or {}),
        "strategies": [c.as_dict() for c in costs],
    }
    if plot_path is not None:
        out["plot"] = str(plot_path)
    return out


def _num(x: float, decimals: int = 2) -> str:
    """Comma-grouped with fixed decimals from 1 up; 4 significant digits below 1."""
    return f"{x:,.{decimals}f}" if abs(x) >= 1 else f"{x:.4g}"


def _money(x: float) -> str:
    return "$" + _num(x)


def format_table(inputs: CostInputs, costs: Sequence[StrategyCost] | None = None,
                 sources: Mapping[str, str] | None = None) -> str:
    """A plain-text table: strategy, total $, $ per reader, total vs re-prefill, break-even N*."""
    costs = strategy_costs(inputs) if costs is None else costs
    lines = [
        f"{inputs.readers:,} readers x one {inputs.tokens:,}-token document",
        f"  prefill ${inputs.price_per_mtok:g}/Mtok = {_money(inputs.prefill_cost)} per read; "
        f"load = prefill / {inputs.ratio:g} = {_money(inputs.load_compute_cost)}",
        f"  KV {inputs.bytes_per_token:,.6g} B/token x {inputs.tokens:,} = {_num(inputs.kv_bytes / 1e6, 1)} MB"
        f" = {inputs.kv_gb:.4g} GB (1 GB = {inputs.bytes_per_gb:.6g} B, {_gb_unit_name(inputs.bytes_per_gb)});"
        f" egress ${inputs.egress_per_gb:g}/GB, storage ${inputs.storage_per_gb_month:g}/GB-month"
        f" x {inputs.months:g} months",
    ]
    for name, source in (sources or {}).items():
        if source != "paper default" and source != "option":
            lines.append(f"  {name}: {source}")
    header = ("strategy", "total $", "per reader $", "vs re-prefill", "break-even N*")
    rows = [header]
    for c in costs:
        n_star = "-" if c.name == "re-prefill" else ("never" if c.break_even is None else f"{c.break_even:,.4g}")
        rows.append((c.label, _num(c.total), f"{c.per_reader:.4g}", f"{c.vs_reprefill:#.3g}x", n_star))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("")
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(r[1:], widths[1:])]))
    return "\n".join(lines)


def plot(inputs: CostInputs, path: str | Path, readers: Sequence[float] | np.ndarray | None = None) -> Path:
    """Write a PNG of cost per reader vs number of readers (log-log), break-even points marked.

    ``readers`` defaults to 1 .. max(N, 100 x the largest finite N*), log-spaced.
    Needs matplotlib (Agg backend); raises :class:`CostError` if it is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's backend
        from matplotlib.figure import Figure
    except ImportError:
        raise CostError("plotting needs matplotlib: pip install matplotlib") from None

    out = Path(path)
    _require(out.parent.is_dir(), f"cannot write plot {str(out)!r}: no such directory")
    costs = strategy_costs(inputs)
    if readers is None:
        finite = [c.break_even for c in costs if c.break_even is not None]
        top = max([float(inputs.readers), 10.0] + [100.0 * x for x in finite])
        readers = np.geomspace(1.0, top, 400)
    n = np.asarray(readers, dtype=float)
    curves = cost_curve(inputs, n, per_reader=True)

    fig = Figure(figsize=(8.5, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["black", "tab:blue", "tab:green", "tab:red", "tab:orange", "tab:purple"]
    for c, color in zip(costs, colors):
        style = "--" if c.name == "re-prefill" else "-"
        ax.plot(n, curves[c.name], style, color=color, lw=2,
                label=f"{c.label}: ${c.total:,.0f} at N={inputs.readers:,}")
    p = inputs.prefill_cost
    marked = 0
    for c, color in zip(costs, colors):
        if c.break_even is None or not (n.min() <= c.break_even <= n.max()):
            continue
        ax.plot([c.break_even], [p], "o", color=color, ms=8, mec="black", zorder=5)
        ax.annotate(f"N*={c.break_even:,.3g}", (c.break_even, p), textcoords="offset points",
                    xytext=(40, 22 + 20 * marked), fontsize=9, color=color,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.9},
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.8})
        marked += 1
    if n.min() <= inputs.readers <= n.max():
        ax.axvline(inputs.readers, color="gray", ls=":", lw=1)
        ax.annotate(f"N={inputs.readers:,}", (inputs.readers, p), textcoords="offset points",
                    xytext=(-8, -28), ha="right", fontsize=9, color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of readers N")
    ax.set_ylabel("cost per reader ($)")
    ax.set_title(f"{inputs.tokens:,}-token document, ${inputs.price_per_mtok:g}/Mtok, "
                 f"prefill/reuse {inputs.ratio:g}x, {inputs.kv_gb:.3g} GB KV", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    try:
        fig.savefig(out, format="png", bbox_inches="tight")
    except OSError as e:
        raise CostError(f"cannot write plot {str(out)!r}: {e.strerror or e}") from None
    return out
