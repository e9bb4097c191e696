"""How the prefix cache cuts caches into records and joins them back, per cache family.

Layers that can be cut at any token (`KVCache`, `QuantizedKVCache`) become *segments*: their KV sliced
to the segment's positions. Every other layer (recurrent state, sliding windows, `CacheList`) becomes a
*snapshot*: its whole state (`kvmlx.caches.save_layer`) at one position. A restore joins, layer by
layer, the published entry's KV (if the chain continues one) and the segments' into one buffer with
free positions after the prefix; with `--kv-bits` settings, full-precision parts are quantized when
the restored length is past `start` (mx.quantize groups along head_dim only, so quantizing a slice
gives the slice of the quantized whole: the bits of mlx-lm's `to_quantized`).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache

from ...caches import KVQuantization, save_layer
from ...caches.kv import from_arrays

DEFAULT_BLOCK = 256  # tokens per block: records start and end at multiples of it
PARTS = ("q", "scales", "biases")
NAMES = ("keys", "values")


def segment_arrays(caches: list, cut: Sequence[int], start: int, end: int) -> tuple[str, dict, dict]:
    """(family, per-layer metadata, tensors) of positions [start, end) of the cuttable layers."""
    layers, tensors, family = {}, {}, "kv"
    for i in cut:
        c = caches[i]
        if isinstance(c, QuantizedKVCache):
            family = "quantized"
            layers[str(i)] = {"family": "quantized", "bits": int(c.bits), "group_size": int(c.group_size)}
            for name, parts in (("keys", c.keys), ("values", c.values)):
                for p, x in zip(PARTS, parts):
                    tensors[f"{i}.{name}.{p}"] = mx.contiguous(x[..., start:end, :])
        else:
            layers[str(i)] = {"family": "kv"}
            tensors[f"{i}.keys"] = mx.contiguous(c.keys[..., start:end, :])
            tensors[f"{i}.values"] = mx.contiguous(c.values[..., start:end, :])
    return family, layers, tensors


def snapshot_arrays(caches: list, snap: Sequence[int]) -> tuple[dict, dict]:
    """(per-layer metadata, tensors) of the whole state of the layers that cannot be cut."""
    layers, tensors = {}, {}
    for i in snap:
        meta, arrays = save_layer(caches[i])
        layers[str(i)] = meta
        tensors.update({f"{i}.{k}": mx.contiguous(x) for k, x in arrays.items()})
    return layers, tensors


def base_part(caches: list, cut: Sequence[int], n: int) -> tuple[str, int, dict]:
    """A published entry's caches as the first part of a join: (family, tokens, arrays by name)."""
    arrays, family = {}, "kv"
    for i in cut:
        c = caches[i]
        if isinstance(c, QuantizedKVCache):
            family = "quantized"
            for name, parts in (("keys", c.keys), ("values", c.values)):
                arrays.update({f"{i}.{name}.{p}": x for p, x in zip(PARTS, parts)})
        else:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = c.keys, c.values
    return family, n, arrays


def _with_room(pieces: list, headroom: int) -> mx.array:
    shape = list(pieces[0].shape)
    shape[2] = headroom
    return mx.concatenate(pieces + [mx.zeros(shape, pieces[0].dtype)], axis=2)


def join_layer(i: int, parts, n: int, headroom: int, quant: KVQuantization | None):
    """Layer i's cache over `parts` ((family, tokens used, arrays by name), in order): a `KVCache`, or
    with `quant` a `QuantizedKVCache`; `headroom` free positions after the `n` it holds."""
    if quant is None:
        out = [_with_room([arrays[f"{i}.{name}"][..., :used, :] for _, used, arrays in parts], headroom)
               for name in NAMES]
        return from_arrays(out, n)[0]
    cache = QuantizedKVCache(group_size=quant.group_size, bits=quant.bits)
    for name in NAMES:
        triples = []
        for family, used, arrays in parts:
            if family == "quantized":
                triples.append([arrays[f"{i}.{name}.{p}"][..., :used, :] for p in PARTS])
            else:
                x = arrays[f"{i}.{name}"][..., :used, :]
                triples.append(list(mx.quantize(x, group_size=quant.group_size, bits=quant.bits)))
        setattr(cache, name, tuple(_with_room([t[j] for t in triples], headroom) for j in range(3)))
    cache.offset = n
    return cache
