"""The command as a user times it, `run_cli_bench`: `kvmlx generate ARTIFACT` against
`mlx_lm.generate --prompt-cache-file` on the same model, document tokens and prompt, as whole
processes (wall time and peak RSS), interleaved.

Both continue the same document tokens (the mlx-lm cache is `kvmlx export --mlx-lm` of the artifact,
so both hold identical KV) with the same prompt and greedy tokens, and should print the same text.
Run 1 of each is reported apart (it may build caches: the model's, the fingerprints'); the ratios
use the median of runs 2 onward. Targets (issue 21): wall <= 1.0x and peak RSS <= 1.05x mlx-lm's.
The setup (model, publish, export) runs in a child too: a child's peak RSS (`wait4`'s ru_maxrss)
starts from its parent's resident size at fork, so this process stays small. Both packages' bytecode
is compiled first (`compiled_bytecode`), as `pip install` leaves an installed package: an editable
checkout under PYTHONDONTWRITEBYTECODE=1 would otherwise compile every kvmlx module from source in
every run (~100 ms here) while mlx-lm's come compiled.
"""

from __future__ import annotations

import compileall
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import ProgressFn

DEFAULT_PROMPT = " Question: what is this about? Answer:"
CLI_TARGETS = {"wall_ratio": 1.0, "rss_ratio": 1.05}

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


def run_cli_bench(model: str = "builtin:small", tokens: int = 945, runs: int = 4, *, max_tokens: int = 8,
                  prompt: str = DEFAULT_PROMPT, directory: str | os.PathLike | None = None,
                  progress: ProgressFn | None = None) -> dict:
    """Publish `tokens` of the bench document for `model`, export it for mlx-lm, then run both commands
    `runs` times each, alternately; wall time and peak RSS per child."""
    if runs < 1 or tokens < 1 or max_tokens < 1:
        raise ValueError("runs, tokens and max_tokens must be positive")
    with tempfile.TemporaryDirectory(prefix="kvmlx-bench-cli-", dir=directory) as tmp:
        art, cache = Path(tmp) / "doc.kvmlx", Path(tmp) / "doc.safetensors"
        py = sys.executable
        setup = subprocess.run([py, "-c", _SETUP, model, str(tokens), str(art), str(cache)],
                               capture_output=True, text=True, check=False, env=_env())
        if setup.returncode != 0:
            raise RuntimeError(f"bench --cli setup failed: {(setup.stderr.strip().splitlines() or ['?'])[-1]}")
        mlx_model = setup.stdout.strip().splitlines()[-1]
        bytecode = compiled_bytecode(("kvmlx", "mlx_lm"))
        commands = {
            "kvmlx": [py, "-m", "kvmlx", "generate", str(art), "--model", model, "--prompt", prompt,
                      "-n", str(max_tokens), "--json"],
            "mlx_lm": [py, "-m", "mlx_lm", "generate", "--model", mlx_model, "--prompt-cache-file", str(cache),
                       "--prompt", prompt, "--max-tokens", str(max_tokens), "--ignore-chat-template", "--temp", "0",
                       "--verbose", "False"],
        }
        rows: dict[str, list[tuple[float, int]]] = {"kvmlx": [], "mlx_lm": []}
        texts, timings = {}, []
        for run in range(runs):
            for name, cmd in commands.items():
                wall, rss, out = _measured(cmd)
                rows[name].append((wall, rss))
                if name == "kvmlx":
                    j = json.loads(out)
                    texts[name] = j["text"]
                    timings.append(j.get("timings"))
                else:
                    texts[name] = out.strip()
            if progress:
                progress(run + 1, runs, "runs")
    later = {k: v[1:] or v for k, v in rows.items()}
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in later.items()}
    wall_ratio, rss_ratio = med["kvmlx"][0] / med["mlx_lm"][0], med["kvmlx"][1] / med["mlx_lm"][1]
    return {
        "mode": "cli", "model": model, "tokens": tokens, "runs": runs, "max_tokens": max_tokens, "prompt": prompt,
        "commands": {k: " ".join(["python", *c[1:]]) for k, c in commands.items()},
        "same_text": texts["kvmlx"].strip() == texts["mlx_lm"].strip(), "texts": texts, "bytecode": bytecode,
        "first_run": {k: {"wall_s": v[0][0], "peak_rss_bytes": v[0][1]} for k, v in rows.items()},
        "runs_2_on": {k: {"wall_s": m[0], "peak_rss_bytes": m[1], "wall_all_s": [w for w, _ in later[k]],
                          "peak_rss_all_bytes": [r for _, r in later[k]]} for k, m in med.items()},
        "wall_ratio": wall_ratio, "rss_ratio": rss_ratio,
        "kvmlx_timings_last_run": timings[-1],
        "targets": [{"target": f"{key} <= {goal}", "value": value, "goal": goal, "met": value <= goal}
                    for key, goal, value in (("wall_ratio", CLI_TARGETS["wall_ratio"], wall_ratio),
                                             ("rss_ratio", CLI_TARGETS["rss_ratio"], rss_ratio))],
    }


def format_cli_table(result: dict) -> str:
    lines = [f"kvmlx generate vs mlx_lm.generate --prompt-cache-file: {result['model']}, {result['tokens']} document "
             f"tokens, {result['max_tokens']} greedy tokens, {result['runs']} runs each (interleaved)"]
    for k in ("kvmlx", "mlx_lm"):
        f, m = result["first_run"][k], result["runs_2_on"][k]
        lines.append(f"  {k:7} first run {f['wall_s']:.2f} s {f['peak_rss_bytes'] / 1e6:.0f} MB; runs 2+: median "
                     f"{m['wall_s']:.2f} s [{min(m['wall_all_s']):.2f}-{max(m['wall_all_s']):.2f}] "
                     f"{m['peak_rss_bytes'] / 1e6:.0f} MB")
    lines.append(f"  wall {result['wall_ratio']:.2f}x (target <= {CLI_TARGETS['wall_ratio']}), peak RSS "
                 f"{result['rss_ratio']:.2f}x (target <= {CLI_TARGETS['rss_ratio']}) mlx-lm's; same text: {result['same_text']}")
    phases = result.get("kvmlx_timings_last_run") or {}
    if phases:
        lines.append("  kvmlx generate's own split (last run): " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items()))
    return "\n".join(lines)


def compiled_bytecode(packages) -> dict[str, bool]:
    """Compile each package's modules to bytecode where it is missing or stale (what an installed
    package has); {package: whether every module has it}. A read-only package dir stays as it is."""
    out = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        dirs = list(spec.submodule_search_locations or []) if spec else []
        out[name] = bool(dirs) and all(compileall.compile_dir(d, quiet=2) for d in dirs)
    return out


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[3])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run `cmd`; its wall time, peak RSS in bytes (wait4's ru_maxrss: this child alone) and stdout."""
    with tempfile.TemporaryFile("w+") as errors:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=_env())
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)  # the child's own rusage (Popen.wait would reap it without)
        wall = time.perf_counter() - t0
        p.returncode = code = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        errors.seek(0)
        err = errors.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(Path(c).name for c in cmd[:4])} ... exited {code}: "
                           f"{(err.strip().splitlines() or ['?'])[-1]}")
    return wall, usage.ru_maxrss * 1024, out
