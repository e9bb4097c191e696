"""The cost model: the paper's worked example, the formulas, the real-input readers, the plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvmlx.measure.cost import (
    GB_PAPER,
    GB_SI,
    GIB,
    QWEN3_4B_FP16_BYTES_PER_TOKEN,
    CostError,
    CostInputs,
    break_even,
    bytes_per_token_from_config,
    cost_curve,
    format_table,
    kv_size_from_header,
    load_bench,
    load_model_config,
    plot,
    ratio_from_bench,
    report_dict,
    resolve_inputs,
    strategy_costs,
)
from kvmlx.errors import KvmlxError, ModelLoadError

CENT = 0.005

QWEN3_4B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "torch_dtype": "bfloat16",
}


def by_name(inputs: CostInputs) -> dict:
    return {c.name: c for c in strategy_costs(inputs)}


# -- the paper's worked example ------------------------------------------------------------------

def test_defaults_are_the_papers_example():
    i = CostInputs()
    assert (i.readers, i.tokens, i.price_per_mtok, i.tariff, i.ratio, i.egress_per_gb) == (
        80_000_000, 3774, 5.0, 0.1, 49.7, 0.09)
    assert i.bytes_per_token == QWEN3_4B_FP16_BYTES_PER_TOKEN == 147_456
    assert i.kv_bytes == 556_498_944  # "556.5 MB"
    assert i.kv_gb == pytest.approx(0.543456, abs=1e-12)  # the paper's "0.54 GB"
    assert i.prefill_cost == pytest.approx(0.01887, abs=1e-15)


def test_defaults_reproduce_the_papers_five_figures():
    s = by_name(CostInputs())
    # exact arithmetic: to the cent
    assert s["re-prefill"].total == pytest.approx(1_509_600, abs=CENT)
    assert s["hosted-tariff"].readers_total == pytest.approx(150_960, abs=CENT)
    # the paper's "~$30,370" is 30,374.25 rounded to 4 significant figures
    assert s["hosted-physical"].readers_total == pytest.approx(1_509_600 / 49.7, abs=CENT)
    assert round(s["hosted-physical"].total, -1) == 30_370
    # "~$3.9M" and "~$2.0M"
    assert round(s["ship-raw"].total / 1e6, 1) == 3.9
    assert round(s["ship-int8"].total / 1e6, 1) == 2.0
    # and the ordering that is the paper's point: shipping loses to re-prefill, hosting wins
    assert s["ship-raw"].total > s["ship-int8"].total > s["re-prefill"].total
    assert s["re-prefill"].total > s["hosted-tariff"].total > s["hosted-physical"].total


def test_fixed_part_is_the_one_publisher_prefill():
    s = by_name(CostInputs())
    p = 0.01887
    assert s["re-prefill"].fixed == 0
    for name in ("hosted-tariff", "hosted-physical", "ship-raw", "ship-int8"):
        assert s[name].fixed == pytest.approx(p)
        assert s[name].total == pytest.approx(s[name].readers_total + p)
    assert s["hosted-tariff"].total == pytest.approx(150_960.01887, abs=1e-6)


def test_ship_raw_is_load_compute_plus_egress_in_paper_gigabytes():
    s = by_name(CostInputs())
    egress = s["ship-raw"].readers_total - s["hosted-physical"].readers_total
    assert egress == pytest.approx(80e6 * 0.09 * 556_498_944 / 1.024e9, abs=CENT)
    assert egress == pytest.approx(3_912_883.20, abs=CENT)
    assert s["ship-raw"].per_load - s["hosted-physical"].per_load == pytest.approx(0.04891104)  # "$0.049"
    int8_egress = s["ship-int8"].readers_total - s["hosted-physical"].readers_total
    assert int8_egress == pytest.approx(egress / 2)
    assert s["ship-raw"].total == pytest.approx(3_943_257.46, abs=CENT)
    assert s["ship-int8"].total == pytest.approx(1_986_815.86, abs=CENT)


def test_other_gigabytes_do_not_round_to_the_papers_figure():
    si = by_name(CostInputs(bytes_per_gb=GB_SI))["ship-raw"].total
    iec = by_name(CostInputs(bytes_per_gb=GIB))["ship-raw"].total
    assert round(si / 1e6, 1) == 4.0
    assert round(iec / 1e6, 1) == 3.8
    assert GB_PAPER == 1024 * 1e6


def test_per_reader_and_vs_reprefill():
    s = by_name(CostInputs())
    assert s["re-prefill"].per_reader == pytest.approx(0.01887)
    assert s["re-prefill"].vs_reprefill == 1.0
    assert s["hosted-tariff"].vs_reprefill == pytest.approx(0.1, rel=1e-6)
    assert s["hosted-physical"].vs_reprefill == pytest.approx(1 / 49.7, rel=1e-6)
    for c in s.values():
        assert c.per_reader * c.readers == pytest.approx(c.total)


# -- break-even ----------------------------------------------------------------------------------

def test_break_even_formula():
    assert break_even(10.0, 1.0) == pytest.approx(10 / 9)
    assert break_even(1.0, 0.0) == 1.0
    assert break_even(0.01887, 0.01887 / 49.7) == pytest.approx(49.7 / 48.7)
    assert break_even(2.0, 1.0, fixed=5.0) == 5.0
    s = by_name(CostInputs())
    assert s["hosted-tariff"].break_even == pytest.approx(1 / 0.9)
    assert s["hosted-physical"].break_even == pytest.approx(49.7 / 48.7)
    assert s["re-prefill"].break_even is None
    assert s["ship-raw"].break_even is None and s["ship-int8"].break_even is None  # never pays


def test_costs_are_equal_at_the_break_even_point():
    i = CostInputs(storage_per_gb_month=0.5, months=6)
    for c in strategy_costs(i):
        if c.break_even is None:
            continue
        curves = cost_curve(i, [c.break_even])
        assert curves[c.name][0] == pytest.approx(curves["re-prefill"][0], rel=1e-9)
        below = cost_curve(i, [c.break_even * 0.9])
        assert below[c.name][0] > below["re-prefill"][0]


@pytest.mark.parametrize("c_prefill,c_load", [(1.0, 1.0), (1.0, 2.0), (0.0, 0.0), (-1.0, 0.0), (1.0, -0.1),
                                              (math.nan, 0.1), (1.0, math.inf)])
def test_break_even_rejects_loads_that_never_pay_and_bad_values(c_prefill, c_load):
    with pytest.raises(CostError):
        break_even(c_prefill, c_load)


def test_ratio_at_most_one_means_reuse_never_pays():
    with pytest.raises(CostError, match="never pays"):
        break_even(CostInputs().prefill_cost, CostInputs(ratio=0.5).load_compute_cost)
    s = by_name(CostInputs(ratio=0.5))  # a real H100 measurement can be < 1: reported, not refused
    assert s["hosted-physical"].break_even is None
    assert s["hosted-physical"].vs_reprefill == pytest.approx(2.0, rel=1e-6)
    assert by_name(CostInputs(ratio=1.0))["hosted-physical"].break_even is None


# -- storage and egress terms --------------------------------------------------------------------

def test_storage_and_egress_terms():
    sigma, months, beta = 0.023, 12.0, 0.12
    i = CostInputs(readers=1000, storage_per_gb_month=sigma, months=months, egress_per_gb=beta,
                   bytes_per_gb=GB_SI, compression_ratio=4.0)
    s_gb = i.kv_bytes / 1e9
    p, load = i.prefill_cost, i.prefill_cost / i.ratio
    s = by_name(i)
    assert s["hosted-tariff"].fixed == pytest.approx(p)  # the tariff is all-in: no storage
    assert s["hosted-physical"].fixed == pytest.approx(p + sigma * s_gb * months)
    assert s["hosted-physical"].per_load == pytest.approx(load)  # hosted: no egress
    assert s["ship-raw"].fixed == pytest.approx(p + sigma * s_gb * months)
    assert s["ship-raw"].per_load == pytest.approx(load + beta * s_gb)
    assert s["ship-int8"].per_load == pytest.approx(load + beta * s_gb / 2)
    assert s["ship-int8"].fixed == pytest.approx(p + sigma * s_gb / 2 * months)
    assert s["ship-compressed"].per_load == pytest.approx(load + beta * s_gb / 4)
    # the paper's per-load form: C_prefill/N + C_load + beta*s + sigma*s*T/N
    assert s["ship-raw"].per_reader == pytest.approx(p / 1000 + load + beta * s_gb + sigma * s_gb * months / 1000)
    # storage moves the break-even point: N* = (C_prefill + sigma*s*T) / (C_prefill - C_load)
    assert s["hosted-physical"].break_even == pytest.approx((p + sigma * s_gb * months) / (p - load))


def test_int8_follows_the_kv_element_size():
    i = CostInputs(dtype_bytes=4, bytes_per_token=2 * QWEN3_4B_FP16_BYTES_PER_TOKEN)
    assert by_name(i)["ship-int8"].artifact_gb == pytest.approx(i.kv_gb / 4)


def test_no_compressed_strategy_unless_asked():
    assert "ship-compressed" not in by_name(CostInputs())
    assert by_name(CostInputs(compression_ratio=2.0))["ship-compressed"].total == pytest.approx(
        by_name(CostInputs())["ship-int8"].total)


def test_cost_curve_matches_strategy_costs():
    i = CostInputs()
    n = np.array([1.0, 10.0, 80e6])
    totals, per_reader = cost_curve(i, n), cost_curve(i, n, per_reader=True)
    for c in strategy_costs(i):
        assert totals[c.name][-1] == pytest.approx(c.total)
        np.testing.assert_allclose(per_reader[c.name], totals[c.name] / n)
    np.testing.assert_allclose(per_reader["re-prefill"], i.prefill_cost)
    with pytest.raises(CostError):
        cost_curve(i, [0.0, 1.0])
    with pytest.raises(CostError):
        cost_curve(i, [])


# -- bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"readers": -5}, {"readers": 0}, {"readers": 2.5}, {"readers": True}, {"tokens": 0},
    {"price_per_mtok": -1.0}, {"tariff": -0.1}, {"ratio": 0.0}, {"ratio": -3.0}, {"ratio": math.nan},
    {"egress_per_gb": math.inf}, {"storage_per_gb_month": -1.0}, {"months": -1.0},
    {"bytes_per_token": 0}, {"dtype_bytes": 0}, {"compression_ratio": 0.5}, {"bytes_per_gb": 0.0},
])
def test_bad_inputs_raise_a_clean_error(changes):
    with pytest.raises(CostError) as info:
        CostInputs(**changes)
    assert isinstance(info.value, KvmlxError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_resolve_rejects_conflicting_sources(tmp_path):
    with pytest.raises(CostError, match="only one KV size source"):
        resolve_inputs(bytes_per_token=100, model="Qwen/Qwen3-4B")
    with pytest.raises(CostError, match="--ratio or --bench"):
        resolve_inputs(ratio=10.0, bench=tmp_path / "b.json")
    with pytest.raises(CostError, match="gb unit"):
        resolve_inputs(gb_unit="furlongs")
    with pytest.raises(CostError, match="readers"):
        resolve_inputs(readers=-1)


# -- model config --------------------------------------------------------------------------------

def test_bytes_per_token_of_a_qwen3_4b_config():
    assert bytes_per_token_from_config(QWEN3_4B_CONFIG) == (147_456, 2)
    i = CostInputs.from_config(QWEN3_4B_CONFIG)
    assert i.bytes_per_token == 147_456 and i.dtype_bytes == 2
    assert round(by_name(i)["ship-raw"].total / 1e6, 1) == 3.9


def test_config_fallbacks():
    no_head_dim = {k: v for k, v in QWEN3_4B_CONFIG.items() if k != "head_dim"}  # 2560 / 32 = 80
    assert bytes_per_token_from_config(no_head_dim) == (36 * 2 * 8 * 80 * 2, 2)
    mha = {k: v for k, v in QWEN3_4B_CONFIG.items() if k != "num_key_value_heads"}
    assert bytes_per_token_from_config(mha) == (36 * 2 * 32 * 128 * 2, 2)
    fp32 = {**QWEN3_4B_CONFIG, "torch_dtype": None, "dtype": "float32"}
    assert bytes_per_token_from_config(fp32) == (2 * 147_456, 4)
    no_dtype = {k: v for k, v in QWEN3_4B_CONFIG.items() if k != "torch_dtype"}
    assert bytes_per_token_from_config(no_dtype) == (147_456, 2)
    nested = {"model_type": "vlm", "text_config": QWEN3_4B_CONFIG}
    assert bytes_per_token_from_config(nested) == (147_456, 2)


@pytest.mark.parametrize("config", [
    {k: v for k, v in QWEN3_4B_CONFIG.items() if k != "num_hidden_layers"},
    {**QWEN3_4B_CONFIG, "num_hidden_layers": 0},
    {**QWEN3_4B_CONFIG, "torch_dtype": "complex128"},
    {**QWEN3_4B_CONFIG, "kv_lora_rank": 512},
    {**{k: v for k, v in QWEN3_4B_CONFIG.items() if k != "head_dim"}, "hidden_size": 2561},
    [1, 2, 3],
])
def test_bad_configs_raise(config):
    with pytest.raises(CostError):
        bytes_per_token_from_config(config)


def test_load_model_config_from_dir_file_and_hub(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B_CONFIG))
    assert load_model_config(tmp_path) == QWEN3_4B_CONFIG
    assert load_model_config(tmp_path / "config.json") == QWEN3_4B_CONFIG
    (tmp_path / "empty").mkdir()
    with pytest.raises(CostError, match="no config.json"):
        load_model_config(tmp_path / "empty")

    asked = []

    def fake_download(repo, filename):
        asked.append((repo, filename))
        return str(tmp_path / "config.json")

    assert load_model_config("Qwen/Qwen3-4B", download=fake_download) == QWEN3_4B_CONFIG
    assert asked == [("Qwen/Qwen3-4B", "config.json")]

    def offline(repo, filename):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    with pytest.raises(ModelLoadError, match="cannot fetch config.json of 'Qwen/Qwen3-4B'") as info:
        load_model_config("Qwen/Qwen3-4B", download=offline)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="neither a local path"):
        load_model_config(str(tmp_path / "missing" / "model"))


def test_resolve_inputs_from_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_4B_CONFIG, "torch_dtype": "float32"}))
    i, sources = resolve_inputs(model=str(tmp_path), tokens=1000)
    assert i.bytes_per_token == 2 * 147_456 and i.dtype_bytes == 4 and i.tokens == 1000
    assert "config.json" in sources["bytes_per_token"] and sources["tokens"] == "option"
    assert sources["ratio"] == "paper default"


# -- artifact header -----------------------------------------------------------------------------

def fake_header(tokens=3774, layers=36, per_layer_tensor=3774 * 8 * 128 * 2, dtype="float16"):
    tensors = [{"name": f"layers.{i}.{kind}", "nbytes": per_layer_tensor, "dtype": dtype}
               for i in range(layers) for kind in ("keys", "values")]
    tensors.append({"name": "logits", "nbytes": 151_936 * 4, "dtype": "float32"})
    return {"kv": {"num_tokens": tokens, "dtype": dtype}, "tensors": tensors}


def test_kv_size_from_header_sums_only_layer_tensors():
    assert kv_size_from_header(fake_header()) == (556_498_944, 3774, 2)
    assert kv_size_from_header(fake_header(dtype="float32", per_layer_tensor=100))[2] == 4
    i = CostInputs.from_artifact_bytes(556_498_944, 3774)
    assert i.bytes_per_token == 147_456 and i.tokens == 3774
    assert by_name(i)["ship-raw"].total == pytest.approx(by_name(CostInputs())["ship-raw"].total)


@pytest.mark.parametrize("header", [
    {}, {"kv": {}, "tensors": []}, {"kv": {"num_tokens": 0}, "tensors": []},
    {"kv": {"num_tokens": 10}, "tensors": [{"name": "logits", "nbytes": 40}]},
    {"kv": {"num_tokens": 10}, "tensors": [{"name": "layers.0.keys"}]},
])
def test_bad_headers_raise(header):
    with pytest.raises(CostError):
        kv_size_from_header(header)


def test_resolve_inputs_from_artifact():
    seen = []

    def read_header(path):
        seen.append(path)
        return fake_header(tokens=1000, layers=2, per_layer_tensor=1000 * 64)

    i, sources = resolve_inputs(artifact="doc.kvmlx", read_header=read_header)
    assert seen == ["doc.kvmlx"]
    assert i.tokens == 1000 and i.bytes_per_token == 4 * 64
    assert sources["tokens"] == "artifact doc.kvmlx"
    i2, _ = resolve_inputs(artifact="doc.kvmlx", read_header=read_header, tokens=500)
    assert i2.tokens == 500 and i2.bytes_per_token == 4 * 64


# -- bench JSON ----------------------------------------------------------------------------------

BENCH = {
    "machine": "M1 Pro",
    "results": [
        {"tokens": 255, "prefill_over_load_first_token": 8.6},
        {"tokens": 945, "prefill_over_load_first_token": 21.0},
        {"tokens": 3774, "prefill_over_load_first_token": 49.7},
        {"tokens": 8000},
    ],
}


def test_ratio_from_bench_takes_the_nearest_row():
    assert ratio_from_bench(BENCH, 3774).ratio == 49.7
    assert ratio_from_bench(BENCH, 3000) == ratio_from_bench(BENCH, 3774)
    assert ratio_from_bench(BENCH, 10).ratio == 8.6
    assert ratio_from_bench(BENCH, 20000).tokens == 3774  # the row without a ratio is skipped
    assert ratio_from_bench(BENCH, 600).tokens == 255  # a tie goes to the shorter row


@pytest.mark.parametrize("data,match", [
    ({}, "'results'"),
    ({"results": []}, "'results'"),
    ({"rows": BENCH["results"]}, "'results'"),
    ({"results": [{"tokens": 100}]}, "prefill_over_load_first_token"),
    ({"results": [{"prefill_over_load_first_token": 3.0}]}, "tokens"),
    ({"results": [{"tokens": 100, "prefill_over_load_first_token": "fast"}]}, "prefill_over_load_first_token"),
    ({"results": [{"tokens": 100, "prefill_over_load_first_token": 0.0}]}, "not > 0"),
])
def test_bench_without_the_keys_fails_clearly(data, match):
    with pytest.raises(CostError, match=match) as info:
        ratio_from_bench(data, 3774)
    assert "\n" not in str(info.value)


def test_bench_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(BENCH))
    assert load_bench(path) == BENCH
    i, sources = resolve_inputs(bench=path, tokens=900)
    assert i.ratio == 21.0 and "row at 945 tokens" in sources["ratio"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CostError, match="not valid JSON"):
        load_bench(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(CostError, match="JSON object"):
        load_bench(tmp_path / "list.json")
    with pytest.raises(CostError, match="cannot read"):
        load_bench(tmp_path / "absent.json")


# -- reports -------------------------------------------------------------------------------------

def test_report_dict_is_strict_json():
    i, sources = resolve_inputs()
    report = report_dict(i, strategy_costs(i), sources)
    text = json.dumps(report, allow_nan=False)
    back = json.loads(text)
    names = [s["name"] for s in back["strategies"]]
    assert names == ["re-prefill", "hosted-tariff", "hosted-physical", "ship-raw", "ship-int8"]
    assert back["strategies"][3]["break_even"] is None
    assert back["strategies"][0]["total"] == pytest.approx(1_509_600)
    assert back["derived"]["kv_bytes"] == 556_498_944 and back["derived"]["gb_unit"] == "paper"
    assert back["inputs"]["readers"] == 80_000_000


def test_format_table_lists_every_strategy():
    text = format_table(CostInputs())
    for needle in ("re-prefill", "1,509,600.00", "150,960.02", "30,374.26", "3,943,257.46", "1,986,815.86",
                   "never", "1.111"):
        assert needle in text


# -- plot ----------------------------------------------------------------------------------------

def test_plot_writes_a_png_with_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = plot(CostInputs(storage_per_gb_month=0.023, months=12, compression_ratio=1.3), tmp_path / "cost.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)[..., :3]
    assert img.shape[0] > 300 and img.shape[1] > 500
    not_white = np.any(img < 0.95, axis=-1).mean()
    assert 0.02 < not_white < 0.6  # lines, text and axes, not a blank (or black) canvas
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
    # the curves' colours are there: ship-raw red (tab:red = #d62728) and hosted-physical green (#2ca02c)
    for rgb in ((0xD6, 0x27, 0x28), (0x2C, 0xA0, 0x2C)):
        close = np.all(np.abs(img * 255 - np.array(rgb)) < 12, axis=-1)
        assert close.sum() > 200


def test_plot_reports_an_unwritable_path(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(CostError, match="cannot write plot"):
        plot(CostInputs(), tmp_path / "no" / "such" / "dir" / "cost.png")
