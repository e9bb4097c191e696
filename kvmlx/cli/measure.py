"""`kvmlx bench` (load vs prefill vs mlx-lm, shape and compression studies) and `kvmlx cost`.
"""

from __future__ import annotations

import click

from ..artifact.format import read_header
from ..measure import bench as bench_api
from ..measure.bench import DEFAULT_LENGTHS as BENCH_LENGTHS
from ..measure.bench import DEFAULT_RUNS as BENCH_RUNS
from ..measure.bench import SHAPES, parse_lengths
from ..caches import KVQuantization, all_plain
from ..models import load_model
from ..runtime.publish import DEFAULT_CHUNK
from .app import DTYPE_CHOICE, Progress, emit, main


def _lengths_option(ctx, param, value):
    try:
        return parse_lengths(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@main.command()
@click.option("--model", "-m", default=None, help="Model for prefill vs reuse: local path, hub repo id or builtin:<preset>.  [default: builtin:small]")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Run the model (and its KV) in this dtype (default: the model's).")
@click.option("--lengths", default=",".join(map(str, BENCH_LENGTHS)), show_default=True, callback=_lengths_option,
              help="Document lengths in tokens, comma-separated (default: the paper's).")
@click.option("--runs", default=BENCH_RUNS, show_default=True, type=click.IntRange(1), help="Runs per figure: median, min-max and quartiles reported.")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default=None,
              help="Time the load path alone on synthetic KV of this model's exact shape: no model, no prefill.")
@click.option("--compression", is_flag=True, help="Instead: compare every KV encoding (size, speed, tokens, logits).")
@click.option("--serve", "serve_mode", is_flag=True,
              help="Instead: kvmlx serve vs mlx_lm.server under concurrent streaming clients (openai client).")
@click.option("--cli", "cli_mode", is_flag=True,
              help="Instead: the whole command, `kvmlx generate` vs `mlx_lm.generate --prompt-cache-file` on the same "
                   "cache tokens (wall time, peak RSS; --doc-tokens, --answer-tokens, --runs).  [model: builtin:small]")
@click.option("--concurrency", default="1,4,8,16", show_default=True, help="--serve: clients at once, comma-separated.")
@click.option("--doc-tokens", default=1024, show_default=True, type=click.IntRange(16), help="--serve, --cli: document length.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1), help="--serve: requests per client.")
@click.option("--answer-tokens", default=16, show_default=True, type=click.IntRange(1), help="--serve, --cli: greedy tokens per request.")
@click.option("--long-tokens", default=0, show_default=True, type=click.IntRange(0),
              help="--serve: also send a prompt this long, then a 2-token request 2 s later (0: skip).")
@click.option("--agent", "agent_mode", is_flag=True,
              help="Instead: one agent's multi-turn chat (system prompt, a published document, tool outputs) against "
                   "kvmlx serve and mlx_lm.server, in one server lifetime and restarted before every turn.")
@click.option("--turns", default=5, show_default=True, type=click.IntRange(1), help="--agent: conversation turns.")
@click.option("--tool-tokens", default=150, show_default=True, type=click.IntRange(1),
              help="--agent: tokens of tool output each turn adds.")
@click.option("--families", is_flag=True,
              help="Instead: every cache family's bytes per token, checkpoints, load vs mlx-lm and exactness, one row per "
                   "built-in family preset (also what --model runs for a model with sliding-window or recurrent caches).")
@click.option("--parallel", is_flag=True,
              help="Instead: publish and load one document (the longest of --lengths) in one process and at 2 ranks under "
                   "mlx.launch (tensor parallel, pipeline): each rank's bytes and load times.  [model: builtin:small-qwen2]")
@click.option("--blend", "blend_mode", is_flag=True,
              help="Instead: documents anywhere in chat prompts, blended (CacheBlend, EPIC, anchored at each R) vs full "
                   "prefill: identical greedy answers, first divergence, KL of the first token, TTFT.  [model: builtin:small]")
@click.option("--prompts", default=40, show_default=True, type=click.IntRange(0), help="--blend: prompts.")
@click.option("--blend-documents", default=20, show_default=True, type=click.IntRange(3), help="--blend: documents published.")
@click.option("--blend-doc-tokens", default="150,600", show_default=True, help="--blend: document length range in tokens.")
@click.option("--blend-per-prompt", default="3,6", show_default=True, help="--blend: documents per prompt, a range.")
@click.option("--blend-rs", default="0,0.05,0.15,0.3,1", show_default=True, help="--blend: R values, comma-separated.")
@click.option("--blend-rows", type=click.Path(dir_okay=False), default=None,
              help="--blend: append each prompt's row to this JSON-lines file as it finishes; with --prompts 0 "
                   "nothing runs and the file is summarized.")
@click.option("--blend-shard", default="0/1", show_default=True,
              help="--blend: run only the prompts p with p mod N = K (K/N): one process per core, each with its "
                   "own --blend-rows file (summarize them together with --prompts 0 after `cat`).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True, writable=True), default=None,
              help="Parent of the temporary directory for artifacts (pick one on the disk you care about).  [default: the system's]")
@click.option("--chunk-size", default=DEFAULT_CHUNK, show_default=True, type=click.IntRange(1), help="Prefill chunk size, as in publish.")
@click.option("--no-cold", is_flag=True, help="Skip cold loads (files evicted from the page cache before each run).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (machine, config, roofline, results, targets).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write a PNG: time vs document length, log axes, the paper's M1 Pro figures for reference.")
def bench(model, dtype, lengths, runs, shape, compression, serve_mode, cli_mode, concurrency, doc_tokens, rounds,
          answer_tokens, long_tokens, agent_mode, turns, tool_tokens, families, parallel, blend_mode, prompts,
          blend_documents, blend_doc_tokens, blend_per_prompt, blend_rs, blend_rows, blend_shard, directory, chunk_size,
          no_cold, as_json, plot_path) -> None:
    """Time loading a published KV against prefill and mlx-lm's prompt cache, load included."""
    if agent_mode:
        if shape or compression or families or parallel or serve_mode or cli_mode or blend_mode:
            raise click.UsageError("--agent is a mode of its own: drop --shape/--compression/--families/--parallel/"
                                   "--serve/--cli/--blend")
        _bench_agent(model, turns, doc_tokens, tool_tokens, answer_tokens, as_json, plot_path)
        return
    if blend_mode:
        if shape or compression or families or parallel or serve_mode or cli_mode:
            raise click.UsageError("--blend is a mode of its own: drop --shape/--compression/--families/--parallel/"
                                   "--serve/--cli")
        _bench_blend(model, dtype, prompts, blend_documents, blend_doc_tokens, blend_per_prompt, blend_rs, blend_rows,
                     blend_shard, answer_tokens, chunk_size, directory, as_json, plot_path)
        return
    if cli_mode:
        if shape or compression or families or parallel or serve_mode or dtype or plot_path:
            raise click.UsageError("--cli is a mode of its own: drop --shape/--compression/--families/--parallel/"
                                   "--serve/--dtype/--plot")
        with Progress("cli bench", as_json, unit="run") as bar:
            result = bench_api.run_cli_bench(model or "builtin:small", doc_tokens, runs, max_tokens=answer_tokens,
                                             directory=directory, progress=lambda d, t, _w: bar(d, t))
        emit(result) if as_json else click.echo(bench_api.format_cli_table(result))
        return
    if serve_mode:
        if shape or compression or families or parallel:
            raise click.UsageError("--serve is a mode of its own: drop --shape/--compression/--families/--parallel")
        _bench_serve(model, runs, concurrency, doc_tokens, rounds, answer_tokens, long_tokens, as_json, plot_path)
        return
    if shape and (model or dtype or compression or families or parallel):
        raise click.UsageError("--shape times the load path without a model: drop --model/--dtype/--compression/--families/--parallel")
    if parallel:
        if compression or families:
            raise click.UsageError("--parallel is a mode of its own: drop --compression/--families")
        _parallel_bench(model, dtype, max(lengths), runs, directory, chunk_size, as_json, plot_path)
        return
    lm = load_model(model, dtype) if model and not compression else None
    if families or (lm is not None and not all_plain(lm.model)):
        _bench_families(lm, dtype, lengths, runs, directory, as_json, plot_path)
        return
    if compression:
        lm = load_model(model or "builtin:small", dtype)
        with Progress("encodings", as_json, unit="enc") as bar:
            result = bench_api.run_compression_bench(lm, max(lengths), runs=runs, directory=directory,
                                                     chunk_size=chunk_size, progress=bar)
        emit(result) if as_json else click.echo(bench_api.format_compression_table(result))
        return
    with Progress("bench", as_json, unit="phase") as bar:
        options = dict(directory=directory, cold=not no_cold, chunk_size=chunk_size,
                       progress=lambda done, total, _phase: bar(done, total))
        if shape:
            result = bench_api.run_shape_bench(shape, lengths, runs, **options)
        else:
            result = bench_api.run_model_bench(lm or load_model("builtin:small", dtype), lengths, runs, **options)
    _show(result, as_json, plot_path, bench_api.plot, bench_api.format_table)


def _pair(value: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a range LO,HI", param_hint=name) from None
    if not 0 < lo <= hi:
        raise click.BadParameter(f"{value!r} is not a range 0 < LO <= HI", param_hint=name)
    return lo, hi


def _bench_blend(model, dtype, prompts, documents, doc_tokens, per_prompt, rs, rows_path, shard, answer_tokens,
                 chunk_size, directory, as_json, plot_path) -> None:
    from ..measure.bench import blend as blend_bench

    try:
        r_values = tuple(float(x) for x in rs.split(","))
    except ValueError:
        raise click.BadParameter(f"{rs!r} is not a list of numbers", param_hint="--blend-rs") from None
    if any(not 0 <= r <= 1 for r in r_values):
        raise click.BadParameter("R values must be from 0 to 1", param_hint="--blend-rs")
    lo_hi, k = _pair(doc_tokens, "--blend-doc-tokens"), _pair(per_prompt, "--blend-per-prompt")
    try:
        part, parts = (int(x) for x in shard.split("/"))
    except ValueError:
        raise click.BadParameter(f"{shard!r} is not K/N", param_hint="--blend-shard") from None
    if not 0 <= part < parts:
        raise click.BadParameter(f"{shard!r}: K/N needs 0 <= K < N", param_hint="--blend-shard")
    if k[1] > documents:
        raise click.BadParameter(f"up to {k[1]} documents per prompt needs --blend-documents >= {k[1]}")
    if prompts == 0:
        if not rows_path:
            raise click.UsageError("--prompts 0 summarizes --blend-rows: give the file")
        result = blend_bench.summarize_blend(blend_bench.load_rows(rows_path), rs=r_values, answer_tokens=answer_tokens)
    else:
        lm = load_model(model or "builtin:small", dtype)
        with Progress("blend bench", as_json, unit="step") as bar:
            result = blend_bench.run_blend_bench(lm, prompts=prompts, documents=documents, per_prompt=k, doc_tokens=lo_hi,
                                                 rs=r_values, answer_tokens=answer_tokens, chunk_size=chunk_size,
                                                 directory=directory, rows_path=rows_path, shard=(part, parts),
                                                 progress=lambda done, total, _what: bar(done, total))
    _show(result, as_json, plot_path, blend_bench.plot_blend, blend_bench.format_blend_table)


def _show(result: dict, as_json: bool, plot_path, plot, table) -> None:
    """Draw the result (`plot`) if asked, then print it as JSON or as a table."""
    if plot_path is not None:
        result["plot"] = str(plot(result, plot_path))
    if as_json:
        emit(result)
    else:
        click.echo(table(result))
        if plot_path is not None:
            click.echo(f"\nplot: {plot_path}")


def _parallel_bench(model, dtype, tokens, runs, directory, chunk_size, as_json, plot_path) -> None:
    from ..measure.bench import parallel as parallel_bench

    if dtype is not None:
        raise click.UsageError("--parallel runs the model in its own dtype: drop --dtype")
    with Progress("bench", as_json, unit="layout") as bar:
        result = parallel_bench.run_parallel_bench(model or parallel_bench.DEFAULT_MODEL, tokens, runs,
                                                   chunk_size=chunk_size, directory=directory,
                                                   progress=lambda done, total, _phase: bar(done, total))
    _show(result, as_json, plot_path, parallel_bench.plot_parallel, parallel_bench.format_parallel_table)
def _bench_serve(model, runs, concurrency, doc_tokens, rounds, answer_tokens, long_tokens, as_json, plot_path) -> None:
    try:
        levels = tuple(int(x) for x in concurrency.split(","))
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter("a comma-separated list of positive integers", param_hint="--concurrency") from None
    try:
        import openai  # noqa: F401  (the official client drives both servers)
    except ImportError:
        raise click.ClickException("kvmlx bench --serve needs the openai package: pip install 'kvmlx[bench]'") from None
    with Progress("serve bench", as_json, unit="step") as bar:
        result = bench_api.run_serve_bench(model or "builtin:small", doc_tokens=doc_tokens, concurrency=levels,
                                           rounds=rounds, max_tokens=answer_tokens, repeats=runs,
                                           long_tokens=long_tokens, progress=lambda d, t, _w: bar(d, t))
    _show(result, as_json, plot_path, bench_api.plot_serve, bench_api.format_serve_table)


def _bench_agent(model, turns, doc_tokens, tool_tokens, answer_tokens, as_json, plot_path) -> None:
    from ..measure.bench import agent as agent_bench

    try:
        import openai  # noqa: F401  (the official client drives both servers)
    except ImportError:
        raise click.ClickException("kvmlx bench --agent needs the openai package: pip install 'kvmlx[bench]'") from None
    with Progress("agent bench", as_json, unit="turn") as bar:
        result = agent_bench.run_agent_bench(model or "builtin:small", turns=turns, doc_tokens=doc_tokens,
                                             tool_tokens=tool_tokens, answer_tokens=answer_tokens,
                                             progress=lambda d, t, _w: bar(d, t))
    _show(result, as_json, plot_path, agent_bench.plot_agent, agent_bench.format_agent_table)


@main.command("cost")
@click.option("--readers", type=click.IntRange(1), default=None, help="Number of readers (agents) N.  [default: 80,000,000]")
@click.option("--tokens", type=click.IntRange(1), default=None, help="Document length in tokens.  [default: 3774, or the artifact's]")
@click.option("--price-per-mtok", type=float, default=None, help="Input-token price, $ per million tokens.  [default: 5]")
@click.option("--tariff", type=float, default=None, help="Cache-read price as a fraction of the input price.  [default: 0.1]")
@click.option("--ratio", type=float, default=None, help="Measured prefill time / reuse time.  [default: 49.7, the paper's M1 Pro]")
@click.option("--egress-per-gb", type=float, default=None, help="Egress, $ per GB downloaded.  [default: 0.09]")
@click.option("--storage-per-gb-month", type=float, default=None, help="Storage, $ per GB-month.  [default: 0]")
@click.option("--months", type=float, default=None, help="Storage horizon in months.  [default: 1]")
@click.option("--bytes-per-token", type=float, default=None, help="KV bytes per token.  [default: 147456, fp16 Qwen3-4B]")
@click.option("--compression-ratio", type=float, default=None, help="Add a 'ship compressed' strategy at size / C.")
@click.option("--gb-unit", type=click.Choice(["paper", "si", "iec"]), default=None,
              help="What a GB is: paper = 1.024e9 B (reproduces the paper), si = 1e9, iec = 2^30.  [default: paper]")
@click.option("--artifact", type=click.Path(exists=True, dir_okay=False), default=None, help="Take the KV size and token count from this artifact.")
@click.option("--model", "-m", default=None, help="Take the KV size from this model's config.json (local path or hub repo id).")
@click.option("--bench", type=click.Path(exists=True, dir_okay=False), default=None, help="Take the ratio from `kvmlx bench --json` output.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write a PNG: cost per reader vs readers, break-even points marked.")
def cost(readers, tokens, price_per_mtok, tariff, ratio, egress_per_gb, storage_per_gb_month, months,
         bytes_per_token, compression_ratio, gb_unit, artifact, model, bench, as_json, plot_path) -> None:
    """What N readers pay to re-prefill a document vs. load its published KV (the paper's cost model)."""
    from ..measure import cost as cost_api

    inputs, sources = cost_api.resolve_inputs(
        readers=readers, tokens=tokens, price_per_mtok=price_per_mtok, tariff=tariff, ratio=ratio,
        egress_per_gb=egress_per_gb, storage_per_gb_month=storage_per_gb_month, months=months,
        bytes_per_token=bytes_per_token, compression_ratio=compression_ratio, gb_unit=gb_unit,
        artifact=artifact, model=model, bench=bench, read_header=read_header)
    costs = cost_api.strategy_costs(inputs)
    if plot_path is not None:
        cost_api.plot(inputs, plot_path)
    if as_json:
        emit(cost_api.report_dict(inputs, costs, sources, plot_path))
    else:
        click.echo(cost_api.format_table(inputs, costs, sources))
        if plot_path is not None:
            click.echo(f"\nplot: {plot_path}")


FAMILY_CHUNK = 64
FAMILY_TOKENS = 512


def _bench_families(lm, dtype, lengths, runs, directory, as_json, plot_path) -> None:
    """`bench --families` (every built-in family preset; --kv-bits rows quantize from token 0, group 32)
    or `bench --model M` (`lm`) for a model with sliding-window or recurrent caches."""
    explicit = click.get_current_context().get_parameter_source("lengths") == click.core.ParameterSource.COMMANDLINE
    length = max(lengths) if explicit else FAMILY_TOKENS
    targets = [(lm, None)] if lm is not None else []
    for spec in [] if lm is not None else bench_api.FAMILY_MODELS:
        name, _, bits = spec.partition(" --kv-bits ")
        targets.append((load_model(name, dtype), KVQuantization(int(bits), 32, 0) if bits else None))
    with Progress("families", as_json, unit="phase") as bar:
        result = bench_api.run_families(targets, length, runs, chunk_size=FAMILY_CHUNK, directory=directory,
                                        progress=lambda done, total, _phase: bar(done, total))
    _show(result, as_json, plot_path, bench_api.plot_families, bench_api.format_family_table)
