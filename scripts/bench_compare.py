"""Compare `kvmlx bench --json` results side by side: two machines, or a load path before and after a change.

    python scripts/bench_compare.py linux-cpu.json m1-pro.json

For every document length the files share, prints each file's median of the figures below (blank
where a file did not measure one, e.g. cold loads on macOS or prefill in `--shape` mode).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIGURES = (  # (row key, label, unit): seconds are shown in ms
    ("prefill_s", "prefill", "ms"),
    ("decode_step_s", "decode step (resident)", "ms"),
    ("load_first_token_s", "kvmlx load + first token", "ms"),
    ("prefill_over_load_first_token", "prefill / (load + first token)", "x"),
    ("first_step_over_resident", "first step after load / resident", "x"),
    ("kvmlx_load_warm_s", "kvmlx load warm", "ms"),
    ("kvmlx_load_warm_reload_s", "kvmlx re-load warm (digests checked at first load)", "ms"),
    ("kvmlx_load_warm_noverify_s", "kvmlx load warm, no digests", "ms"),
    ("kvmlx_load_fresh_s", "kvmlx load fresh", "ms"),
    ("kvmlx_load_cold_s", "kvmlx load cold", "ms"),
    ("mlx_lm_load_warm_s", "mlx-lm load warm", "ms"),
    ("mlx_lm_load_fresh_s", "mlx-lm load fresh", "ms"),
    ("mlx_lm_load_cold_s", "mlx-lm load cold", "ms"),
    ("kvmlx_load_warm_speedup_vs_mlx_lm", "kvmlx warm speedup vs mlx-lm", "x"),
    ("kvmlx_load_warm_frac_memcpy", "kvmlx warm / memcpy", "%"),
    ("kvmlx_load_warm_reload_speedup_vs_mlx_lm", "kvmlx warm re-load speedup vs mlx-lm", "x"),
    ("kvmlx_save_GBps", "kvmlx save GB/s", ""),
    ("mlx_lm_save_durable_GBps", "mlx-lm save + fsync GB/s", ""),
)


def cell(value, unit: str) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # a summarize() dict
        value = value["median"]
    return {"ms": f"{value * 1e3:.1f}", "x": f"{value:.2f}x", "%": f"{100 * value:.0f}%"}.get(unit, f"{value:.2f}")


def label(result: dict, path: Path) -> str:
    m, c = result["machine"], result["config"]
    what = c.get("model") or f"shape {c['shape']['name']}"
    return f"{path.name}: {what} on {m['cpu']} ({m['mlx_device']}, MLX {m['versions']['mlx']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON files written by `kvmlx bench --json`")
    args = parser.parse_args()
    results = [json.loads(p.read_text(encoding="utf-8")) for p in args.files]
    for i, (r, p) in enumerate(zip(results, args.files), 1):
        print(f"[{i}] {label(r, p)}")
    rows = [{row["tokens"]: row for row in r["results"]} for r in results]
    shared = sorted(set.intersection(*(set(r) for r in rows)))
    if not shared:
        raise SystemExit("the files share no document length")
    for n in shared:
        lines = [(name, [cell(r[n].get(key), unit) for r in rows]) for key, name, unit in FIGURES]
        lines = [(name, cells) for name, cells in lines if any(cells)]
        width = max(len(name) for name, _ in lines)
        print(f"\n  {f'{n} tokens':<{width}}" + "".join(f"{f'[{i}]':>12}" for i in range(1, len(rows) + 1)))
        for name, cells in lines:
            print(f"  {name:<{width}}" + "".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
