"""What binds a KV cache to its producer: model and tokenizer fingerprints, KV geometry, the binding check.

A KV cache is only meaningful for the exact weights, tokenizer and dtype that computed it, so an
artifact records all three and `check_binding` refuses any difference with a message naming it.

Model fingerprint (`fp2:blake3:…`): the weights digest of the model's files (fingerprints.py: config
and every stored tensor's BLAKE3, by name), remembered across processes keyed by the files'
identities, so an unchanged model costs a few `stat` calls, once per loaded model. Artifacts written before scheme 2 carry
a `blake3:…` fingerprint of the loaded parameters (config, then per parameter in name order: name,
dtype, shape, 4096 elements sampled at an even stride, the sum of its raw bit patterns modulo
2**32); a load of such an artifact computes that one (once per model object) to compare.
Tokenizer fingerprint:
    BLAKE3 over canonical JSON of the vocabulary, the BPE merges (if any), the added tokens, the
    chat template, the EOS ids, and the ids a fixed probe text encodes to (which captures
    normalisation and pre-tokenisation without depending on how a library version serialises them);
    remembered like the model's, keyed by the identities of the directory's other files.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import blake3
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import DtypeMismatchError, ModelMismatchError, TokenizerMismatchError
from ..models import kvmlx_home
from .fingerprints import VOLATILE_CONFIG_KEYS, bound, cached, model_files, tokenizer_files, weights_fingerprint
from .format import canonical_json

if TYPE_CHECKING:
    from ..models import LoadedModel

FINGERPRINT_VERSION = 1  # of the tokenizer fingerprint and of the legacy (scheme 1) model fingerprint
SAMPLES_PER_TENSOR = 4096
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


def model_fingerprint(lm: "LoadedModel") -> str:
    """The model fingerprint of `lm` (scheme 2: its files' weights digest, remembered across processes;
    looked up once per loaded model, `fingerprints.bound`)."""
    return bound(lm, "model", lambda: cached("model", lm.path, model_files, lambda: weights_fingerprint(lm.path, lm.config),
                                             kvmlx_home()))


def legacy_model_fingerprint(lm: "LoadedModel") -> str:
    """The scheme-1 fingerprint of `lm`'s loaded parameters, for artifacts that carry one (memoised per
    model object: do not change the weights of a model after fingerprinting it)."""
    return _memoised(lm.model, lambda: _model_fingerprint(lm.model, lm.config))


def tokenizer_fingerprint(lm: "LoadedModel") -> str:
    """The tokenizer fingerprint described in the module docstring, remembered across processes."""
    tokenizer = lm.tokenizer
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return bound(lm, "tokenizer", lambda: cached("tokenizer", lm.path, tokenizer_files,
                                                 lambda: _memoised(hf, lambda: _tokenizer_fingerprint(tokenizer, hf)), kvmlx_home()))


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
        # a pipeline stage (mlx-lm's PipelineMixin) lists only its own layers: the whole model's count is the config's
        staged = getattr(getattr(model, "model", None), "pipeline_size", 1) > 1
        layers = int(config["num_hidden_layers"]) if staged else len(model.layers)
        return KVGeometry(layers, int(kv_heads), int(head_dim))
    except (KeyError, TypeError, ZeroDivisionError, AttributeError):
        return None


def rope_settings(config: dict) -> dict:
    """The RoPE fields of a config (they change every key vector, so they are part of the binding)."""
    return {k: config[k] for k in ROPE_KEYS if k in config}


def check_binding(header: dict, lm: "LoadedModel", *, fingerprints: tuple[str, str] | None = None) -> None:
    """Raise the most specific mismatch error between an artifact's header and the model `lm`.

    `fingerprints`: (model_fingerprint(lm), tokenizer_fingerprint(lm)) if the caller just computed them
    (each lookup re-checks the model directory's files: ~0.1 ms a call)."""
    m, kv = header["model"], header["kv"]
    if kv["dtype"] != lm.dtype:
        raise DtypeMismatchError(f"artifact KV is {kv['dtype']} but the model runs in {lm.dtype}; load the model with dtype={kv['dtype']}")
    got = KVGeometry(m["num_layers"], m["num_kv_heads"], m["head_dim"])
    geometry = config_geometry(lm.model, lm.config)
    if geometry is not None and got != geometry:
        raise ModelMismatchError(
            f"artifact KV geometry (layers={got.num_layers}, kv_heads={got.num_kv_heads}, head_dim={got.head_dim}) "
            f"does not fit this model (layers={geometry.num_layers}, kv_heads={geometry.num_kv_heads}, head_dim={geometry.head_dim})"
        )
    model_fp = (legacy_model_fingerprint(lm) if m["fingerprint"].startswith("blake3:")
                else fingerprints[0] if fingerprints else model_fingerprint(lm))
    if m["fingerprint"] != model_fp:
        raise ModelMismatchError(f"artifact was computed by another model ({m['id']}, {_short(m['fingerprint'])}) than this one ({_short(model_fp)})")
    tokenizer_fp = fingerprints[1] if fingerprints else tokenizer_fingerprint(lm)
    if header["tokenizer"]["fingerprint"] != tokenizer_fp:
        raise TokenizerMismatchError(
            f"artifact tokens come from another tokenizer ({_short(header['tokenizer']['fingerprint'])}) than this model's ({_short(tokenizer_fp)})"
        )


def _short(fingerprint: str) -> str:
    return fingerprint[: fingerprint.rfind(":") + 13] + "…"
