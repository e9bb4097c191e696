"""Version-2 artifacts -> mlx-lm caches, and a request's caches for any restorable reuse length.

`build_states` turns a version-2 artifact's final per-layer states and its state checkpoints (read by
`kvmlx.runtime.load.read_tensors`, the one buffered read path, into MLX memory) into mlx-lm caches
of every family (caches/); `state_tensor_names` says which tensors those are. `caches_at(loaded, reuse)` is the one function that hands out caches holding
the first `reuse` tokens of a loaded document: trimmable caches (plain and quantized KV, a window
that has not wrapped) are cut from the final state, the others (recurrent state, wrapped windows)
come from the checkpoint at `reuse`. With `copy` (the default) every cache and array object is new,
so the loaded document can be shared by many requests (serving/) and is never written; without it
the loaded caches themselves are trimmed in place (an agent that owns them).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from ..artifact.layers import tensor_names
from ..caches import load_layer, restore_info, save_layer, trimmable_to
from ..caches.quantized import KVQuantization
from ..errors import KvmlxError

def state_tensor_names(header: dict, at: int | None = None) -> list[str]:
    """The tensors `build_states` needs, in file order: every layer's final state, and the state
    checkpoints (with `at`, only the one at that position)."""
    names = [f"layers.{i}.{t}" for i, m in enumerate(header["caches"]) for t in tensor_names(m)]
    for k, cp in enumerate(header.get("checkpoints", [])):
        if at is None or cp["tokens"] == at:
            names += [f"checkpoints.{k}.layers.{i}.{t}" for i, m in cp["caches"].items() for t in tensor_names(m)]
    return names


def build_states(header: dict, arrays: Mapping[str, mx.array], *,
                 at: int | None = None) -> tuple[list, dict[int, dict[int, Any]]]:
    """(final caches, {checkpoint tokens: {layer: cache}}) of a version-2 header from its tensors
    (`arrays`: name -> array, as `kvmlx.runtime.load.read_tensors` reads them), evaluated.

    With `at`, only the checkpoint at that position is built (none when it is the document's end).
    """
    caches = [load_layer(m, lambda t, i=i: arrays[f"layers.{i}.{t}"]) for i, m in enumerate(header["caches"])]
    checkpoints: dict[int, dict[int, Any]] = {}
    for k, cp in enumerate(header.get("checkpoints", [])):
        if at is not None and cp["tokens"] != at:
            continue
        checkpoints[cp["tokens"]] = {
            int(i): load_layer(m, lambda t, i=i, k=k: arrays[f"checkpoints.{k}.layers.{i}.{t}"])
            for i, m in cp["caches"].items()}
    mx.eval([c.state for c in caches], [[c.state for c in cp.values()] for cp in checkpoints.values()])
    return caches, checkpoints


def caches_at(loaded, reuse: int, *, copy: bool = True) -> list:
    """Caches holding exactly the first `reuse` tokens of `loaded` (a `LoadedKV`), for one request.

    `reuse` must be restorable (`restore_info(header).deepest(reuse) == reuse`); KvmlxError otherwise.
    """
    header = loaded.header
    n = header["kv"]["num_tokens"]
    if restore_info(header).deepest(reuse) != reuse or not 0 < reuse <= n:
        raise KvmlxError(f"the stored document cannot be restored at {reuse} tokens (no checkpoint there)")
    quant = KVQuantization.from_json(header["kv"].get("quantization"))
    checkpoint = getattr(loaded, "checkpoints", {}).get(reuse, {}) if reuse < n else {}
    if reuse < n and header.get("checkpoints") and not checkpoint and any(
            not trimmable_to(save_layer(c)[0], reuse, quant) for c in loaded.caches):
        raise KvmlxError(f"checkpoint at {reuse} tokens was not loaded")
    if not copy:
        out = list(loaded.caches)
        for i, c in checkpoint.items():
            out[i] = c
        trim = [c for i, c in enumerate(out) if i not in checkpoint]
        if n - reuse and trim and trim_prompt_cache(trim, n - reuse) != n - reuse:
            raise KvmlxError(f"cannot trim the loaded caches to {reuse} tokens")
        return out
    return [_fresh(checkpoint[i], None) if i in checkpoint else _fresh(c, reuse) for i, c in enumerate(loaded.caches)]


def _fresh(cache, reuse: int | None):
    """A new cache object equal to `cache` cut to `reuse` tokens (None: as it is), over new array
    objects (an in-place update by one request never reaches another's arrays)."""
    meta, arrays = save_layer(cache)
    if reuse is not None:
        meta, arrays = _cut(meta, arrays, reuse)
    return load_layer(meta, lambda t: arrays[t][...])


def _cut(meta: dict, arrays: dict, reuse: int) -> tuple[dict, dict]:
    family = meta["family"]
    if family == "list":
        metas, out = [], {}
        for j, m in enumerate(meta["caches"]):
            sub = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == str(j)}
            m2, a2 = _cut(m, sub, reuse)
            metas.append(m2)
            out.update({f"{j}.{k}": v for k, v in a2.items()})
        return {**meta, "caches": metas}, out
    if family == "arrays":
        return meta, arrays
    drop = meta["offset"] - reuse
    if family == "rotating":
        return {**meta, "offset": reuse, "idx": meta["idx"] - drop}, arrays
    return {**meta, "offset": reuse}, {k: v[..., :reuse, :] for k, v in arrays.items()}


def compact(loaded):
    """`loaded` with every cache cut to exactly its state (no load headroom) and evaluated: what a
    resident pool keeps and shares."""
    loaded.wait()
    caches = [load_layer(m, lambda t, a=a: mx.contiguous(a[t])) for m, a in (save_layer(c) for c in loaded.caches)]
    mx.eval([c.state for c in caches], loaded.logits)
    return replace(loaded, caches=caches)


def loaded_nbytes(loaded) -> int:
    """Bytes of a loaded document's arrays: caches, state checkpoints and the logits row."""
    def size(c):
        return sum(x.nbytes for x in save_layer(c)[1].values())
    return (sum(size(c) for c in loaded.caches) + loaded.logits.nbytes
            + sum(size(c) for cp in loaded.checkpoints.values() for c in cp.values()))
