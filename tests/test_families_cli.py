"""The cache families from the command line: `publish --kv-bits/--checkpoint-every`, `generate --verify`,
`inspect` per layer group, one-line refusals (exit 1), and quantized-weight models staying token-exact."""

import json

import pytest
from click.testing import CliRunner

from kvmlx.cli import main
from kvmlx.models import builtin_path, load_model
from kvmlx.runtime.generate import verify
from kvmlx.runtime.publish import publish


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("cli-families") / "doc.txt"
    path.write_text(document[:900], encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["hybrid", "sliding", "gpt-oss"])
def test_publish_verify_inspect_per_preset(runner, doc_file, tmp_path, name):
    out = tmp_path / f"{name}.kvmlx"
    r = runner.invoke(main, ["publish", str(doc_file), "-m", f"builtin:{name}", "--chunk-size", "32",
                             "--checkpoint-every", "64", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["format_version"] == 3 and summary["checkpoint_every"] == 64 and summary["checkpoints"] >= 2
    r = runner.invoke(main, ["generate", str(out), "-p", " And then the", "-n", "24", "--verify", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["token_exact"] and report["tokens_compared"] == 24 and report["max_abs_logit_diff"] == 0.0
    text = runner.invoke(main, ["inspect", str(out)]).output
    expected = {"hybrid": "layers 0-2 recurrent state (ArraysCache, 2 slots); checkpoints at 64, 128",
                "sliding": "layers 0,2 sliding window of 32 tokens (RotatingKVCache, keep 0); checkpoints at 64, 128",
                "gpt-oss": "layers 0,2 sliding window of 32 tokens (RotatingKVCache, keep 0); checkpoints at 64, 128"}[name]
    assert expected in " ".join(text.split())
    assert "weights" in text and "not quantized" in text


def test_kv_bits_from_the_cli_and_one_line_refusals(runner, doc_file, tmp_path):
    out = tmp_path / "q8.kvmlx"
    r = runner.invoke(main, ["publish", str(doc_file), "--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0",
                             "--chunk-size", "32", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["kv_quantization"] == {"bits": 8, "group_size": 32, "start": 0}
    r = runner.invoke(main, ["generate", str(out), "-p", " And", "-n", "24", "--verify", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["max_abs_logit_diff"] == 0.0
    assert "8 bits, group 32, from token 0" in runner.invoke(main, ["inspect", str(out)]).output
    r = runner.invoke(main, ["generate", str(out), "-p", " And", "--kv-bits", "8", "--kv-group-size", "64",
                             "--quantized-kv-start", "0"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = r.output.strip()
    assert "\n" not in line and "--kv-group-size 32" in line and "--kv-group-size 64" in line
    r = runner.invoke(main, ["publish", str(doc_file), "--chunk-size", "32", "--checkpoint-every", "48", "-o", str(out)])
    assert r.exit_code == 2 and "not a multiple of --chunk-size 32" in r.output


def test_quantized_weight_models_stay_token_exact(tmp_path, document):
    """mlx-community style 4- and 8-bit weights (mlx_lm.convert -q): publish, reload, continue exactly."""
    from mlx_lm import convert

    for bits in (4, 8):
        q = tmp_path / f"tiny-q{bits}"
        convert(str(builtin_path("tiny")), mlx_path=str(q), quantize=True, q_bits=bits, q_group_size=64)
        lm = load_model(str(q))
        assert lm.config["quantization"]["bits"] == bits
        path = tmp_path / f"q{bits}.kvmlx"
        result = publish(lm, lm.tokenizer.encode(document)[:120], path, chunk_size=32)
        assert result.header["model"]["weights_quantization"]["bits"] == bits
        report = verify(path, lm, " And then the", max_tokens=24)
        assert report.token_exact and report.max_abs_logit_diff == 0.0
        assert len(set(report.reuse.tokens)) > 4


def test_bench_for_a_hybrid_model_reports_each_family(runner, tmp_path):
    png = tmp_path / "families.png"
    r = runner.invoke(main, ["bench", "--model", "builtin:hybrid", "--lengths", "200", "--runs", "1", "--json",
                             "--plot", str(png)])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert {g["family"] for g in row["groups"]} == {"arrays", "kv"}
    assert row["token_exact"] and row["max_abs_logit_diff"] == 0.0
    assert row["prefix_reused"] == 64 and row["prefix_token_exact"]  # 60% of 200 shared: the checkpoint at 64
    assert row["spacings"]["64"]["checkpoints"] == 3 and row["checkpoint_every"] % 64 == 0
    kv = next(g for g in row["groups"] if g["family"] == "kv")
    assert kv["bytes_per_token"] == 2 * 2 * 32 * 2  # one full-attention layer: keys + values, 2 heads x 32, bfloat16
    assert row["load_seconds"]["median"] > 0 and row["mlx_lm_load_seconds"]["median"] > 0
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("case, words", [
    ("checkpoint off a chunk boundary", "is not on a prefill-chunk boundary (chunk size 8)"),
    ("window smaller than the model's", "layer 0: artifact sliding window is 16, this model's is 32"),
    ("family unknown", "unknown cache family 'mamba2'"),
])
def test_bad_v2_artifacts_are_one_line_errors_on_the_cli(runner, preset, tmp_path, case, words):
    from fuzz_corpus import corpus_v2

    lm = preset("sliding")
    good = tmp_path / "good.kvmlx"
    publish(lm, lm.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over. " * 4)[:48], good,
            chunk_size=8, checkpoint_every=16, format_version=2)  # the corpus patches kvmlx's own container
    bad = tmp_path / "bad.kvmlx"
    bad.write_bytes(corpus_v2(good.read_bytes())[case])
    r = runner.invoke(main, ["generate", str(bad), "-m", "builtin:sliding", "-p", " x", "-n", "2"])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and words in r.output and "Traceback" not in r.output
