"""`kvmlx cost`: the economics of a published KV cache, what N readers pay under each way of serving it.

The model is the one of "Can I Buy Your KV Cache?" (Zhang 2026, arXiv:2606.13361); docs/COST.md
states each formula and unit convention. This package's public API, re-exported from its modules,
which import one way: `economics` (the model: inputs, strategies, break-even, curves), `sources`
(real inputs: artifact header, model config.json, bench JSON, CLI-style options) and `report`
(JSON report, table, plot). Pure Python (numpy; matplotlib only inside :func:`plot`), no model
code, no MLX.
"""

from ...errors import CostError
from .economics import (
    BYTES_PER_GB,
    GB_PAPER,
    GB_SI,
    GIB,
    QWEN3_4B_FP16_BYTES_PER_TOKEN,
    CostInputs,
    StrategyCost,
    break_even,
    bytes_per_token_from_config,
    cost_curve,
    kv_size_from_header,
    strategy_costs,
)
from .sources import (
    BENCH_RATIO_KEY,
    BENCH_ROWS_KEY,
    BENCH_TOKENS_KEY,
    BenchRatio,
    load_bench,
    load_model_config,
    ratio_from_bench,
    resolve_inputs,
)
from .report import format_table, plot, report_dict


__all__ = [
    "BENCH_RATIO_KEY",
    "BENCH_ROWS_KEY",
    "BENCH_TOKENS_KEY",
    "BYTES_PER_GB",
    "BenchRatio",
    "CostError",
    "CostInputs",
    "GB_PAPER",
    "GB_SI",
    "GIB",
    "QWEN3_4B_FP16_BYTES_PER_TOKEN",
    "StrategyCost",
    "break_even",
    "bytes_per_token_from_config",
    "cost_curve",
    "format_table",
    "kv_size_from_header",
    "load_bench",
    "load_model_config",
    "plot",
    "ratio_from_bench",
    "report_dict",
    "resolve_inputs",
    "strategy_costs",
]
