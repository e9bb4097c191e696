"""The built-in models: deterministic, loadable offline by mlx_lm, and non-degenerate under greedy decoding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step

from kvmlx import models
from kvmlx.errors import ModelLoadError

SAMPLE = (Path(models.__file__).parent / "data" / "sample_document.txt").read_text(encoding="utf-8")
FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return models.build_builtin(tmp_path_factory.mktemp("builtin") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return mlx_lm.load(str(tiny_dir))


def read(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in FILES}


def greedy(model, prompt: list[int], n: int = 32) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=n)  # default sampler: argmax
    return [token for token, _ in steps]


def test_build_is_byte_identical(tiny_dir, tmp_path):
    again = models.build_builtin(tmp_path / "again", "tiny")
    assert sorted(p.name for p in again.iterdir()) == FILES  # no leftovers, nothing missing
    assert read(again) == read(tiny_dir)


def test_weight_index_maps_every_tensor(tiny_dir):
    """mlx-lm's pipeline sharding picks each stage's files from model.safetensors.index.json."""
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    names = set(mx.load(str(tiny_dir / "model.safetensors")))
    assert set(index["weight_map"]) == names and set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in mx.load(str(tiny_dir / "model.safetensors")).values())


def test_pipeline_preset_is_a_qwen2_with_shard_and_pipeline(tmp_path):
    """builtin:tiny-qwen2 is the preset mlx-lm can shard both ways (qwen2 has shard() and pipeline())."""
    d = models.build_builtin(tmp_path / "q2", "tiny-qwen2")
    model, _ = mlx_lm.load(str(d))
    assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2"
    assert hasattr(model, "shard") and hasattr(model.model, "pipeline")
    assert len(set(greedy(model, list(range(3, 40)), 24))) > 8  # greedy output varies: exactness tests mean something


def test_seed_changes_weights_only(tiny_dir, tmp_path):
    other = read(models.build_builtin(tmp_path / "seed1", "tiny", seed=1))
    base = read(tiny_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"]


def test_corpus_changes_tokenizer_but_not_vocab_size_or_weights(tiny_dir, tmp_path):
    other_dir = models.build_builtin(tmp_path / "lower", "tiny", corpus=models.default_corpus().lower())
    other, base = read(other_dir), read(tiny_dir)
    assert other["tokenizer.json"] != base["tokenizer.json"]
    assert other["model.safetensors"] == base["model.safetensors"]
    _, tokenizer = mlx_lm.load(str(other_dir))
    assert len(tokenizer._tokenizer) == models.PRESETS["tiny"]["vocab_size"]


def test_too_small_corpus_is_refused_without_leftovers(tmp_path):
    with pytest.raises(ValueError, match="corpus supports only"):
        models.build_builtin(tmp_path / "m", "tiny", corpus="too little text")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_refused(tiny_dir):
    with pytest.raises(FileExistsError):
        models.build_builtin(tiny_dir, "tiny")


def test_tokenizer(tiny, tiny_dir):
    _, tokenizer = tiny
    text = "Publish the KV cache once; agents load it. Unicode too: Ωμέγα, 你好, 🚀\n\n  indented"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert 300 <= len(tokenizer.encode(SAMPLE)) <= 600


def test_loads_with_network_disabled(tiny_dir):
    code = f"import mlx_lm; m, t = mlx_lm.load({str(tiny_dir)!r}); print(t.encode('KV cache'))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_tiny_greedy_output_varies(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(SAMPLE)
    for cut in (64, len(prompt)):
        assert len(set(greedy(model, prompt[:cut]))) >= 8


def test_small_greedy_output_varies(tmp_path):
    model, tokenizer = mlx_lm.load(str(models.build_builtin(tmp_path / "small", "small")))
    assert len(set(greedy(model, tokenizer.encode(SAMPLE)[:64]))) >= 8  # a short prompt: ~50 tokens/s here


def test_llama_variant(tmp_path):
    model, tokenizer, config = mlx_lm.load(str(models.build_builtin(tmp_path / "llama", "tiny", model_type="llama")),
                                           return_config=True)
    assert config["model_type"] == "llama" and type(model).__module__ == "mlx_lm.models.llama"
    assert len(set(greedy(model, tokenizer.encode(SAMPLE)[:64]))) >= 8


def test_load_model_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLX_HOME", str(tmp_path))
    loaded = models.load_model(None)
    assert (loaded.model_id, loaded.dtype, loaded.config["model_type"]) == ("builtin:tiny", "bfloat16", "qwen3")
    assert loaded.path.parent == tmp_path / "models" and (loaded.path / "config.json").exists()

    as_f32 = models.load_model("builtin:tiny", dtype="float32")
    assert (as_f32.model_id, as_f32.dtype, as_f32.path) == ("builtin:tiny", "float32", loaded.path)
    assert models.model_dtype(as_f32.model) == "float32"
    assert len(list((tmp_path / "models").iterdir())) == 1  # built once, then reused


def test_builtin_path_survives_a_concurrent_build(tmp_path, monkeypatch):
    """Another process renames its build into place while ours runs: ours is discarded, theirs used."""
    monkeypatch.setenv("KVMLX_HOME", str(tmp_path))
    build, random_weights = models.build_builtin, models._random_weights
    calls = []

    def recording_build(path, preset):
        calls.append(path)
        return build(path, preset)

    def racing_weights(cfg, seed):
        if len(calls) == 1:  # mid-build: the other process finishes first
            calls.append("other")
            build(calls[0], "tiny")
        return random_weights(cfg, seed)

    monkeypatch.setattr(models, "build_builtin", recording_build)
    monkeypatch.setattr(models, "_random_weights", racing_weights)
    path = models.builtin_path("tiny")
    assert calls == [path, "other"]
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert list(path.parent.iterdir()) == [path]  # our half of the race left no temp directory


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory"):
        models.load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="config.json"):
        models.load_model(str(tmp_path))  # exists, but holds no model
    with pytest.raises(ModelLoadError, match="unknown built-in"):
        models.load_model("builtin:huge")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        models.load_model("builtin:tiny", dtype="int8")


def test_kvmlx_home(monkeypatch, tmp_path):
    monkeypatch.delenv("KVMLX_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.kvmlx_home() == tmp_path / ".cache" / "kvmlx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.kvmlx_home() == tmp_path / "xdg" / "kvmlx"
    monkeypatch.setenv("KVMLX_HOME", str(tmp_path / "k"))
    assert models.kvmlx_home() == tmp_path / "k"
