"""Load a model for kvmlx, and build the built-in random-weight Qwen3 used by tests, demo and benchmarks.

The built-in models need no network: a byte-level BPE is trained on ``kvmlx/data/corpus.txt`` and the
weights come from a seeded numpy generator, so every machine builds byte-identical files (and therefore
the same model and tokenizer fingerprints). They are written in the Hugging Face layout, so the same
``mlx_lm.load`` call loads them and real checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from .errors import ModelLoadError

if TYPE_CHECKING:  # importing mlx_lm imports transformers (~1.5 s): done lazily where needed
    from mlx_lm.tokenizer_utils import TokenizerWrapper

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# Ids 0, 1, 2 in that order; eos is <|im_end|> as in Qwen's chat models.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Matrices (projections and the tied embedding) are drawn N(0, (GAIN / sqrt(fan_in))^2). At gain 1 greedy
# decoding of a random model falls into short loops (tiny: 3 distinct tokens in 32 after the whole sample
# document), and a token-exactness test on a loop compares almost nothing. Gain 3 lets the attention and
# MLP outputs outweigh the input embedding in the residual stream and spreads the logits (std ~3): 32
# greedy tokens then hold 13-32 distinct ones for tiny over 10 seeds and 29-32 for small, qwen3 and llama
# alike. Gain 2 was weaker (17 for tiny), gain 4 collapsed again (9).
GAIN = 3.0

# Sizes only; the fields every built-in shares are added by _config. vocab_size is both the
# embedding size and the exact size of the trained tokenizer.
PRESETS: dict[str, dict] = {
    # ~0.9M params: builds and loads in about a second, for tests.
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        vocab_size=1024,
    ),
    # ~25M params, Qwen3's head_dim 128 and 4:1 GQA, for benchmarks: prefills ~50 tokens/s on a 2-core CPU.
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        intermediate_size=1024,
        vocab_size=4096,
    ),
    # One per mlx-lm cache family (caches/), tiny like `tiny`: a hybrid Qwen3-Next (Gated DeltaNet layers
    # with ArraysCache recurrent state, every 4th layer full attention with KVCache), a Gemma-3-style
    # model alternating a 32-token sliding window (RotatingKVCache, shorter than the sample document)
    # with full attention, and a gpt-oss-style one (sliding/full attention, mixture-of-experts).
    "hybrid": dict(
        model_type="qwen3_next", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, vocab_size=1024, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4, full_attention_interval=4,
        num_experts=0, num_experts_per_tok=0, decoder_sparse_step=1, shared_expert_intermediate_size=0,
        mlp_only_layers=[], moe_intermediate_size=0, partial_rotary_factor=0.25,
    ),
    "sliding": dict(
        model_type="gemma3_text", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=384, vocab_size=1024, sliding_window=32, sliding_window_pattern=2,
        query_pre_attn_scalar=32, rope_local_base_freq=10000.0,
    ),
    # MLX's CPU backend runs the experts' GatherMM only in float32: load_model defaults this preset to
    # float32 where Metal is not available (bfloat16 there raises "[GatherMM::eval] Currently only supports float32").
    "gpt-oss": dict(
        model_type="gpt_oss", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=128, vocab_size=1024, sliding_window=32, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"] * 2,
    ),
}
FLOAT32_OFF_METAL = {"gpt-oss"}  # presets whose kernels only run in float32 on MLX's CPU backend
SHARDED = {"hybrid", "sliding", "gpt-oss"}  # presets written as two shards + model.safetensors.index.json

_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}
# Bump when the build recipe changes, so builtin_path stops reusing models built by the old recipe.
_RECIPE_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    model_id: str  # "builtin:tiny", "builtin:small", a local path as given, or a Hugging Face repo id
    path: Path  # local directory holding config.json, weights and tokenizer files
    config: dict  # contents of config.json
    dtype: str  # "float16" | "bfloat16" | "float32": the floating dtype the model runs in now


def kvmlx_home() -> Path:
    """$KVMLX_HOME, else $XDG_CACHE_HOME/kvmlx, else ~/.cache/kvmlx."""
    if home := os.environ.get("KVMLX_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvmlx"


def default_corpus() -> str:
    """The text the built-in tokenizers are trained on (kvmlx/data/corpus.txt)."""
    return resources.files("kvmlx").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def build_builtin(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    *,
    seed: int = 0,
    corpus: str | None = None,
    model_type: str | None = None,
) -> Path:
    """Write a random-weight model in the Hugging Face layout to ``out_dir`` (which must not exist).

    Built in a temporary sibling directory and renamed into place, so ``out_dir`` either does not
    exist or is complete. Raises FileExistsError if ``out_dir`` exists, also when another process
    renamed its own build there first.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    cfg = _config(preset, model_type)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"  # unique per build; mkdir obeys umask
    tmp.mkdir()
    try:
        tokenizer = _train_tokenizer(default_corpus() if corpus is None else corpus, cfg["vocab_size"])
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(cfg))
        _write_json(tmp / "config.json", cfg)
        weights = _random_weights(cfg, seed)
        if preset in SHARDED:
            _save_sharded(tmp, weights)
        else:
            _save_safetensors(tmp / "model.safetensors", weights)
        try:
            os.rename(tmp, out_dir)
        except OSError as e:  # a non-empty destination appeared meanwhile
            if out_dir.exists():
                raise FileExistsError(f"{out_dir} already exists") from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def builtin_path(preset: str = "tiny") -> Path:
    """The built-in model's directory under kvmlx_home(), built on first use and reused afterwards.

    The directory name carries a digest of the recipe (preset, corpus, gain, version), so a changed
    recipe builds a new model instead of silently reusing a stale one.
    """
    recipe = json.dumps(
        [_RECIPE_VERSION, GAIN, _config(preset), hashlib.sha256(default_corpus().encode()).hexdigest()]
    )
    path = kvmlx_home() / "models" / f"{preset}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if not path.exists():
        try:
            build_builtin(path, preset)
        except FileExistsError:
            pass  # another process finished the same build first; its copy is identical
    return path


def load_model(spec: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load ``spec`` ("builtin:<preset>", default "builtin:tiny"; a local directory; or a hub repo id).

    ``dtype`` casts the floating parameters; None keeps the stored dtype.
    """
    import mlx_lm  # imports transformers: keep it off kvmlx's import path

    spec = spec or "builtin:tiny"
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if spec.startswith("builtin:"):
        preset = spec.removeprefix("builtin:")
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown built-in model {spec!r}; expected one of "
                                 + ", ".join(f"builtin:{p}" for p in PRESETS))
        source = builtin_path(preset)
    else:
        source = Path(spec).expanduser()
        if not source.exists() and (source.is_absolute() or spec.startswith((".", "~"))):
            raise ModelLoadError(f"no model directory at {spec}")
    try:
        if source.exists():
            model, tokenizer, config = mlx_lm.load(str(source), return_config=True)
            path = source.resolve()
        else:  # a hub repo id: mlx_lm downloads it, then we find the snapshot it used
            model, tokenizer, config = mlx_lm.load(spec, return_config=True)
            path = mlx_lm.utils.hf_repo_to_path(spec)
    except Exception as e:
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise ModelLoadError(f"cannot load model {spec!r}: {reason}") from e
    if dtype is None and spec.removeprefix("builtin:") in FLOAT32_OFF_METAL and not mx.metal.is_available():
        dtype = "float32"  # MLX's CPU GatherMM (the experts) only supports float32
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
        mx.eval(model.parameters())  # pay the cast now, not inside the first timed forward
    return LoadedModel(model, tokenizer, spec, path, config, model_dtype(model))


def model_dtype(model: nn.Module) -> str:
    """The floating dtype holding most of the model's floating parameter elements."""
    sizes: Counter[mx.Dtype] = Counter()
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            sizes[p.dtype] += p.size
    if not sizes:
        raise ValueError("the model has no floating parameters")
    return str(sizes.most_common(1)[0][0]).removeprefix("mlx.core.")


def _config(preset: str, model_type: str | None = None) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    model_type = model_type or PRESETS[preset].get("model_type", "qwen3")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {', '.join(_ARCHITECTURES)}")
    cfg = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        **PRESETS[preset],
        "max_position_embeddings": 32768,
        "dtype": "bfloat16",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
    }
    cfg["torch_dtype"] = cfg["dtype"]  # transformers < 5 reads torch_dtype, >= 5 reads dtype
    if model_type == "llama":
        cfg["mlp_bias"] = False
    return cfg


def _train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE like Qwen's (any byte sequence encodes); training is deterministic."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        # The model's vocab size must not depend on the corpus: refuse rather than pad.
        raise ValueError(
            f"the corpus supports only {tokenizer.get_vocab_size()} tokens, the preset needs {vocab_size}"
        )
    return tokenizer


def _tokenizer_config(cfg: dict) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": cfg["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Weights for the mlx_lm model of ``cfg``, from numpy only (MLX's RNG may differ across versions).

    Each parameter gets its own generator keyed by (seed, crc32(name)): its values depend on nothing
    else. Vectors (the RMSNorm weights) are ones.
    """
    import importlib

    arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")  # one of _ARCHITECTURES
    model = arch.Model(arch.ModelArgs.from_dict(cfg))  # lazy: its own random init is never evaluated
    weights = {}
    for name, p in sorted(tree_flatten(model.parameters())):
        if p.ndim == 1:
            w = (np.zeros if name.endswith("bias") else np.ones)(p.shape, np.float32)
        else:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            fan_in = math.prod(p.shape[1:]) if p.ndim == 3 and p.shape[-1] == 1 else p.shape[-1]  # conv1d: (C, K, 1)
            w = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(GAIN / math.sqrt(fan_in))
        weights[name] = _cast(w, cfg["dtype"])
    return weights


def _cast(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> dtype, with bfloat16 as raw uint16 bits rounded to nearest even (as MLX and torch do)."""
    if dtype == "bfloat16":
        bits = w.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return w.astype({"float16": np.float16, "float32": np.float32}[dtype])


_SAFETENSORS_DTYPES = {np.dtype(np.uint16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


def _save_safetensors(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Write safetensors with tensors in sorted name order.

    ``mx.save_safetensors`` lays tensors out in hash-map order, which can differ between C++ standard
    libraries (Linux vs macOS): the bytes, hence the weights fingerprint, would depend on the machine.
    """
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name in sorted(weights):
        w = weights[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[w.dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + w.nbytes]}
        offset += w.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format allows trailing spaces; keeps tensors 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name in sorted(weights):
            f.write(weights[name].tobytes())  # little-endian, like every platform MLX runs on


def _save_sharded(directory: Path, weights: dict[str, np.ndarray], shards: int = 2) -> None:
    """Two (or `shards`) safetensors files split by name order, and `model.safetensors.index.json`
    (what pipeline-parallel loading and Hugging Face tools read to find each tensor)."""
    names = sorted(weights)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k * per : (k + 1) * per]}
        _save_safetensors(directory / file, part)
        weight_map.update({n: file for n in part})
        total += sum(w.nbytes for w in part.values())
    _write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
