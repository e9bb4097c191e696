"""The `kvmlx` command: help everywhere, JSON outputs, exit codes, one-line errors."""

import importlib
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kvmlx.cli import EXIT_NOT_EXACT, main

COMMANDS = ["publish", "generate", "inspect", "demo", "cost", "store", "bench", "serve", "verify", "keygen", "trust", "serve-artifacts", "fetch", "token", "push", "pull"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def published(tmp_path_factory, runner, tiny, document):
    tmp = tmp_path_factory.mktemp("cli")
    doc = tmp / "doc.txt"
    doc.write_text(document[:600], encoding="utf-8")
    out = tmp / "doc.kvmlx"
    result = runner.invoke(main, ["publish", str(doc), "--out", str(out), "--chunk-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_everywhere(runner, command):
    result = runner.invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_publish_json(published):
    path, summary = published
    assert path.exists() and summary["tokens"] > 50 and summary["dtype"] == "bfloat16"
    assert summary["artifact_bytes"] == path.stat().st_size
    assert summary["model_fingerprint"].startswith("fp2:blake3:")


def test_publish_from_stdin(runner, tmp_path, document):
    out = tmp_path / "stdin.kvmlx"
    result = runner.invoke(main, ["publish", "-", "--out", str(out)], input=document[:200])
    assert result.exit_code == 0, result.output
    assert "published" in result.output and out.exists()


def test_inspect(runner, published):
    path, summary = published
    text = runner.invoke(main, ["inspect", str(path)])
    assert text.exit_code == 0 and "builtin:tiny" in text.output and "bfloat16" in text.output
    header = json.loads(runner.invoke(main, ["inspect", str(path), "--json"]).output)
    assert header["kv"]["num_tokens"] == summary["tokens"] and header["version"] == 3 and "caches" not in header


def test_generate_streams_text(runner, published):
    path, _ = published
    result = runner.invoke(main, ["generate", str(path), "--prompt", " Next:", "-n", "8"])
    assert result.exit_code == 0 and result.output.strip()


def test_generate_json(runner, published):
    path, summary = published
    out = json.loads(runner.invoke(main, ["generate", str(path), "--prompt", " Next:", "-n", "8", "--json"]).output)
    assert out["reused_tokens"] == summary["tokens"] and out["prefilled_tokens"] > 0 and len(out["tokens"]) <= 8
    assert out["load_path"] == "copy"


def test_generate_verify_json(runner, published):
    path, summary = published
    result = runner.invoke(main, ["generate", str(path), "--prompt", " Next:", "--verify", "--single-pass", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    for key in ("token_exact", "tokens_compared", "max_abs_logit_diff", "artifact_bytes", "load_seconds",
                "prefill_seconds", "reuse_first_token_seconds"):
        assert key in out
    assert out["token_exact"] is True and out["tokens_compared"] >= 24 and out["max_abs_logit_diff"] == 0.0
    assert out["artifact_bytes"] == summary["artifact_bytes"]
    assert out["single_pass"]["token_exact"] is True


def test_not_exact_exits_3(runner, published, monkeypatch):
    """A diverging reuse (simulated: the comparison reports a mismatch) must fail the command."""
    gen = importlib.import_module("kvmlx.runtime.generate")  # `kvmlx.runtime.generate` the attribute is the function
    real = gen.compare
    monkeypatch.setattr(gen, "compare", lambda a, b: {**real(a, b), "token_exact": False, "first_mismatch": 3})
    result = runner.invoke(main, ["generate", str(published[0]), "--verify"])
    assert result.exit_code == EXIT_NOT_EXACT
    assert "NOT exact (first difference at token 3)" in result.output


def test_errors_are_one_line_with_exit_1(runner, tmp_path, published):
    bad = tmp_path / "bad.kvmlx"
    bad.write_bytes(published[0].read_bytes()[:5000])
    for args in (["inspect", str(bad)], ["generate", str(bad)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and "truncated" in lines[0]
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_wrong_dtype_flag_is_refused(runner, published):
    result = runner.invoke(main, ["generate", str(published[0]), "--dtype", "float32"])
    assert result.exit_code == 1 and "float32" in result.output


def test_usage_error_exit_2(runner, published):
    result = runner.invoke(main, ["generate", str(published[0]), "--max-tokens", "0"])
    assert result.exit_code == 2


def test_demo_json(runner):
    result = runner.invoke(main, ["demo", "--json", "-n", "24"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["token_exact"] is True and out["tokens_compared"] == 24
    assert out["max_abs_logit_diff"] == 0.0 and out["reused_tokens"] == out["document_tokens"]


def test_console_script_runs_in_a_subprocess(tmp_path):
    """The installed entry point, as a user runs it (piped: no progress bar, plain output)."""
    env = {**os.environ}
    result = subprocess.run([sys.executable, "-m", "kvmlx", "demo"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "TOKEN-EXACT" in result.stdout and result.stderr == ""


def test_cost_defaults_reproduce_the_paper(runner, published, tmp_path):
    out = json.loads(runner.invoke(main, ["cost", "--json"]).output)
    totals = {s["name"]: s["total"] for s in out["strategies"]}
    assert round(totals["re-prefill"]) == 1_509_600
    from_artifact = json.loads(runner.invoke(main, ["cost", "--json", "--artifact", str(published[0])]).output)
    assert from_artifact["inputs"]["tokens"] == published[1]["tokens"]
    png = tmp_path / "cost.png"
    assert runner.invoke(main, ["cost", "--plot", str(png)]).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_json_reports_where_the_time_goes(runner, published, tmp_path):
    """--json `timings`: import, model load, fingerprints, KV load, suffix prefill, decode (seconds)."""
    keys = {"import", "model_load", "fingerprints", "kv_load", "suffix_prefill", "decode", "command"}
    out = json.loads(runner.invoke(main, ["generate", str(published[0]), "--prompt", " Next:", "-n", "4", "--json"]).output)
    assert set(out["timings"]) == keys and all(v >= 0 for v in out["timings"].values())
    assert out["timings"]["kv_load"] == out["load_seconds"] and out["digests"] in ("hashed", "remembered")
    doc = tmp_path / "d.txt"
    doc.write_text("A short document for the store. " * 4, encoding="utf-8")
    store = tmp_path / "store"
    assert runner.invoke(main, ["publish", str(doc), "--store-dir", str(store)]).exit_code == 0
    res = runner.invoke(main, ["generate", "--store", str(store), "--prompt", doc.read_text() + " More", "-n", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["timings"]) == keys


class _EosAtStep:
    """A model whose `step`-th call (counting the suffix prefill's calls) puts all its weight on the EOS id."""

    def __init__(self, model, eos: int, step: int):
        self._model, self._eos, self._step, self._calls = model, eos, step, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        import mlx.core as mx

        out = self._model(*args, **kwargs)
        self._calls += 1
        if self._calls == self._step:
            bump = mx.zeros((out.shape[-1],), dtype=out.dtype).at[self._eos].add(1e4)
            out = out + bump
        return out


def test_generate_stops_at_eos_without_printing_it(runner, published, monkeypatch):
    """As `mlx_lm.generate`: the text ends at the end-of-sequence token and never shows its marker
    (streamed and --json); the token ids keep it."""
    import dataclasses

    import kvmlx.cli.artifact as cli_artifact

    path, _ = published
    real = cli_artifact.load_model
    eos_ids = []

    def forced(*args, **kwargs):
        lm = real(*args, **kwargs)
        eos = min(lm.tokenizer.eos_token_ids)
        eos_ids.append(eos)
        return dataclasses.replace(lm, model=_EosAtStep(lm.model, eos, step=4))  # the suffix prefill makes 2 calls

    monkeypatch.setattr(cli_artifact, "load_model", forced)
    args = ["generate", str(path), "--prompt", " Next:", "-n", "8"]
    out = json.loads(runner.invoke(main, [*args, "--json"]).output)
    marker = real("builtin:tiny").tokenizer.convert_ids_to_tokens(eos_ids[0])
    assert marker == "<|im_end|>"
    assert len(out["tokens"]) == 3 and out["tokens"][-1] == eos_ids[0]  # stopped at EOS, id kept
    assert marker not in out["text"] and out["text"] == real("builtin:tiny").tokenizer.decode(out["tokens"][:2])
    streamed = runner.invoke(main, args)
    assert streamed.exit_code == 0, streamed.output
    assert marker not in streamed.output and streamed.output == out["text"] + "\n"
    verified = json.loads(runner.invoke(main, [*args, "--verify", "--json"]).output)
    assert marker not in verified["text"] and len(verified["tokens"]) == 8  # verify decodes through EOS
