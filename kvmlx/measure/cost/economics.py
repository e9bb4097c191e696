"""The cost model itself: what N readers pay under each way of serving a published KV cache.

One read of a document costs ``C_prefill`` when the reader re-runs prefill; when a publisher
prefills once and N readers load the result instead, one read costs ``C_prefill / N + C_load``, so
reuse pays from ``N* = C_prefill / (C_prefill - C_load)`` readers on ("Can I Buy Your KV Cache?",
Zhang 2026, arXiv:2606.13361). Storage ``sigma`` ($/GB-month) over ``T`` months and egress ``beta``
($/GB) of an artifact of ``s`` GB add ``beta * s + sigma * s * T / N`` per load. This module owns the
gigabyte conventions, :class:`CostInputs` (its defaults are the paper's worked example), every
strategy written as ``total(N) = fixed + N * per_load`` (:class:`StrategyCost`,
:func:`strategy_costs`, :func:`cost_curve`), :func:`break_even`, and the KV size per token of
an artifact header or a Hugging Face config (:func:`kv_size_from_header`,
:func:`bytes_per_token_from_config`); docs/COST.md states each formula and unit convention, and
which of them reproduce the paper's worked example. Pure Python and numpy: it imports nothing of
kvmlx but its errors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import CostError


#: The paper's gigabyte: sizes in MB of 10^6 bytes, divided by 1024 (so 1 GB = 1.024e9 bytes).
#: It is the only convention that reproduces the paper's "0.54 GB" artifact and its $3.9M figure.
GB_PAPER = 1.024e9
#: SI gigabyte, 10^9 bytes.
GB_SI = 1e9
#: IEC gibibyte, 2^30 bytes (what most clouds actually bill as "GB").
GIB = float(2**30)
#: Names accepted for the gigabyte convention (``--gb-unit``).
BYTES_PER_GB: dict[str, float] = {"paper": GB_PAPER, "si": GB_SI, "iec": GIB}

#: Qwen3-4B in fp16: 36 layers x 2 (K and V) x 8 KV heads x 128 head_dim x 2 bytes.
QWEN3_4B_FP16_BYTES_PER_TOKEN = 36 * 2 * 8 * 128 * 2  # 147,456

_DTYPE_BYTES = {
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "float32": 4, "fp32": 4, "float": 4, "float64": 8,
    "int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CostError(message)


@dataclass(frozen=True)
class CostInputs:
    """Everything the model needs; the defaults are the paper's worked example.

    readers               N, number of agents that read the document (80M).
    tokens                document length in tokens (3774).
    price_per_mtok        input-token price, $ per million tokens ($5): C_prefill = tokens * price / 1e6.
    tariff                cache-read price as a fraction of the input price (0.1x).
    ratio                 measured prefill time / reuse time (49.7x on the paper's M1 Pro at 3774 tokens).
    egress_per_gb         beta, $ per GB downloaded ($0.09).
    storage_per_gb_month  sigma, $ per GB-month of stored artifact ($0: the paper ignores storage).
    months                T, the horizon the artifact is stored for (1).
    bytes_per_token       KV bytes per token (147,456: fp16 Qwen3-4B).
    dtype_bytes           element size of that KV (2 for fp16/bf16); int8 shrinks it by this factor.
    compression_ratio     optional extra "ship compressed" strategy at size / compression_ratio.
    bytes_per_gb          the gigabyte used for beta and sigma (GB_PAPER = 1.024e9, see docs/COST.md).
    """

    readers: int = 80_000_000
    tokens: int = 3774
    price_per_mtok: float = 5.0
    tariff: float = 0.1
    ratio: float = 49.7
    egress_per_gb: float = 0.09
    storage_per_gb_month: float = 0.0
    months: float = 1.0
    bytes_per_token: float = QWEN3_4B_FP16_BYTES_PER_TOKEN
    dtype_bytes: int = 2
    compression_ratio: float | None = None
    bytes_per_gb: float = GB_PAPER

    def __post_init__(self) -> None:
        _require(isinstance(self.readers, numbers.Integral) and not isinstance(self.readers, bool)
                 and self.readers >= 1, f"readers must be a whole number >= 1, got {self.readers!r}")
        _require(isinstance(self.tokens, numbers.Integral) and not isinstance(self.tokens, bool)
                 and self.tokens >= 1, f"tokens must be a whole number >= 1, got {self.tokens!r}")
        for name in ("price_per_mtok", "tariff", "egress_per_gb", "storage_per_gb_month", "months"):
            value = getattr(self, name)
            _require(_is_real(value) and value >= 0, f"{name} must be a finite number >= 0, got {value!r}")
        _require(_is_real(self.ratio) and self.ratio > 0,
                 f"ratio (prefill time / reuse time) must be a finite number > 0, got {self.ratio!r}")
        _require(_is_real(self.bytes_per_token) and self.bytes_per_token > 0,
                 f"bytes_per_token must be a finite number > 0, got {self.bytes_per_token!r}")
        _require(isinstance(self.dtype_bytes, numbers.Integral) and not isinstance(self.dtype_bytes, bool)
                 and self.dtype_bytes >= 1, f"dtype_bytes must be a whole number >= 1, got {self.dtype_bytes!r}")
        _require(self.compression_ratio is None or (_is_real(self.compression_ratio) and self.compression_ratio >= 1),
                 f"compression_ratio must be a finite number >= 1, got {self.compression_ratio!r}")
        _require(_is_real(self.bytes_per_gb) and self.bytes_per_gb > 0,
                 f"bytes_per_gb must be a finite number > 0, got {self.bytes_per_gb!r}")

    # -- derived quantities -------------------------------------------------------------------
    @property
    def prefill_cost(self) -> float:
        """C_prefill: $ for one prefill of the document at the input-token price."""
        return self.tokens * self.price_per_mtok / 1e6

    @property
    def load_compute_cost(self) -> float:
        """C_load (compute only): C_prefill / ratio."""
        return self.prefill_cost / self.ratio

    @property
    def kv_bytes(self) -> float:
        """Size of the document's raw KV in bytes: tokens * bytes_per_token."""
        return self.tokens * self.bytes_per_token

    @property
    def kv_gb(self) -> float:
        """Size of the raw KV in this input's gigabytes."""
        return self.kv_bytes / self.bytes_per_gb

    def with_(self, **changes: Any) -> "CostInputs":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- constructors from real measurements --------------------------------------------------
    @classmethod
    def from_artifact_bytes(cls, nbytes: int, tokens: int, **overrides: Any) -> "CostInputs":
        """Inputs whose KV size is an artifact's: ``nbytes`` of KV for ``tokens`` tokens."""
        _require(_is_real(nbytes) and nbytes > 0, f"artifact KV bytes must be > 0, got {nbytes!r}")
        _require(isinstance(tokens, numbers.Integral) and tokens >= 1, f"artifact tokens must be >= 1, got {tokens!r}")
        overrides.setdefault("tokens", int(tokens))
        return cls(bytes_per_token=nbytes / tokens, **overrides)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "CostInputs":
        """Inputs whose KV size follows from a Hugging Face ``config.json`` dict."""
        per_token, dtype_bytes = bytes_per_token_from_config(config)
        overrides.setdefault("dtype_bytes", dtype_bytes)
        return cls(bytes_per_token=per_token, **overrides)


@dataclass(frozen=True)
class StrategyCost:
    """What one strategy costs for ``readers`` readers: ``total = fixed + readers * per_load``.

    name          stable id: re-prefill, hosted-tariff, hosted-physical, ship-raw, ship-int8, ship-compressed.
    label         human-readable name.
    per_load      $ each read costs (prefill, tariff, load compute, egress).
    fixed         $ paid once (the publisher's prefill, storage for the horizon).
    readers       N.
    break_even    N* from which this strategy is cheaper than re-prefill; None if never (or re-prefill itself).
    artifact_gb   GB stored/shipped, None where nothing is.
    reprefill_total  total of re-prefill for the same N (to compare against).
    """

    name: str
    label: str
    per_load: float
    fixed: float
    readers: int
    break_even: float | None
    artifact_gb: float | None
    reprefill_total: float

    @property
    def readers_total(self) -> float:
        """N * per_load: what the readers' reads cost, without the one-off fixed part (the paper's figure)."""
        return self.readers * self.per_load

    @property
    def total(self) -> float:
        """fixed + N * per_load."""
        return self.fixed + self.readers_total

    @property
    def per_reader(self) -> float:
        """total / N, i.e. fixed / N + per_load."""
        return self.total / self.readers

    @property
    def vs_reprefill(self) -> float:
        """total / re-prefill total (1.0 = same cost, < 1 cheaper)."""
        return self.total / self.reprefill_total if self.reprefill_total > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no infinities: a missing break-even is null)."""
        return {
            "name": self.name,
            "label": self.label,
            "total": self.total,
            "per_reader": self.per_reader,
            "vs_reprefill": None if math.isnan(self.vs_reprefill) else self.vs_reprefill,
            "break_even": self.break_even,
            "per_load": self.per_load,
            "fixed": self.fixed,
            "readers_total": self.readers_total,
            "artifact_gb": self.artifact_gb,
        }


def break_even(c_prefill: float, c_load: float, fixed: float | None = None) -> float:
    """N* = fixed / (c_prefill - c_load), with ``fixed`` = c_prefill by default (the paper's formula).

    Solves ``fixed / N + c_load = c_prefill``. Raises :class:`CostError` when reuse never pays
    (``c_load >= c_prefill``, e.g. a measured prefill/reuse ratio <= 1).
    """
    fixed = c_prefill if fixed is None else fixed
    _require(_is_real(c_prefill) and c_prefill > 0, f"c_prefill must be a finite number > 0, got {c_prefill!r}")
    _require(_is_real(c_load) and c_load >= 0, f"c_load must be a finite number >= 0, got {c_load!r}")
    _require(_is_real(fixed) and fixed >= 0, f"fixed cost must be a finite number >= 0, got {fixed!r}")
    _require(c_load < c_prefill,
             f"reuse never pays: a load costs ${c_load:.6g} >= a prefill ${c_prefill:.6g} (ratio <= 1)")
    return fixed / (c_prefill - c_load)


def _strategy_terms(inputs: CostInputs) -> list[tuple[str, str, float, float, float | None]]:
    """(name, label, per_load, fixed, artifact_gb) for every strategy, in display order."""
    p = inputs.prefill_cost
    load = inputs.load_compute_cost
    storage = inputs.storage_per_gb_month * inputs.months  # $ per GB kept for the horizon
    gb = inputs.kv_gb

    def shipped(name: str, label: str, size_gb: float) -> tuple[str, str, float, float, float | None]:
        return (name, label, load + inputs.egress_per_gb * size_gb, p + storage * size_gb, size_gb)

    rows: list[tuple[str, str, float, float, float | None]] = [
        ("re-prefill", "re-prefill", p, 0.0, None),
        ("hosted-tariff", f"hosted @ {inputs.tariff:g}x tariff", inputs.tariff * p, p, None),
        ("hosted-physical", f"hosted @ physical cost (/{inputs.ratio:g})", load, p + storage * gb, gb),
        shipped("ship-raw", f"ship raw ({inputs.dtype_bytes * 8}-bit)", gb),
        shipped("ship-int8", "ship int8", gb / inputs.dtype_bytes),
    ]
    if inputs.compression_ratio is not None:
        rows.append(shipped("ship-compressed", f"ship compressed ({inputs.compression_ratio:g}x)",
                            gb / inputs.compression_ratio))
    return rows


def strategy_costs(inputs: CostInputs) -> list[StrategyCost]:
    """Cost of every strategy for ``inputs.readers`` readers, re-prefill first."""
    terms = _strategy_terms(inputs)
    reprefill_total = inputs.readers * inputs.prefill_cost
    out = []
    for name, label, per_load, fixed, size in terms:
        n_star: float | None = None
        if name != "re-prefill" and per_load < inputs.prefill_cost:
            n_star = break_even(inputs.prefill_cost, per_load, fixed)
        out.append(StrategyCost(name, label, per_load, fixed, inputs.readers, n_star, size, reprefill_total))
    return out


def cost_curve(inputs: CostInputs, readers: Sequence[float] | np.ndarray,
               per_reader: bool = False) -> dict[str, np.ndarray]:
    """Total cost (or cost per reader) of every strategy at each reader count in ``readers``."""
    n = np.asarray(readers, dtype=float)
    _require(n.size > 0 and bool(np.all(np.isfinite(n))) and bool(np.all(n > 0)),
             "reader counts must be finite and > 0")
    curves = {}
    for name, _label, per_load, fixed, _size in _strategy_terms(inputs):
        total = fixed + n * per_load
        curves[name] = total / n if per_reader else total
    return curves


# -- the KV size of an artifact header or a model config ---------------------------------------------

def kv_size_from_header(header: Mapping[str, Any]) -> tuple[int, int, int | None]:
    """(KV bytes, tokens, dtype bytes or None) of a kvmlx artifact header.

    Reads ``header["kv"]["num_tokens"]``, sums ``nbytes`` of the ``header["tensors"]`` whose
    ``name`` starts with ``"layers."`` and, if present, maps ``header["kv"]["dtype"]`` to a size.
    """
    kv = header.get("kv") if isinstance(header, Mapping) else None
    _require(isinstance(kv, Mapping) and isinstance(kv.get("num_tokens"), int) and kv["num_tokens"] >= 1,
             "artifact header has no valid kv.num_tokens")
    tensors = header.get("tensors")
    _require(isinstance(tensors, list), "artifact header has no tensors list")
    total = 0
    for t in tensors:
        if isinstance(t, Mapping) and str(t.get("name", "")).startswith("layers."):
            _require(isinstance(t.get("nbytes"), int) and t["nbytes"] >= 0,
                     f"artifact tensor {t.get('name')!r} has no valid nbytes")
            total += t["nbytes"]
    _require(total > 0, "artifact header lists no KV tensors (names starting with 'layers.')")
    dtype = kv.get("dtype")
    dtype_bytes = _DTYPE_BYTES.get(str(dtype).lower().removeprefix("torch.").removeprefix("mlx.core."))\
        if dtype is not None else None
    return total, kv["num_tokens"], dtype_bytes


def bytes_per_token_from_config(config: Mapping[str, Any]) -> tuple[int, int]:
    """(KV bytes per token, dtype bytes) of a Hugging Face ``config.json`` dict.

    layers x 2 (K and V) x KV heads x head_dim x dtype bytes, with
    ``num_hidden_layers``, ``num_key_value_heads`` (else ``num_attention_heads``), ``head_dim``
    (else ``hidden_size / num_attention_heads``) and ``torch_dtype`` or ``dtype`` (else fp16).
    A multimodal config's ``text_config`` is used when the top level has no layer count.
    """
    _require(isinstance(config, Mapping), "model config must be a JSON object")
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
        config = {**config, **config["text_config"]}
    _require("kv_lora_rank" not in config,
             "model uses latent (MLA) attention, whose KV size this model does not compute: pass --bytes-per-token")

    def positive_int(key: str) -> int:
        value = config.get(key)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"model config has no valid {key!r}")
        return value

    layers = positive_int("num_hidden_layers")
    heads = positive_int("num_attention_heads")
    kv_heads = positive_int("num_key_value_heads") if config.get("num_key_value_heads") is not None else heads
    if config.get("head_dim") is not None:
        head_dim = positive_int("head_dim")
    else:
        hidden = positive_int("hidden_size")
        _require(hidden % heads == 0, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
    key = str(dtype).lower().removeprefix("torch.")
    _require(key in _DTYPE_BYTES, f"model config has an unknown dtype {dtype!r}")
    dtype_bytes = _DTYPE_BYTES[key]
    return layers * 2 * kv_heads * head_dim * dtype_bytes, dtype_bytes
