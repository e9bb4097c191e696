"""mlx-lm interop through mlx-lm's own functions: `kvmlx export --mlx-lm` files load with
`load_prompt_cache` and continue token-exactly (also in `mlx_lm.generate`); `mlx_lm.cache_prompt` files
import into checked artifacts; bad imports are refused before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from kvmlx.cli import main
from kvmlx.errors import KvmlxError, TokenizerMismatchError, UnsupportedModelError
from kvmlx.models import builtin_path
from kvmlx.runtime.generate import continue_from
from kvmlx.runtime.interop import cache_prompt_tokens, export_mlx_lm, import_mlx_lm, read_mlx_lm_cache
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import publish

SUFFIX = " Question: what does the document say? Answer:"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny, document):
    tmp = tmp_path_factory.mktemp("interop")
    art = tmp / "doc.kvmlx"
    publish(tiny, document[:500], art, chunk_size=64)
    out = tmp / "doc.safetensors"
    res = export_mlx_lm(art, out)
    return art, out, res


def kvmlx_generate(art, lm, suffix, *, max_tokens, stop_at_eos=False, keep_logits=False):
    loaded = load_artifact(art, lm)
    return continue_from(lm, loaded, suffix, max_tokens=max_tokens, stop_at_eos=stop_at_eos, keep_logits=keep_logits), loaded


def _mlx_lm_greedy(model, caches, suffix, n):
    from mlx_lm.generate import generate_step

    tokens, rows = [], []
    for tok, logprobs in generate_step(mx.array(suffix), model, prompt_cache=caches, max_tokens=n,
                                       sampler=lambda x: mx.argmax(x, axis=-1)):
        tokens.append(int(tok))
        rows.append(np.array(logprobs.astype(mx.float32)))
    return tokens, rows


def test_export_loads_with_mlx_lm_and_continues_token_exactly(tiny, exported):
    art, out, res = exported
    caches, meta = load_prompt_cache(str(out), return_metadata=True)
    assert meta["model"] == str(builtin_path("tiny")) and res.model == meta["model"]
    loaded = load_artifact(art, tiny)
    assert all(c.offset == len(loaded.tokens) for c in caches)
    for c, k in zip(caches, loaded.caches):
        assert mx.array_equal(c.keys[..., : c.offset, :], k.keys[..., : k.offset, :]).item()
    suffix = list(tiny.tokenizer.encode(SUFFIX, add_special_tokens=False))
    ref, _ = kvmlx_generate(art, tiny, suffix, max_tokens=24, stop_at_eos=False, keep_logits=True)
    tokens, _ = _mlx_lm_greedy(tiny.model, caches, suffix, 24)
    assert tokens == ref.tokens and len(set(tokens)) > 1  # greedy output varies: the comparison means something
    # full logit rows over mlx-lm's loaded cache, same chunking as kvmlx (suffix in the artifact's chunk size)
    from kvmlx.runtime.generate import decode
    from kvmlx.runtime.publish import prefill
    fresh = load_prompt_cache(str(out))
    logits = prefill(tiny.model, suffix, fresh, loaded.header["kv"]["chunk_size"])
    toks, rows = decode(tiny.model, fresh, logits, 24, keep_logits=True)
    assert toks == ref.tokens
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref.logits, rows))
    assert diff == 0.0, diff  # bit-identical on the CPU backend


def test_mlx_lm_generate_cli_continues_from_the_export(tiny, exported):
    art, out, res = exported
    cmd = [sys.executable, "-m", "mlx_lm", "generate", "--model", res.model, "--prompt-cache-file", str(out),
           "--prompt", SUFFIX, "--max-tokens", "12", "--ignore-chat-template", "--temp", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout.split("==========")[1].strip("\n")
    suffix = list(tiny.tokenizer.encode(SUFFIX, add_special_tokens=False))
    ref, _ = kvmlx_generate(art, tiny, suffix, max_tokens=12, stop_at_eos=False)
    assert text == tiny.tokenizer.decode(ref.tokens).strip("\n") or text.strip() == tiny.tokenizer.decode(ref.tokens).strip()


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny, document):
    """A prompt cache made by mlx-lm's own `cache_prompt` command."""
    tmp = tmp_path_factory.mktemp("cache-prompt")
    doc = tmp / "doc.txt"
    doc.write_text(document[:400], encoding="utf-8")
    out = tmp / "cache.safetensors"
    r = subprocess.run([sys.executable, "-m", "mlx_lm", "cache_prompt", "--model", str(builtin_path("tiny")),
                        "--prompt", "-", "--prompt-cache-file", str(out)], input=doc.read_text(encoding="utf-8"),
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return doc, out


def test_import_round_trip_through_mlx_lm(tiny, cached, tmp_path):
    doc, cache_file = cached
    runner = CliRunner()
    art = tmp_path / "imported.kvmlx"
    result = runner.invoke(main, ["import", str(cache_file), "--document", str(doc), "--model", "builtin:tiny",
                                  "--out", str(art), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    text = doc.read_text(encoding="utf-8")
    tokens = cache_prompt_tokens(tiny, text)
    assert summary["tokens"] == len(tokens) and tiny.tokenizer.has_chat_template
    loaded = load_artifact(art, tiny)
    assert loaded.tokens == tokens
    theirs, _ = read_mlx_lm_cache(cache_file)
    for c, k in zip(theirs, loaded.caches):
        assert mx.array_equal(c.keys, k.keys[..., : k.offset, :]).item()
        assert mx.array_equal(c.values, k.values[..., : k.offset, :]).item()
    # and back out: mlx-lm's own loader sees the same KV again
    back = tmp_path / "back.safetensors"
    export_mlx_lm(art, back)
    again = load_prompt_cache(str(back))
    for c, k in zip(theirs, again):
        assert mx.array_equal(c.keys, k.keys[..., : k.offset, :]).item()
    # continuing from the import equals continuing from mlx-lm's own cache file
    suffix = list(tiny.tokenizer.encode(SUFFIX, add_special_tokens=False))
    ref, _ = kvmlx_generate(art, tiny, suffix, max_tokens=16, stop_at_eos=False)
    tokens_mlx, _ = _mlx_lm_greedy(tiny.model, load_prompt_cache(str(cache_file)), suffix, 16)
    assert ref.tokens == tokens_mlx


def test_import_refuses_other_documents_before_writing(tiny, cached, tmp_path):
    doc, cache_file = cached
    out = tmp_path / "x.kvmlx"
    text = doc.read_text(encoding="utf-8")
    with pytest.raises(TokenizerMismatchError, match="cache holds .* tokens but the document tokenizes to"):
        import_mlx_lm(cache_file, tiny, text + " and more words", out, check=lambda p: None)
    tokens = cache_prompt_tokens(tiny, text)
    forged = list(tokens)
    forged[5] = (forged[5] + 1) % 100  # same count, another token early on
    checked = []

    def check(path):
        from kvmlx.measure.spotcheck import spot_check
        checked.append(path)
        spot_check(path, tiny, recompute=16, probe=4).raise_if_failed()

    with pytest.raises(KvmlxError, match="differ"):
        import_mlx_lm(cache_file, tiny, text, out, check=check, tokens=forged)
    assert not out.exists() and not list(tmp_path.glob(".*"))  # nothing written, no staged file left


def test_import_refuses_other_cache_classes(tiny, tmp_path):
    from mlx_lm.models.cache import RotatingKVCache

    c = RotatingKVCache(max_size=8)
    c.update_and_fetch(mx.zeros((1, 2, 4, 32), mx.bfloat16), mx.zeros((1, 2, 4, 32), mx.bfloat16))
    path = tmp_path / "rot.safetensors"
    save_prompt_cache(str(path), [c] * 4)
    with pytest.raises(UnsupportedModelError, match="RotatingKVCache"):
        read_mlx_lm_cache(path)


def test_cli_import_errors_are_one_line(tiny, cached, tmp_path):
    doc, cache_file = cached
    other = tmp_path / "other.txt"
    other.write_text("something else entirely", encoding="utf-8")
    r = CliRunner().invoke(main, ["import", str(cache_file), "--document", str(other), "--model", "builtin:tiny",
                                  "--out", str(tmp_path / "x.kvmlx")])
    assert r.exit_code == 1 and "tokenizes to" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.kvmlx").exists()


def test_bench_cli_compares_the_two_commands(tmp_path):
    """`kvmlx bench --cli`: kvmlx generate and mlx_lm.generate --prompt-cache-file, same text, measured."""
    r = subprocess.run([sys.executable, "-m", "kvmlx", "bench", "--cli", "--model", "builtin:tiny", "--doc-tokens", "60",
                        "--runs", "1", "--answer-tokens", "8", "--dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["mode"] == "cli" and out["tokens"] == 60 and out["same_text"] is True, out["texts"]
    for side in ("kvmlx", "mlx_lm"):
        assert out["first_run"][side]["wall_s"] > 0 and out["first_run"][side]["peak_rss_bytes"] > 10_000_000
    assert {"import", "model_load", "fingerprints", "kv_load", "suffix_prefill", "decode"} <= set(out["kvmlx_timings_last_run"])
    assert [t["target"] for t in out["targets"]] == ["wall_ratio <= 1.0", "rss_ratio <= 1.05"]
    assert set(out["bytecode"]) == {"kvmlx", "mlx_lm"}  # both run from compiled modules where they can
    assert list(tmp_path.iterdir()) == []  # the temporary artifacts are gone


def test_bench_cli_refuses_other_modes():
    from click.testing import CliRunner

    from kvmlx.cli import main

    r = CliRunner().invoke(main, ["bench", "--cli", "--shape", "qwen3-4b"])
    assert r.exit_code == 2 and "--cli is a mode of its own" in r.output


def test_interop_is_plain_kv_only_and_says_so(preset, cached, tmp_path):
    """A version-2 artifact (sliding window, state checkpoints) is not exported, and a model whose caches
    are not all KVCache imports nothing: typed errors naming why, nothing written."""
    lm = preset("sliding")
    art = tmp_path / "sliding.kvmlx"
    publish(lm, lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:40], art, chunk_size=8,
            checkpoint_every=16)
    with pytest.raises(UnsupportedModelError, match=r"version-2 artifact \(rotating, kv\)"):
        export_mlx_lm(art, tmp_path / "o.safetensors")
    doc, cache_file = cached
    with pytest.raises(UnsupportedModelError, match="plain KVCache"):
        import_mlx_lm(cache_file, lm, doc, tmp_path / "i.kvmlx", check=lambda p: None)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "i.kvmlx").exists()
