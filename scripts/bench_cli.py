"""The command as a user times it: `kvmlx generate ARTIFACT` against `mlx_lm.generate --prompt-cache-file`
on the same model, document and prompt, whole processes (wall time and peak RSS), interleaved.

    python scripts/bench_cli.py --model builtin:small --tokens 945 --runs 4 [--json]

Both continue the same document tokens (the mlx-lm cache is `kvmlx export --mlx-lm` of the artifact, so
both hold identical KV) with the same prompt and 8 greedy tokens, and must print the same text. Run 1
of each is reported apart (it may build caches: the model's, the fingerprints'); the ratio uses the
median of runs 2 onward. Targets (issue 17): wall <= 1.0x and peak RSS <= 1.05x mlx-lm's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


_SETUP = """
import sys
from kvmlx.measure.bench import document_tokens
from kvmlx.models import load_model
from kvmlx.runtime.interop import export_mlx_lm
from kvmlx.runtime.publish import publish
model, n, art, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lm = load_model(model)
publish(lm, document_tokens(lm.tokenizer, n), art)
print(export_mlx_lm(art, cache).model)
"""


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... exited {p.returncode}")
    return wall, usage.ru_maxrss * 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:small")
    ap.add_argument("--tokens", type=int, default=945, help="document length in tokens (the bench's document)")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompt", default=" Question: what is this about? Answer:")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    # The setup (model, publish, export) runs in a child: this process stays small, because a child's
    # peak RSS (wait4's ru_maxrss) starts from its parent's resident size at fork (vfork + exec).
    with tempfile.TemporaryDirectory(prefix="kvmlx-bench-cli-") as tmp:
        result = _measure(args, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for k in ("kvmlx", "mlx_lm"):
        f, m = result["first_run"][k], result["runs_2_on"][k]
        print(f"{k:7} first run {f['wall_s']:.2f} s {f['peak_rss_bytes'] / 1e6:.0f} MB; runs 2+: median "
              f"{m['wall_s']:.2f} s [{min(m['wall_all_s']):.2f}-{max(m['wall_all_s']):.2f}] {m['peak_rss_bytes'] / 1e6:.0f} MB")
    print(f"wall {result['wall_ratio']:.2f}x, peak RSS {result['rss_ratio']:.2f}x mlx-lm's; same text: {result['same_text']}")
    print("kvmlx timings (last run, s):", {k: round(v, 3) for k, v in (result["kvmlx_timings_last_run"] or {}).items()})


def _measure(args, tmp: Path) -> dict:
    art, cache = tmp / "doc.kvmlx", tmp / "doc.safetensors"
    py = sys.executable
    setup = subprocess.run([py, "-c", _SETUP, args.model, str(args.tokens), str(art), str(cache)],
                           capture_output=True, text=True, check=False)
    if setup.returncode != 0:
        raise SystemExit(f"setup failed: {(setup.stderr.strip().splitlines() or ['?'])[-1]}")
    mlx_model = setup.stdout.strip().splitlines()[-1]
    kv = [py, "-m", "kvmlx", "generate", str(art), "--model", args.model, "--prompt", args.prompt,
          "-n", str(args.max_tokens), "--json"]
    ml = [py, "-m", "mlx_lm", "generate", "--model", mlx_model, "--prompt-cache-file", str(cache), "--prompt",
          args.prompt, "--max-tokens", str(args.max_tokens), "--ignore-chat-template", "--temp", "0", "--verbose", "False"]
    rows = {"kvmlx": [], "mlx_lm": []}
    texts = {}
    timings = []
    for _ in range(args.runs):
        for name, cmd in (("kvmlx", kv), ("mlx_lm", ml)):
            wall, rss, out = run_measured(cmd)
            rows[name].append((wall, rss))
            if name == "kvmlx":
                j = json.loads(out)
                texts[name] = j["text"]
                timings.append(j.get("timings"))
            else:
                texts[name] = out.strip()
    later = {k: v[1:] or v for k, v in rows.items()}
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in later.items()}
    result = {
        "model": args.model, "tokens": args.tokens, "runs": args.runs, "max_tokens": args.max_tokens,
        "same_text": texts["kvmlx"].strip() == texts["mlx_lm"].strip(),
        "first_run": {k: {"wall_s": v[0][0], "peak_rss_bytes": v[0][1]} for k, v in rows.items()},
        "runs_2_on": {k: {"wall_s": m[0], "peak_rss_bytes": m[1], "wall_all_s": [w for w, _ in later[k]]}
                      for k, m in med.items()},
        "wall_ratio": med["kvmlx"][0] / med["mlx_lm"][0],
        "rss_ratio": med["kvmlx"][1] / med["mlx_lm"][1],
        "kvmlx_timings_last_run": timings[-1],
        "targets": {"wall_ratio <= 1.0": med["kvmlx"][0] / med["mlx_lm"][0] <= 1.0,
                    "rss_ratio <= 1.05": med["kvmlx"][1] / med["mlx_lm"][1] <= 1.05},
    }
    return result


if __name__ == "__main__":
    main()
