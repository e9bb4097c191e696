"""Which module stores which mlx-lm cache type, and the per-layer operations runtime/ uses.

Each family module (kv.py, rotating.py, arrays.py, quantized.py) turns one cache into a small
metadata dict (its `family`, what the model fixes such as a window, and the dynamic state such as
`offset`) plus named tensors, and back into the same mlx-lm class, bit-exactly. `CacheList` (a layer
holding several caches) is the `list` family: its children's metadata under `caches` and their
tensors under `{j}.`. Unknown cache types are refused by name. Here too: which positions of a stored
document an agent can restore (`RestoreInfo`): any position for trimmable caches, else only the
document's end and the state checkpoints publish stored at chunk boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
from mlx_lm.models.cache import CacheList, make_prompt_cache

from ..artifact.layers import checkpointed as needs_checkpoint  # noqa: F401  (re-exported)
from ..artifact.layers import tensor_names  # noqa: F401  (re-exported)
from ..errors import CacheMismatchError, UnsupportedModelError
from . import arrays, kv, quantized, rotating
from .kv import StreamedKVCache
from .quantized import KVQuantization

MODULES = {m.CLASS: m for m in (kv, rotating, arrays, quantized)}
BY_FAMILY = {m.FAMILY: m for m in (kv, rotating, arrays, quantized)}
LIST = "list"
FAMILIES = (*BY_FAMILY, LIST)
SUPPORTED = "KVCache, RotatingKVCache, ArraysCache, QuantizedKVCache, CacheList"


def _module(cache: Any):
    m = kv if isinstance(cache, StreamedKVCache) else MODULES.get(type(cache))
    if m is None:
        raise UnsupportedModelError(f"kvmlx cannot store mlx-lm {type(cache).__name__} caches (it stores {SUPPORTED})")
    return m


def spec(cache: Any) -> dict:
    """The family and what the model fixes about one layer's cache (window, keep, state slots, bits)."""
    if type(cache) is CacheList:
        return {"family": LIST, "caches": [spec(c) for c in cache.caches]}
    return _module(cache).spec(cache)


def model_specs(model: Any) -> list[dict]:
    """The spec of every layer's cache as the model makes them; refuses unknown cache types by name."""
    caches = make_prompt_cache(model)
    if not caches:
        raise UnsupportedModelError("this model makes no caches")
    return [spec(c) for c in caches]


def check_supported(model: Any) -> None:
    """Refuse a model with a cache type kvmlx cannot store (naming it)."""
    model_specs(model)


def save_layer(cache: Any) -> tuple[dict, dict[str, mx.array]]:
    """(metadata, {name: array}) of one layer's cache."""
    if type(cache) is CacheList:
        metas, out = [], {}
        for j, c in enumerate(cache.caches):
            meta, tensors = save_layer(c)
            metas.append(meta)
            out.update({f"{j}.{name}": x for name, x in tensors.items()})
        return {"family": LIST, "caches": metas}, out
    return _module(cache).save(cache)


def load_layer(meta: Mapping, get: Callable[[str], mx.array]) -> Any:
    """The mlx-lm cache a `save_layer` result describes; `get(name)` returns each named tensor."""
    if meta["family"] == LIST:
        return CacheList(*(load_layer(m, lambda n, j=j: get(f"{j}.{n}")) for j, m in enumerate(meta["caches"])))
    m = BY_FAMILY[meta["family"]]
    return m.load(meta, _Lazy(get))


class _Lazy(dict):
    def __init__(self, get):
        super().__init__()
        self._get = get

    def __missing__(self, name):
        return self._get(name)


def trimmable_to(meta: Mapping, n: int, quant: KVQuantization | None = None) -> bool:
    """Whether trimming this final state to `n` tokens gives exactly the state after `n` tokens.

    A quantized pipeline holds full-precision KV below its `start` and quantized KV from there: a
    quantized cache trimmed below `start` is not what a from-scratch run would hold.
    """
    family = meta["family"]
    if family == LIST:
        return all(trimmable_to(m, n, quant) for m in meta["caches"])
    if family == quantized.FAMILY and quant is not None and n < quant.start:
        return False
    return BY_FAMILY[family].trimmable_to(meta, n)


def specs_of(metas: Sequence[Mapping]) -> list[dict]:
    """Stored metadata reduced to what the model fixes (drops offsets, rotation index, slots set)."""
    def strip(m):
        if m["family"] == LIST:
            return {"family": LIST, "caches": [strip(c) for c in m["caches"]]}
        return {k: v for k, v in m.items() if k not in ("offset", "idx", "present")}
    return [strip(m) for m in metas]


def check_model(header: Mapping, model_specs_: Sequence[Mapping], quant: KVQuantization | None) -> None:
    """Refuse an artifact whose per-layer caches differ from the ones this model makes (one line, naming it).

    With quantization settings a model's `kv` layer may be stored as `quantized` with those bits.
    """
    stored = specs_of(header.get("caches") or [{"family": kv.FAMILY}] * header["model"]["num_layers"])
    if len(stored) != len(model_specs_):
        raise CacheMismatchError(f"artifact has caches for {len(stored)} layers, this model has {len(model_specs_)}")
    for i, (a, m) in enumerate(zip(stored, model_specs_)):
        _check_layer(f"layer {i}", a, m, quant)


def _check_layer(where: str, a: Mapping, m: Mapping, quant: KVQuantization | None) -> None:
    if a["family"] == quantized.FAMILY and m["family"] == kv.FAMILY and quant is not None:
        m = {"family": quantized.FAMILY, "bits": quant.bits, "group_size": quant.group_size}
    if a["family"] != m["family"]:
        raise CacheMismatchError(f"{where}: artifact holds a {a['family']} cache, this model makes a {m['family']} cache")
    if a["family"] == LIST:
        if len(a["caches"]) != len(m["caches"]):
            raise CacheMismatchError(f"{where}: artifact holds {len(a['caches'])} caches, this model {len(m['caches'])}")
        for j, (x, y) in enumerate(zip(a["caches"], m["caches"])):
            _check_layer(f"{where}.{j}", x, y, quant)
        return
    words = {"max_size": "sliding window", "keep": "kept leading tokens", "size": "state slots", "bits": "KV bits",
             "group_size": "KV group size"}
    for key, word in words.items():
        if key in m and a.get(key) != m[key]:
            raise CacheMismatchError(f"{where}: artifact {word} is {a.get(key)}, this model's is {m[key]}")


@dataclass(frozen=True)
class RestoreInfo:
    """Which prefixes of a stored document can be restored exactly.

    `any_from`: every position from here to the end (trimmable caches), None if not; `points`: the
    positions restorable otherwise (the state checkpoints, and the document's end).
    """

    any_from: int | None
    points: tuple[int, ...]

    def deepest(self, n: int) -> int:
        """The deepest restorable position at or below `n` (0: none)."""
        if self.any_from is not None and self.any_from <= n:
            return n
        return max((p for p in self.points if p <= n), default=0)

    def to_json(self) -> dict:
        return {"any_from": self.any_from, "points": list(self.points)}

    @classmethod
    def from_json(cls, d: Mapping) -> "RestoreInfo":
        return cls(d["any_from"], tuple(d["points"]))


def quantization_of(header: Mapping) -> KVQuantization | None:
    return KVQuantization.from_json(header["kv"].get("quantization"))


def restore_info(header: Mapping) -> RestoreInfo:
    """The `RestoreInfo` of an artifact header (version 1: plain KV, any position)."""
    n = header["kv"]["num_tokens"]
    metas = header.get("caches")
    if metas is None:
        return RestoreInfo(0, (n,))
    quant = quantization_of(header)
    lo = quant.start if quant is not None and any(m["family"] == quantized.FAMILY for m in metas) else 0
    any_from = lo if all(trimmable_to(m, lo, quant) for m in metas) and lo <= n else None
    points = [n]
    for cp in header.get("checkpoints", []):
        p = cp["tokens"]
        if all(str(i) in cp["caches"] or trimmable_to(m, p, quant) for i, m in enumerate(metas)):
            points.append(p)
    return RestoreInfo(any_from, tuple(sorted(points)))


def layer_groups(header: Mapping) -> list[dict]:
    """Layers with the same cache (family and what the model fixes), for people: [{family, layers,
    window?, keep?, bits?, group_size?, size?, checkpoints}] in order of first layer."""
    metas = header.get("caches") or [{"family": kv.FAMILY}] * header["model"]["num_layers"]
    points = {str(i): [] for i in range(len(metas))}
    for cp in header.get("checkpoints", []):
        for i in cp["caches"]:
            points[i].append(cp["tokens"])
    groups: dict[str, dict] = {}
    for i, s in enumerate(specs_of(metas)):
        key = repr(sorted(s.items()))
        g = groups.setdefault(key, {**{("window" if k == "max_size" else k): v for k, v in s.items()}, "layers": [],
                                    "checkpoints": points[str(i)]})
        g["layers"].append(i)
    return list(groups.values())
