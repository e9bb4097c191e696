"""Structural checks of a version-2 header's per-layer caches and state checkpoints (no model code).

Version 2 says what version 1 cannot: each layer's cache family and its metadata (`caches`, one per
layer), state tensors, KV quantization settings (`kv.quantization`) and state checkpoints
(`checkpoints`). Every name, type, range and shape is checked here against the families below before
any tensor is used; the binding of these layers to a model is caches/families.py's `check_model`.

    kv         keys, values                  [1, H, offset, D]      the KV dtype
    rotating   keys, values                  [1, H, buffer, D]      max_size, keep, offset, idx
    arrays     state.{j} for present slots   any float, batch 1     size, present
    quantized  {keys,values}.{q,scales,biases} q: uint32 [1, H, offset, D*bits/32]; scales, biases: [1, H, offset, D/group]
    list       {j}.<the child's tensors>                            caches: the children (no nesting)
"""

from __future__ import annotations

from typing import Any

from ..errors import ArtifactError

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUPS = (32, 64, 128)
MAX_SLOTS = 64
MAX_CHILDREN = 16
MAX_CHECKPOINTS = 1 << 16
CHECKPOINTED = ("arrays", "rotating")  # families whose earlier states cannot come from the final one
_STATIC = {"kv": (), "rotating": ("max_size", "keep"), "arrays": ("size",), "quantized": ("bits", "group_size")}


def _fail(name: str, what: str) -> None:
    raise ArtifactError(f"{name}: invalid header: {what}")


def _int(x: Any, lo: int = 0, hi: int = 1 << 40) -> bool:
    return type(x) is int and lo <= x <= hi


def _check_meta(meta: Any, name: str, where: str, nested: bool = False) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("family"), str):
        _fail(name, f"{where}: cache metadata without a family")
    family = meta["family"]
    if family == "list":
        kids = meta.get("caches")
        if nested or not isinstance(kids, list) or not 1 <= len(kids) <= MAX_CHILDREN or set(meta) != {"family", "caches"}:
            _fail(name, f"{where}: malformed cache list")
        for j, m in enumerate(kids):
            _check_meta(m, name, f"{where}.{j}", nested=True)
        return
    fields = {"kv": {"offset"}, "rotating": {"offset", "max_size", "keep", "idx"}, "arrays": {"size", "present"},
              "quantized": {"offset", "bits", "group_size"}}.get(family)
    if fields is None:
        _fail(name, f"{where}: unknown cache family {family!r}")
    if set(meta) != fields | {"family"}:
        _fail(name, f"{where}: {family} cache metadata must have exactly {sorted(fields)}")
    for key in fields - {"present"}:
        if not _int(meta[key]):
            _fail(name, f"{where}: {key} out of range")
    if family == "rotating" and not (1 <= meta["max_size"] and meta["keep"] < meta["max_size"] and meta["idx"] <= meta["offset"] + meta["max_size"]):
        _fail(name, f"{where}: inconsistent window (max_size {meta['max_size']}, keep {meta['keep']}, idx {meta['idx']})")
    if family == "arrays":
        p = meta["present"]
        if not 1 <= meta["size"] <= MAX_SLOTS or not isinstance(p, list) or len(p) != meta["size"] or not all(type(b) is bool for b in p):
            _fail(name, f"{where}: malformed state slots")
    if family == "quantized" and (meta["bits"] not in QUANT_BITS or meta["group_size"] not in QUANT_GROUPS):
        _fail(name, f"{where}: unsupported KV quantization ({meta['bits']} bits, group {meta['group_size']})")


def tensor_names(meta: dict) -> list[str]:
    """The tensor names (within a layer's prefix) a cache of this metadata holds, in file order."""
    family = meta["family"]
    if family == "list":
        return [f"{j}.{n}" for j, m in enumerate(meta["caches"]) for n in tensor_names(m)]
    if family == "arrays":
        return [f"state.{j}" for j, p in enumerate(meta["present"]) if p]
    if family == "quantized":
        return [f"{k}.{p}" for k in ("keys", "values") for p in ("q", "scales", "biases")]
    return ["keys", "values"]


def _check_tensors(meta: dict, prefix: str, by_name: dict, kv: dict, name: str, tokens: int) -> None:
    """Shapes, dtypes and encodings of one layer's tensors, and its offset against the document position."""
    family = meta["family"]
    if family == "list":
        for j, m in enumerate(meta["caches"]):
            _check_tensors(m, f"{prefix}{j}.", by_name, kv, name, tokens)
        return
    if family in ("kv", "rotating", "quantized") and meta["offset"] != tokens:
        _fail(name, f"{prefix}: offset {meta['offset']} is not the {tokens} tokens it stands for")
    for t in tensor_names(meta):
        e = by_name[prefix + t]
        shape = e["shape"]
        if e["encoding"] != "raw":
            _fail(name, f"tensor {prefix + t!r}: version-2 tensors are raw")
        want_dtype = "uint32" if t.endswith(".q") else kv["dtype"]
        if family == "arrays":
            if e["dtype"] not in FLOAT_DTYPES or not shape or shape[0] != 1:
                _fail(name, f"tensor {prefix + t!r}: a state must be a float tensor of batch 1")
            continue
        if e["dtype"] != want_dtype:
            _fail(name, f"tensor {prefix + t!r} is {e['dtype']}, expected {want_dtype}")
        if len(shape) != 4 or shape[0] != 1:
            _fail(name, f"tensor {prefix + t!r} has shape {shape}, expected [1, heads, positions, dim]")
        if family in ("kv", "quantized") and shape[2] != meta["offset"]:
            _fail(name, f"tensor {prefix + t!r} holds {shape[2]} positions, its cache {meta['offset']}")
        if family == "rotating" and not (shape[2] <= meta["offset"] and meta["idx"] <= shape[2]):
            _fail(name, f"tensor {prefix + t!r}: window buffer of {shape[2]} slots for offset {meta['offset']}, idx {meta['idx']}")
    if family == "quantized":
        for k in ("keys", "values"):
            q, s, b = (by_name[f"{prefix}{k}.{p}"]["shape"] for p in ("q", "scales", "biases"))
            dim = s[3] * meta["group_size"]
            if s != b or q[:3] != s[:3] or q[3] * 32 != dim * meta["bits"]:
                _fail(name, f"{prefix}{k}: quantized parts disagree (q {q}, scales {s}, biases {b})")


def validate(h: dict, by_name: dict, name: str) -> None:
    """Check a version-2 header's `caches`, `checkpoints` and `kv.quantization` against its tensor list."""
    kv, n = h["kv"], h["kv"]["num_tokens"]
    caches = h.get("caches")
    if not isinstance(caches, list) or len(caches) != h["model"]["num_layers"]:
        _fail(name, f"caches must list one cache per layer ({h['model']['num_layers']})")
    for i, m in enumerate(caches):
        _check_meta(m, name, f"layer {i}")
    if kv.get("encoding", "raw") != "raw":
        _fail(name, "version-2 KV is raw (encodings apply to version-1 plain KV)")
    q = kv.get("quantization")
    if q is not None and (not isinstance(q, dict) or set(q) != {"bits", "group_size", "start"} or q.get("bits") not in QUANT_BITS
                          or q.get("group_size") not in QUANT_GROUPS or not _int(q.get("start"))):
        _fail(name, "malformed kv.quantization")
    every = kv.get("checkpoint_every")
    if every is not None and not (_int(every, 1) and every % kv["chunk_size"] == 0):
        _fail(name, f"kv.checkpoint_every {every!r} is not a multiple of the chunk size {kv['chunk_size']}")
    expected = {f"layers.{i}.{t}" for i, m in enumerate(caches) for t in tensor_names(m)}
    missing = sorted(expected - set(by_name))
    if missing:
        _fail(name, f"tensor {missing[0]!r} is missing")
    for i, m in enumerate(caches):
        _check_tensors(m, f"layers.{i}.", by_name, kv, name, n)

    checkpoints = h.get("checkpoints", [])
    if not isinstance(checkpoints, list) or len(checkpoints) > MAX_CHECKPOINTS:
        _fail(name, "malformed checkpoints")
    need = {str(i) for i, m in enumerate(caches) if checkpointed(m)}
    last = 0
    for k, cp in enumerate(checkpoints):
        if not isinstance(cp, dict) or set(cp) != {"tokens", "caches"} or not _int(cp["tokens"]) or not isinstance(cp["caches"], dict):
            _fail(name, f"checkpoint {k} is malformed")
        p = cp["tokens"]
        if p % kv["chunk_size"]:
            _fail(name, f"checkpoint at token {p} is not on a prefill-chunk boundary (chunk size {kv['chunk_size']})")
        if not last < p < n:
            _fail(name, f"checkpoint at token {p} is out of order or not inside the {n}-token document")
        last = p
        if set(cp["caches"]) != need:
            _fail(name, f"checkpoint at token {p} must hold exactly the layers {sorted(need, key=int)}")
        for i, m in cp["caches"].items():
            _check_meta(m, name, f"checkpoint {p} layer {i}")
            if _static(m) != _static(caches[int(i)]):
                _fail(name, f"checkpoint at token {p}: layer {i}'s cache differs from the layer's ({_static(m)} vs {_static(caches[int(i)])})")
            prefix = f"checkpoints.{k}.layers.{i}."
            expected |= {prefix + t for t in tensor_names(m)}
            missing = [prefix + t for t in tensor_names(m) if prefix + t not in by_name]
            if missing:
                _fail(name, f"tensor {missing[0]!r} is missing")
            _check_tensors(m, prefix, by_name, kv, name, p)
    extra = sorted(set(by_name) - expected - {"logits"})
    if extra:
        _fail(name, f"unexpected tensor {extra[0]!r}")


def checkpointed(meta: dict) -> bool:
    """Whether a layer's earlier states need checkpoints (recurrent state, or a window that may wrap)."""
    if meta["family"] == "list":
        return any(checkpointed(m) for m in meta["caches"])
    return meta["family"] in CHECKPOINTED


def _static(meta: dict) -> Any:
    if meta["family"] == "list":
        return ["list", [_static(m) for m in meta["caches"]]]
    return [meta["family"], *(meta[k] for k in _STATIC[meta["family"]])]
