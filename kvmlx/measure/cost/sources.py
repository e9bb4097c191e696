"""The cost model's real inputs: KV size from an artifact header or a model's config.json, the ratio from a bench.

`load_model_config` finds a model's config.json in a directory, a file or the hub (cache first)
for `economics.bytes_per_token_from_config`; an artifact's header is read for
`economics.kv_size_from_header`; `ratio_from_bench` / `load_bench` read the prefill/reuse ratio
from `kvmlx bench --json` output; `resolve_inputs` builds :class:`CostInputs` from CLI-style options and says where
each field came from. Malformed inputs raise :class:`~kvmlx.errors.CostError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ...errors import CostError, ModelLoadError
from .economics import BYTES_PER_GB, CostInputs, _is_real, _require, bytes_per_token_from_config, kv_size_from_header


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise CostError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CostError(f"{what} {str(path)!r} is not valid JSON: {e}") from None


def _hub_download(repo: str, filename: str) -> str:
    """``hf_hub_download``, trying the local cache first so an offline machine with the model cached works."""
    from huggingface_hub import hf_hub_download  # lazy: only --model with a repo id needs the hub

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # not cached (the hub's error types vary between versions): ask the network
        return hf_hub_download(repo, filename)


def load_model_config(model: str | Path,
                      download: Callable[[str, str], str] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a local model dir, a config file, or a Hugging Face repo id.

    ``download(repo, filename) -> local path`` defaults to ``huggingface_hub.hf_hub_download`` (cache first);
    any failure there (offline, unknown repo) is a one-line :class:`~kvmlx.errors.ModelLoadError`.
    """
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        _require(path.is_file(), f"model directory {str(model)!r} has no config.json")
    elif not path.is_file():
        text = str(model)
        if text.count("/") != 1 or text.startswith((".", "/")) or text.endswith("/"):
            raise ModelLoadError(f"model {text!r} is neither a local path nor a Hugging Face repo id")
        try:
            path = Path((download or _hub_download)(text, "config.json"))
        except Exception as e:  # hub errors have many types; all mean "could not get it"
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ModelLoadError(f"cannot fetch config.json of {text!r}: {type(e).__name__}: {first_line}") from None
    config = _read_json(path, "model config")
    _require(isinstance(config, dict), f"model config {str(path)!r} is not a JSON object")
    return config


@dataclass(frozen=True)
class BenchRatio:
    """The prefill/reuse ratio taken from one row of a bench result."""

    ratio: float
    tokens: int


#: Keys read from ``kvmlx bench --json`` output.
BENCH_ROWS_KEY = "results"
BENCH_TOKENS_KEY = "tokens"
BENCH_RATIO_KEY = "prefill_over_load_first_token"


def ratio_from_bench(data: Mapping[str, Any], tokens: int) -> BenchRatio:
    """The ratio of the ``results`` row whose ``tokens`` is nearest ``tokens`` (ties: the shorter row).

    Rows need numeric ``tokens`` and ``prefill_over_load_first_token``; rows without the ratio are
    skipped. Raises :class:`CostError` if no row has both, or the chosen ratio is not > 0.
    """
    rows = data.get(BENCH_ROWS_KEY) if isinstance(data, Mapping) else None
    _require(isinstance(rows, list) and rows != [],
             f"bench JSON has no non-empty {BENCH_ROWS_KEY!r} list (expected output of `kvmlx bench --json`)")
    usable = [r for r in rows if isinstance(r, Mapping)
              and _is_real(r.get(BENCH_TOKENS_KEY)) and _is_real(r.get(BENCH_RATIO_KEY))]
    _require(usable != [], f"no bench row has numeric {BENCH_TOKENS_KEY!r} and {BENCH_RATIO_KEY!r}")
    row = min(usable, key=lambda r: (abs(r[BENCH_TOKENS_KEY] - tokens), r[BENCH_TOKENS_KEY]))
    ratio = float(row[BENCH_RATIO_KEY])
    _require(ratio > 0, f"bench row at {row[BENCH_TOKENS_KEY]} tokens has a ratio {ratio!r}, not > 0")
    return BenchRatio(ratio=ratio, tokens=int(row[BENCH_TOKENS_KEY]))


def load_bench(path: str | Path) -> dict[str, Any]:
    """Read a bench JSON file; it must hold one JSON object."""
    data = _read_json(Path(path), "bench file")
    _require(isinstance(data, dict), f"bench file {str(path)!r} does not hold a JSON object")
    return data


def resolve_inputs(*, readers: int | None = None, tokens: int | None = None,
                   price_per_mtok: float | None = None, tariff: float | None = None,
                   ratio: float | None = None, egress_per_gb: float | None = None,
                   storage_per_gb_month: float | None = None, months: float | None = None,
                   bytes_per_token: float | None = None, compression_ratio: float | None = None,
                   gb_unit: str | None = None, artifact: str | Path | None = None,
                   model: str | None = None, bench: str | Path | None = None,
                   read_header: Callable[[str], Mapping[str, Any]] | None = None,
                   download: Callable[[str, str], str] | None = None,
                   ) -> tuple[CostInputs, dict[str, str]]:
    """Build :class:`CostInputs` from CLI-style options (None = not given) and say where each came from.

    The KV size comes from one of ``bytes_per_token``, ``artifact`` (its header, read with
    ``read_header``, default ``kvmlx.artifact.format.read_header``) or ``model`` (its config.json); the
    ratio from ``ratio`` or ``bench``; everything else from the option or the paper's default.
    Returns the inputs and a ``{field: source}`` dict for the report.
    """
    given = [name for name, v in (("--bytes-per-token", bytes_per_token), ("--artifact", artifact),
                                  ("--model", model)) if v is not None]
    _require(len(given) <= 1, f"give only one KV size source, not {' and '.join(given)}")
    _require(ratio is None or bench is None, "give --ratio or --bench, not both")

    defaults = CostInputs()
    fields: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in (("readers", readers), ("tokens", tokens), ("price_per_mtok", price_per_mtok),
                        ("tariff", tariff), ("egress_per_gb", egress_per_gb),
                        ("storage_per_gb_month", storage_per_gb_month), ("months", months),
                        ("compression_ratio", compression_ratio)):
        if value is not None:
            fields[name], sources[name] = value, "option"
    if gb_unit is not None:
        _require(gb_unit in BYTES_PER_GB, f"gb unit must be one of {', '.join(BYTES_PER_GB)}, got {gb_unit!r}")
        fields["bytes_per_gb"], sources["bytes_per_gb"] = BYTES_PER_GB[gb_unit], f"option ({gb_unit})"

    if bytes_per_token is not None:
        fields["bytes_per_token"], sources["bytes_per_token"] = bytes_per_token, "option"
    elif artifact is not None:
        if read_header is None:
            try:
                from kvmlx.artifact.format import read_header  # lazy: cost does not depend on the format module
            except ImportError as e:
                raise CostError(f"cannot read artifacts: kvmlx.artifact.format is unavailable ({e})") from None
        try:
            header = read_header(str(artifact))
        except OSError as e:  # a KvmlxError (bad artifact) passes through unchanged
            raise CostError(f"cannot read artifact {str(artifact)!r}: {e.strerror or e}") from None
        nbytes, n_tokens, dtype_bytes = kv_size_from_header(header)
        fields["bytes_per_token"] = nbytes / n_tokens
        sources["bytes_per_token"] = f"artifact {artifact} ({nbytes:,} KV bytes / {n_tokens:,} tokens)"
        if dtype_bytes is not None:
            fields["dtype_bytes"] = dtype_bytes
        if tokens is None:
            fields["tokens"], sources["tokens"] = n_tokens, f"artifact {artifact}"
    elif model is not None:
        per_token, dtype_bytes = bytes_per_token_from_config(load_model_config(model, download))
        fields["bytes_per_token"], fields["dtype_bytes"] = per_token, dtype_bytes
        sources["bytes_per_token"] = f"model {model} config.json"

    n_tokens_doc = fields.get("tokens", defaults.tokens)
    if ratio is not None:
        fields["ratio"], sources["ratio"] = ratio, "option"
    elif bench is not None:
        found = ratio_from_bench(load_bench(bench), n_tokens_doc)
        fields["ratio"] = found.ratio
        sources["ratio"] = f"bench {bench} (row at {found.tokens:,} tokens)"

    for name in ("readers", "tokens", "price_per_mtok", "tariff", "ratio", "egress_per_gb",
                 "storage_per_gb_month", "months", "bytes_per_token", "bytes_per_gb"):
        sources.setdefault(name, "paper default")
    return CostInputs(**fields), sources
