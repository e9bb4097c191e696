"""`kvmlx bench`: what loading a published KV costs next to prefill and to mlx-lm's prompt cache, load included.

"Can I Buy Your KV Cache?" timed reuse as one decode step over a KV already in memory: disk I/O and
deserialisation were left out. Here every reuse figure includes getting the KV into memory, measured
side by side with mlx-lm's own `save_prompt_cache` / `load_prompt_cache` and with the machine's
roofline (memcpy, page-cache read, cold sequential read, fsync'd write), all in the same run. This
package's public API, re-exported from its modules, which import one way (each only from those
listed before it): `machine` (the machine's description, page cache, memory, load regimes and
roofline), `harness` (constants, KV shapes, and the saves, loads and derived figures both modes
share), `model` (`run_model_bench`: a real model, prefill vs reuse), `shape` (`run_shape_bench`:
synthetic KV of a real model's exact size, no model), `compression` (`run_compression_bench`: the
KV encodings), `families` (`run_family_bench`: each mlx-lm cache family's bytes, checkpoints, loads
and exactness), `serving` (`run_serve_bench`: kvmlx serve vs mlx_lm.server under concurrent clients)
and `report` (tables and plots). Each figure is a median over `runs`, with min, max
and quartiles; the result's keys are documented in docs/BENCHMARKS.md.
"""

from .machine import GB, can_evict, evict, machine_info, release_memory, roofline, summarize
from .harness import (
    DEFAULT_LENGTHS,
    DEFAULT_RUNS,
    MODEL_PHASES,
    PAPER_M1_PRO,
    SHAPE_PHASES,
    SHAPES,
    TARGETS,
    KVShape,
    ProgressFn,
    available_load_paths,
    document_tokens,
    parse_lengths,
)
from .model import run_model_bench
from .shape import run_shape_bench, synthetic_header, synthetic_kv
from .compression import run_compression_bench
from .families import FAMILY_MODELS, run_families, run_family_bench
from .report import (
    format_compression_table,
    format_family_table,
    format_serve_table,
    format_table,
    plot,
    plot_families,
    plot_serve,
)
from .serving import run_serve_bench
from .command import format_cli_table, run_cli_bench

__all__ = [
    "DEFAULT_LENGTHS",
    "DEFAULT_RUNS",
    "FAMILY_MODELS",
    "GB",
    "MODEL_PHASES",
    "PAPER_M1_PRO",
    "SHAPES",
    "SHAPE_PHASES",
    "TARGETS",
    "KVShape",
    "ProgressFn",
    "available_load_paths",
    "can_evict",
    "document_tokens",
    "evict",
    "format_compression_table",
    "format_cli_table",
    "format_family_table",
    "format_serve_table",
    "format_table",
    "machine_info",
    "parse_lengths",
    "plot",
    "plot_families",
    "plot_serve",
    "release_memory",
    "roofline",
    "run_compression_bench",
    "run_families",
    "run_cli_bench",
    "run_family_bench",
    "run_model_bench",
    "run_serve_bench",
    "run_shape_bench",
    "summarize",
    "synthetic_header",
    "synthetic_kv",
]
