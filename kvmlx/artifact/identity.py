"""What binds a KV cache to its producer: model and tokenizer fingerprints, KV geometry, the binding check.

A KV cache is only meaningful for the exact weights, tokenizer and dtype that computed it, so an
artifact records all three and `check_binding` refuses any difference with a message naming it.

Model fingerprint (cheap enough to recompute on every load):
    BLAKE3 over canonical JSON of config.json (minus keys that do not change the computation), then,
    for every parameter in name order: its name, dtype and shape, up to 4096 elements sampled at an
    even stride, and the sum of all its elements' raw bit patterns modulo 2**32. The wrapping
    integer sum reads every weight once (memory bandwidth, on the GPU where there is one) and is
    order-independent, so it is identical on every backend; any single changed weight changes it.
Tokenizer fingerprint:
    BLAKE3 over canonical JSON of the vocabulary, the BPE merges (if any), the added tokens, the
    chat template, the EOS ids, and the ids a fixed probe text encodes to (which captures
    normalisation and pre-tokenisation without depending on how a library version serialises them).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import blake3
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import DtypeMismatchError, ModelMismatchError, TokenizerMismatchError
from .format import canonical_json

FINGERPRINT_VERSION = 1
SAMPLES_PER_TENSOR = 4096
# config.json keys that describe the file, not the computation (a dtype difference is checked on its own).
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache", "architectures"})
ROPE_KEYS = ("rope_theta", "rope_traditional", "rope_scaling", "partial_rotary_factor", "max_position_embeddings")
PROBE_TEXT = (
    "KV reuse: 'Hello, world!'  Tabs\tand\nnew lines, digits 0123456789, ÄÖÜ ß é, 中文, emoji 🙂, "
    "<|im_start|>user\nspecial tokens<|im_end|>  trailing spaces   "
)
_BIT_VIEW = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}

_memo: dict[int, str] = {}


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a model's KV cache: `num_layers` pairs of [1, num_kv_heads, L, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def _tag(h: "blake3.blake3") -> str:
    return f"blake3:{h.hexdigest()}"


def _memoised(obj: Any, compute: Callable[[], str]) -> str:
    """Compute a fingerprint once per live object (models are dicts: unhashable, but weakly referable)."""
    key = id(obj)
    if key not in _memo:
        _memo[key] = compute()
        weakref.finalize(obj, _memo.pop, key, None)
    return _memo[key]


def model_fingerprint(model: Any, config: dict) -> str:
    """The model fingerprint described in the module docstring (memoised per model object: do not
    change the weights of a model after fingerprinting it)."""
    return _memoised(model, lambda: _model_fingerprint(model, config))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer fingerprint described in the module docstring (memoised per tokenizer)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return _memoised(hf, lambda: _tokenizer_fingerprint(tokenizer, hf))


def _model_fingerprint(model: Any, config: dict) -> str:
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    samples, sums = [], []
    for _, p in params:
        bits = p.view(_BIT_VIEW[p.dtype.size]).reshape(-1) if p.dtype.size in _BIT_VIEW else p.reshape(-1)
        stride = max(1, bits.size // SAMPLES_PER_TENSOR)
        samples.append(bits[::stride][:SAMPLES_PER_TENSOR])
        sums.append(mx.sum(bits.astype(mx.uint32)))
    mx.eval(samples, sums)
    h = blake3.blake3()
    cfg = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    h.update(canonical_json({"fingerprint_version": FINGERPRINT_VERSION, "config": cfg}))
    for (name, p), sample, total in zip(params, samples, sums):
        h.update(canonical_json([name, str(p.dtype).split(".")[-1], list(p.shape), int(total.item())]))
        h.update(np.asarray(sample).tobytes())
    return _tag(h)


def _tokenizer_fingerprint(tokenizer: Any, hf: Any) -> str:
    backend = getattr(hf, "backend_tokenizer", None)
    merges: list[str] = []
    added: list[Any] = []
    if backend is not None:
        spec = json.loads(backend.to_str())
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec.get("model", {}).get("merges", []) or []]
        added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens", []))
    eos = getattr(tokenizer, "eos_token_ids", None) or [getattr(hf, "eos_token_id", None)]
    fields = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "vocab": sorted(hf.get_vocab().items(), key=lambda kv: kv[1]),
        "merges": merges,
        "added_tokens": added,
        "chat_template": getattr(hf, "chat_template", None),
        "eos_token_ids": sorted(int(e) for e in eos if e is not None),
        "probe": list(hf.encode(PROBE_TEXT)),
    }
    return _tag(blake3.blake3(canonical_json(fields)))


def config_geometry(model: Any, config: dict) -> KVGeometry | None:
    """The KV geometry the config implies, or None where the config does not say."""
    try:
        heads = config.get("num_attention_heads")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return KVGeometry(len(model.layers), int(kv_heads), int(head_dim))
    except (KeyError, TypeError, ZeroDivisionError, AttributeError):
        return None


def rope_settings(config: dict) -> dict:
    """The RoPE fields of a config (they change every key vector, so they are part of the binding)."""
    return {k: config[k] for k in ROPE_KEYS if k in config}


def check_binding(header: dict, *, model_fp: str, tokenizer_fp: str, dtype: str, geometry: KVGeometry | None) -> None:
    """Raise the most specific mismatch error between an artifact's header and the running model."""
    m, kv = header["model"], header["kv"]
    if kv["dtype"] != dtype:
        raise DtypeMismatchError(f"artifact KV is {kv['dtype']} but the model runs in {dtype}; load the model with dtype={kv['dtype']}")
    got = KVGeometry(m["num_layers"], m["num_kv_heads"], m["head_dim"])
    if geometry is not None and got != geometry:
        raise ModelMismatchError(
            f"artifact KV geometry (layers={got.num_layers}, kv_heads={got.num_kv_heads}, head_dim={got.head_dim}) "
            f"does not fit this model (layers={geometry.num_layers}, kv_heads={geometry.num_kv_heads}, head_dim={geometry.head_dim})"
        )
    if m["fingerprint"] != model_fp:
        raise ModelMismatchError(f"artifact was computed by another model ({m['id']}, {m['fingerprint'][:19]}…) than this one ({model_fp[:19]}…)")
    if header["tokenizer"]["fingerprint"] != tokenizer_fp:
        raise TokenizerMismatchError(
            f"artifact tokens come from another tokenizer ({header['tokenizer']['fingerprint'][:19]}…) than this model's ({tokenizer_fp[:19]}…)"
        )
