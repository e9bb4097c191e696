"""`kvmlx.measure.bench`: the result's documented keys, positive medians, the synthetic round trip, the plot.

Tiny lengths and one run: these check the harness, never speed (speed goals are benchmark figures).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvmlx.measure.bench import (
    DEFAULT_LENGTHS,
    MODEL_PHASES,
    PAPER_M1_PRO,
    SHAPE_PHASES,
    SHAPES,
    KVShape,
    evict,
    format_table,
    parse_lengths,
    plot,
    roofline,
    run_model_bench,
    run_shape_bench,
    summarize,
    synthetic_header,
    synthetic_kv,
)
from kvmlx.measure.cost import ratio_from_bench
from kvmlx.artifact.format import Artifact, TensorData, write_artifact
from kvmlx.runtime.load import LOAD_PATHS, read_caches

pytestmark = pytest.mark.usefixtures("settle_instantly")

TINY_SHAPE = KVShape("tiny-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", vocab_size=64)


class Progress:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total, label):
        self.calls.append((done, total, label))


@pytest.fixture(scope="module")
def model_run(tiny, tmp_path_factory):
    progress = Progress()
    directory = tmp_path_factory.mktemp("bench-model")
    result = run_model_bench(tiny, [12, 40], runs=1, directory=directory, chunk_size=16, progress=progress)
    return result, progress, directory


@pytest.fixture(scope="module")
def shape_run(tmp_path_factory):
    progress = Progress()
    directory = tmp_path_factory.mktemp("bench-shape")
    result = run_shape_bench(TINY_SHAPE, [5, 300], runs=2, directory=directory, progress=progress)
    return result, progress, directory


def _stats(obj):
    """Every summarize() dict anywhere in obj."""
    if isinstance(obj, dict):
        if {"median", "min", "max", "samples"} <= obj.keys():
            yield obj
        else:
            for value in obj.values():
                yield from _stats(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _stats(value)


def test_model_result_has_the_documented_keys(model_run):
    result, _, _ = model_run
    json.dumps(result, allow_nan=False)  # one JSON object, no NaN or infinity
    assert result["kind"] == "kvmlx-bench" and result["mode"] == "model"
    assert {"platform", "cpu", "cores", "memory_bytes", "mlx_device", "metal", "versions"} <= result["machine"].keys()
    assert {"kvmlx", "mlx", "mlx-lm", "numpy", "python"} <= result["machine"]["versions"].keys()
    config = result["config"]
    assert config["model"] == "builtin:tiny" and config["lengths"] == [12, 40] and config["runs"] == 1
    assert set(config["load_paths"]) <= set(LOAD_PATHS) - {"auto"} and "copy" in config["load_paths"]
    assert [r["tokens"] for r in result["roofline"]] == [12, 40]
    for row in result["results"]:
        for key in ("tokens", "prefill_over_load_first_token", "prefill_s", "decode_step_s", "load_first_token_s",
                    "first_step_after_load_s", "first_step_over_resident", "kvmlx_save_s", "kvmlx_save_GBps",
                    "kvmlx_load_warm_s", "kvmlx_load_warm_noverify_s", "kvmlx_load_fresh_s", "kvmlx_load_warm_reload_s",
                    "mlx_lm_save_s", "mlx_lm_save_durable_s", "mlx_lm_load_warm_s", "mlx_lm_load_fresh_s",
                    "mlx_lm_load_first_token_s", "prefill_over_mlx_lm_load_first_token", "kv_bytes",
                    "artifact_bytes", "mlx_lm_file_bytes", "artifact_overhead", "load_path"):
            assert row.get(key) is not None, key
        assert row["load_path"] in config["load_paths"]
        assert set(row["load_first_token_by_path"]) == set(config["load_paths"])
        assert row["prefill_over_load_first_token"] > 0
        assert row["paper_prefill_over_decode_step"] is None  # not one of the paper's lengths
    # kvmlx cost --bench reads exactly these keys
    assert ratio_from_bench(result, 40).tokens == 40


def test_medians_are_positive_and_spreads_ordered(model_run, shape_run):
    for result, _, _ in (model_run, shape_run):
        stats = list(_stats(result["results"])) + list(_stats(result["roofline"]))
        assert len(stats) > 20
        for s in stats:
            assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
            assert s["n"] == len(s["samples"]) == result["config"]["runs"]


def test_cold_figures_follow_the_platform(model_run, shape_run):
    for result, _, _ in (model_run, shape_run):
        config, row = result["config"], result["results"][0]
        if config["cold"]:
            assert config["cold_note"] is None
            assert row["kvmlx_load_cold_s"]["median"] > 0 and row["mlx_lm_load_cold_s"]["median"] > 0
            assert result["roofline"][0]["cold_read_GBps"] > 0
        else:
            assert "posix_fadvise" in config["cold_note"] and "kvmlx_load_cold_s" not in row


def test_no_cold_option_is_reported(tmp_path):
    result = run_shape_bench(TINY_SHAPE, [8], runs=1, directory=tmp_path, cold=False)
    assert result["config"]["cold"] is False and result["config"]["cold_note"] == "cold loads not measured (--no-cold)"
    row = result["results"][0]
    assert "kvmlx_load_cold_s" not in row and result["roofline"][0]["cold_read_GBps"] is None
    assert "cold no-verify" not in format_table(result) and "--no-cold" in format_table(result)


def test_progress_reaches_its_total_and_temp_files_are_removed(model_run, shape_run):
    for (result, progress, directory), phases in ((model_run, MODEL_PHASES), (shape_run, SHAPE_PHASES)):
        total = len(result["results"]) * len(phases)
        assert [d for d, _, _ in progress.calls] == list(range(1, total + 1))
        assert all(t == total for _, t, _ in progress.calls)
        assert list(directory.iterdir()) == []


def test_shape_mode_sizes(shape_run):
    result, _, _ = shape_run
    assert result["mode"] == "shape" and result["config"]["shape"]["name"] == "tiny-test"
    row = result["results"][1]
    assert row["kv_bytes"] == TINY_SHAPE.kv_bytes(300) == 2 * 2 * 2 * 300 * 16 * 2
    assert row["artifact_bytes"] > row["kv_bytes"]  # 16 KiB alignment dominates at this toy size
    assert row["mlx_lm_file_bytes"] > row["kv_bytes"]  # mlx-lm saves the whole 512-slot buffers
    assert row["paper_prefill_over_decode_step"] is None and "prefill_over_load_first_token" not in row
    assert SHAPES["qwen3-4b"].kv_bytes(3774) == 147456 * 3774  # 557 MB, the paper's figure


def test_synthetic_artifact_round_trips(tmp_path):
    n = 37
    kv = synthetic_kv(TINY_SHAPE, n)
    logits = np.arange(TINY_SHAPE.vocab_size, dtype=np.float16)
    names = [f"layers.{i}.{kind}" for i in range(TINY_SHAPE.num_layers) for kind in ("keys", "values")]
    tensors = [TensorData(name, "float16", a.shape, memoryview(a).cast("B")) for name, a in zip(names, kv)]
    tensors.append(TensorData("logits", "float16", logits.shape, memoryview(logits).cast("B")))
    path = tmp_path / "synthetic.kvmlx"
    write_artifact(path, synthetic_header(TINY_SHAPE, n, 512), tensors)
    with Artifact(path, populate=True) as art:
        caches, stored_logits, used = read_caches(art, verify_digests=True)
    assert used in LOAD_PATHS and len(caches) == TINY_SHAPE.num_layers
    for cache, keys, values in zip(caches, kv[::2], kv[1::2]):
        assert cache.offset == n
        got_keys, got_values = cache.state[0][..., :n, :], cache.state[1][..., :n, :]
        assert np.array_equal(np.array(got_keys), keys) and np.array_equal(np.array(got_values), values)
    assert np.array_equal(np.array(stored_logits), logits)


def test_plot_writes_a_png(model_run, shape_run, tmp_path):
    for name, (result, _, _) in (("model", model_run), ("shape", shape_run)):
        out = plot(result, tmp_path / f"{name}.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_names_every_section(model_run, shape_run):
    model_text = format_table(model_run[0])
    for title in ("Prefill vs reuse", "Load paths", "kvmlx loads", "mlx-lm load_prompt_cache", "Saves and bytes",
                  "Roofline", "Targets"):
        assert title in model_text
    assert "builtin:tiny" in model_text and "copy" in model_text
    shape_text = format_table(shape_run[0])
    assert "synthetic tiny-test KV" in shape_text and "Prefill vs reuse" not in shape_text


def test_targets_are_evaluated_not_asserted(model_run):
    targets = model_run[0]["targets"]
    assert {t["key"] for t in targets} >= {"kvmlx_load_warm_speedup_vs_mlx_lm", "first_step_over_resident",
                                           "artifact_overhead", "kvmlx_save_GBps"}
    assert all(isinstance(t["met"], bool) and t["tokens"] in (12, 40) for t in targets)


def test_roofline_on_its_own(tmp_path):
    roof = roofline(1 << 20, tmp_path, runs=1, cold=False)
    assert roof["bytes"] == 1 << 20 and roof["memcpy_GBps"] > 0 and roof["write_fsync_GBps"] > 0
    assert roof["page_cache_read_GBps"] > 0 and roof["cold_read_GBps"] is None
    assert list(tmp_path.iterdir()) == []


def test_small_pieces(tmp_path):
    assert parse_lengths("255,485") == (255, 485) and parse_lengths(" 7 ") == (7,)
    for bad in ("", "a,b", "0", "5,-1"):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert DEFAULT_LENGTHS == tuple(PAPER_M1_PRO) == (255, 485, 945, 1888, 3774)
    assert round(PAPER_M1_PRO[3774][0] / PAPER_M1_PRO[3774][1], 1) == 49.7
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    assert evict(path) in (True, False) and path.read_bytes() == b"x" * 4096
    with pytest.raises(ValueError):
        run_shape_bench(TINY_SHAPE, [8], runs=0, directory=tmp_path)


# -- the `kvmlx bench` command ------------------------------------------------------------------------------

def _cli():
    from kvmlx.cli import main

    return main


def test_cli_shape_json_and_plot(tmp_path):
    from click.testing import CliRunner

    main = _cli()
    png = tmp_path / "shape.png"
    result = CliRunner().invoke(main, ["bench", "--shape", "qwen3-4b", "--lengths", "16", "--runs", "1", "--no-cold",
                                       "--dir", str(tmp_path), "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "shape" and data["results"][0]["tokens"] == 16 and data["plot"] == str(png)
    assert data["results"][0]["kv_bytes"] == 147456 * 16 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_model_table(tmp_path, tiny):
    from click.testing import CliRunner

    main = _cli()
    result = CliRunner().invoke(main, ["bench", "--model", "builtin:tiny", "--lengths", "12", "--runs", "1",
                                       "--chunk-size", "16", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Prefill vs reuse" in result.output and "builtin:tiny" in result.output


@pytest.mark.parametrize("args", [["--lengths", "0"], ["--lengths", "a"], ["--runs", "0"],
                                  ["--shape", "qwen3-4b", "--model", "builtin:tiny"], ["--shape", "nope"]])
def test_cli_refuses_bad_options(args):
    from click.testing import CliRunner

    result = CliRunner().invoke(_cli(), ["bench", *args])
    assert result.exit_code == 2 and "Error" in result.output


def test_compression_bench_reports_every_encoding(tiny):
    from kvmlx.measure.bench import format_compression_table, run_compression_bench
    from kvmlx.artifact.format import ENCODINGS

    result = run_compression_bench(tiny, 48, runs=1, max_tokens=24)
    rows = {r["encoding"]: r for r in result["rows"]}
    assert set(rows) == set(ENCODINGS)
    json.dumps(result, allow_nan=False)
    for name, r in rows.items():
        assert r["decoded_bit_exact"] == r["lossless"]
        if r["lossless"]:
            assert r["tokens_agree"] == r["tokens_compared"] == 24 and r["max_abs_logit_diff"] == 0.0
        else:
            assert r["ratio_to_raw"] > 1.5 and r["max_abs_logit_diff"] > 0
    assert "expsplit-zstd" in format_compression_table(result)
