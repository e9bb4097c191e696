"""mlx-lm interop: an artifact out as an mlx-lm prompt-cache file, and an `mlx_lm.cache_prompt` file in
as a checked artifact.

- `export_mlx_lm(artifact, out)`: the artifact's KV (every digest checked) as `KVCache`s saved with
  mlx-lm's own `save_prompt_cache`, metadata `model` (what `mlx_lm.generate --model` must equal) and
  `tokenizer_config`, so `mlx_lm.generate --prompt-cache-file OUT` and `load_prompt_cache` continue
  from it.
- `import_mlx_lm(cache_file, lm, document, out, check=...)`: such a file stores no token ids, so the
  document is tokenized exactly as `mlx_lm.cache_prompt` does (`cache_prompt_tokens`); the count must
  equal the cache's offset, the logits row after the last token is recomputed (one model step over
  the stored KV, which also checks the last position), and `check` (the caller's recomputation of a
  sample of positions, e.g. `kvmlx.measure.spotcheck.spot_check`) runs on the staged artifact before
  it is renamed to `out`. Nothing appears at `out` unless every check passed.

Both are plain-KV only: a version-2 artifact (sliding windows, recurrent state, --kv-bits KV) is not
exported, and a model whose caches are not all `KVCache` imports nothing (`UnsupportedModelError`).

The file is read without `load_prompt_cache`, which picks cache classes by name from the file: only
`KVCache` layers are accepted here, and every shape and offset is checked against the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import KVCache, save_prompt_cache

from ..artifact.encodings import decode
from ..artifact.format import Artifact, kv_tensor_names, replacing
from ..artifact.identity import config_geometry
from ..artifact.layers import families
from ..artifact.trust import check_signature
from ..caches import all_plain, model_specs
from ..errors import ArtifactError, DtypeMismatchError, ModelMismatchError, TokenizerMismatchError, UnsupportedModelError
from ..models import LoadedModel
from .load import DTYPES
from .publish import PublishResult, write_kv

MLX_LM_PREFILL_STEP = 2048  # mlx_lm.cache_prompt's prefill step (generate_step's prefill_step_size)


@dataclass
class ExportResult:
    path: Path
    num_tokens: int
    model: str  # the metadata `model`: pass the same --model to mlx_lm.generate
    file_bytes: int

    def to_json(self) -> dict:
        return {"path": str(self.path), "tokens": self.num_tokens, "model": self.model, "file_bytes": self.file_bytes}


def export_mlx_lm(artifact: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None) -> ExportResult:
    """Write `artifact`'s KV as an mlx-lm prompt-cache file (safetensors) at `out`, atomically.

    Every tensor digest is checked and a signature, if present, must verify. `model` is the metadata
    mlx-lm's generate compares with its --model (default: the model the artifact names; a built-in
    preset's local directory for `builtin:` ids, which mlx-lm cannot resolve)."""
    out = Path(out)
    with Artifact(artifact) as art:
        check_signature(art)
        h = art.header
        if h.get("caches") is not None:
            raise UnsupportedModelError(
                f"{art.path.name}: a version-2 artifact ({', '.join(families(h))}); kvmlx export --mlx-lm writes plain-KV "
                "(version-1) artifacts only")
        n, dtype = h["kv"]["num_tokens"], DTYPES[h["kv"]["dtype"]]
        caches = []
        names = kv_tensor_names(h["model"]["num_layers"])
        for k_name, v_name in zip(names[::2], names[1::2]):
            cache = KVCache()
            cache.keys, cache.values = (_tensor(art, name, dtype) for name in (k_name, v_name))
            cache.offset = n
            caches.append(cache)
        mx.eval([(c.keys, c.values) for c in caches])
    model = model or _mlx_lm_model_id(h["model"]["id"])
    with replacing(out, ".safetensors") as tmp:
        save_prompt_cache(str(tmp), caches, {"model": model, "tokenizer_config": json.dumps({}),
                                             "kvmlx_tokens": json.dumps(h["document"]["tokens"])})
    return ExportResult(out, n, model, out.stat().st_size)


def _tensor(art: Artifact, name: str, dtype: mx.Dtype) -> mx.array:
    entry = art.tensors[name]
    data = art.tensor_bytes(name, verify=True)
    raw = bytes(data) if entry.encoding == "raw" else decode(data, entry.encoding, entry.params, entry.dtype, entry.shape)
    data.release()
    return mx.array(memoryview(raw).cast("B")).view(dtype).reshape(entry.shape)


def _mlx_lm_model_id(model_id: str) -> str:
    if model_id.startswith("builtin:"):
        from ..models import builtin_path

        return str(builtin_path(model_id.split(":", 1)[1]))
    return model_id


# ---- import ---------------------------------------------------------------------------------------

def read_mlx_lm_cache(path: str | os.PathLike) -> tuple[list[KVCache], dict]:
    """The `KVCache`s and metadata of an mlx-lm prompt-cache file, cut to their offsets; refuses
    anything else (other cache classes, inconsistent shapes or offsets) with an ArtifactError."""
    name = Path(path).name
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for files it cannot parse
        raise ArtifactError(f"{name}: not an mlx-lm prompt-cache file ({type(e).__name__}: {_first_line(e)})") from None
    try:
        user_meta, classes, scalars = tree_unflatten(list(meta.items()))
        state = tree_unflatten(list(arrays.items()))
    except Exception:  # noqa: BLE001 - a safetensors file that is not a prompt cache
        raise ArtifactError(f"{name}: not an mlx-lm prompt-cache file (no cache metadata)") from None
    if not isinstance(classes, list) or not classes or not isinstance(state, list) or len(state) != len(classes):
        raise ArtifactError(f"{name}: not an mlx-lm prompt-cache file (layers and classes do not match)")
    other = sorted({c for c in classes if c != "KVCache"})
    if other:
        raise UnsupportedModelError(f"{name}: holds {', '.join(map(str, other))[:200]} layers; only plain KVCache is imported")
    caches = []
    for i, layer in enumerate(state):
        if not (isinstance(layer, list) and len(layer) in (2, 3)):
            raise ArtifactError(f"{name}: layer {i} is not a KVCache state")
        keys, values = layer[0], layer[1]
        offset = int(layer[2].item()) if len(layer) == 3 and layer[2].size == 1 else keys.shape[2]
        if keys.ndim != 4 or keys.shape != values.shape or keys.shape[0] != 1 or not 0 < offset <= keys.shape[2]:
            raise ArtifactError(f"{name}: layer {i} has keys {keys.shape}, values {values.shape}, offset {offset}")
        cache = KVCache()
        cache.keys, cache.values, cache.offset = keys[..., :offset, :], values[..., :offset, :], offset
        caches.append(cache)
    if len({c.offset for c in caches}) != 1:
        raise ArtifactError(f"{name}: layers hold different numbers of tokens")
    return caches, user_meta if isinstance(user_meta, dict) else {}


def cache_prompt_tokens(lm: LoadedModel, document: str) -> list[int]:
    """The token ids `mlx_lm.cache_prompt` caches for `document`: with a chat template, the document as a
    user message continued (`add_generation_prompt=False, continue_final_message=True`); else raw."""
    tok = lm.tokenizer
    if getattr(tok, "has_chat_template", False):
        ids = tok.apply_chat_template([{"role": "user", "content": document}], add_generation_prompt=False,
                                      continue_final_message=True)
    else:
        ids = tok.encode(document)
    return [int(t) for t in ids]


def import_mlx_lm(
    cache_file: str | os.PathLike,
    lm: LoadedModel,
    document: str,
    out: str | os.PathLike,
    *,
    check: Callable[[Path], None],
    tokens: Sequence[int] | None = None,
    chunk_size: int = MLX_LM_PREFILL_STEP,
    tolerance: float = 0.0,
    **publish_kwargs,
) -> PublishResult:
    """Turn an `mlx_lm.cache_prompt` file of `document` into a checked kvmlx artifact at `out`.

    `tokens` overrides the tokenization (default: `cache_prompt_tokens`). Refuses, naming what
    differs, a cache of another geometry or dtype than `lm`, a token count other than the cache's
    offset, a last position whose recomputed KV differs by more than `tolerance`, and whatever
    `check(staged_path)` raises (it should recompute a sample of positions). `chunk_size` is recorded
    as the artifact's prefill chunk (mlx-lm's prefill step). Other arguments go to `write_kv`.
    """
    if not all_plain(lm.model):
        raise UnsupportedModelError(f"{lm.model_id}: kvmlx import takes models whose caches are all plain KVCache "
                                    f"(this one makes {', '.join(sorted({s['family'] for s in model_specs(lm.model)}))})")
    caches, meta = read_mlx_lm_cache(cache_file)
    name = Path(cache_file).name
    tokens = cache_prompt_tokens(lm, document) if tokens is None else [int(t) for t in tokens]
    n = caches[0].offset
    if len(tokens) != n:
        raise TokenizerMismatchError(
            f"{name}: the cache holds {n} tokens but the document tokenizes to {len(tokens)} as mlx_lm.cache_prompt "
            f"does ({'chat template, user message' if getattr(lm.tokenizer, 'has_chat_template', False) else 'raw'}): "
            "another document, tokenizer or template")
    g = config_geometry(lm.model, lm.config)
    layers, heads, head_dim = g.num_layers, g.num_kv_heads, g.head_dim
    got = (len(caches), caches[0].keys.shape[1], caches[0].keys.shape[3])
    if got != (layers, heads, head_dim):
        raise ModelMismatchError(f"{name}: KV geometry {got} (layers, KV heads, head_dim) is not this model's "
                                 f"{(layers, heads, head_dim)}")
    dtype = str(caches[0].keys.dtype).split(".")[-1]
    if dtype != lm.dtype:
        raise DtypeMismatchError(f"{name}: the cache's KV is {dtype}, the model runs in {lm.dtype} (pass --dtype {dtype})")
    logits = _last_logits(lm, caches, tokens, tolerance, name)
    out = Path(out)
    with replacing(out, ".import.kvmlx") as staged:  # `out` appears only if every check below passes
        result = write_kv(lm, tokens, caches, logits, staged, chunk_size=chunk_size, text=document, **publish_kwargs)
        check(staged)
    result.path = out
    return result


def _last_logits(lm: LoadedModel, caches: list[KVCache], tokens: list[int], tolerance: float, name: str) -> mx.array:
    """Run the last token over the stored KV before it: the logits row the artifact stores, and the KV
    recomputed at the last position, which must match the cache's."""
    n = len(tokens)
    step = []
    for c in caches:
        s = KVCache()
        if n > 1:
            s.keys, s.values, s.offset = c.keys[..., : n - 1, :], c.values[..., : n - 1, :], n - 1
        step.append(s)
    logits = lm.model(mx.array([tokens[-1:]]), cache=step)[0, -1]
    diffs = [mx.max(mx.abs(s.keys[..., n - 1 : n, :].astype(mx.float32) - c.keys[..., n - 1 : n, :].astype(mx.float32)))
             for s, c in zip(step, caches)]
    diffs += [mx.max(mx.abs(s.values[..., n - 1 : n, :].astype(mx.float32) - c.values[..., n - 1 : n, :].astype(mx.float32)))
              for s, c in zip(step, caches)]
    mx.eval(logits, diffs)
    worst = max(float(d.item()) for d in diffs)
    if not worst <= tolerance:
        raise ModelMismatchError(f"{name}: the KV this model computes at the last position ({n - 1}) differs from the "
                                 f"cache's by {worst:.3g} (tolerance {tolerance}): another model, document or dtype")
    return logits


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
