"""`kvmlx bench --serve` end to end on the tiny model (both servers really started, a few requests):
the result's keys, the summary and targets computed from it, the table, the plot, the CLI's refusals.
Figures are reported, never asserted (docs/BENCHMARKS.md has a real run)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvmlx.cli import main as cli
from kvmlx.measure.bench import format_serve_table, plot_serve, run_serve_bench


@pytest.fixture(scope="module")
def run(kvmlx_home):
    steps = []
    result = run_serve_bench("builtin:tiny", doc_tokens=96, concurrency=(1, 2), rounds=1, max_tokens=3,
                             long_tokens=600, probe_delay=0.2, probe_timeout=60, progress=lambda d, t, w: steps.append((d, t, w)))
    return result, steps


def test_result_and_summary(run):
    result, steps = run
    assert steps[-1][0] == steps[-1][1] == len(steps)  # progress reaches its total
    for kind in ("kvmlx", "mlx_lm"):
        (r,) = result["runs"][kind]
        assert r["first"]["tokens"] >= 1 and r["restart"]["tokens"] >= 1 and r["startup_seconds"] > 0
        assert [lv["clients"] for lv in r["levels"]] == [1, 2]
        assert all(lv["requests"] == lv["clients"] and not lv["errors"] and lv["tokens_per_second"] > 0
                   for lv in r["levels"])
        assert r["fairness"]["answered"]
    fair = result["runs"]["kvmlx"][0]["fairness"]
    assert fair["chunk_tokens"] == 512 and fair["answered"]
    t = result["summary"]["targets"]
    assert set(t["per_concurrency"]) == {"1", "2"} and t["first_ttft_speedup"] > 0
    assert isinstance(t["throughput_at_least_1x"], bool)
    json.dumps(result)


def test_table_and_plot(run, tmp_path):
    result, _ = run
    table = format_serve_table(result)
    for words in ("streaming clients at once", "fresh server: first request TTFT", "targets", "2-token request"):
        assert words in table
    png = plot_serve(result, tmp_path / "serve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--concurrency", "a,b"]])
def test_cli_refuses_bad_concurrency(args):
    out = CliRunner().invoke(cli, ["bench", "--serve", *args])
    assert out.exit_code == 2 and "concurrency" in out.output
