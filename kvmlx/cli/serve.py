"""`kvmlx serve`: the OpenAI-compatible provider that answers from hosted KV.
"""

from __future__ import annotations

import click

from ..models import load_model
from ..runtime.store import Store, parse_size
from .app import DTYPE_CHOICE, kv_quant_from, kv_quant_options, main
from .cache import cache_from, cache_options


@main.command("serve")
@click.option("--model", "-m", default=None, help="Local path or Hugging Face repo id (default: the built-in tiny Qwen3).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Run the model in this dtype (must match the published KV's).")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="The store to answer from (default: $KVMLX_HOME/store).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (no authentication: keep it local).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-resident-bytes", default=None, help="Keep at most this much published KV in memory, LRU (e.g. 4G).")
@click.option("--min-reuse-tokens", default=16, show_default=True, type=click.IntRange(1),
              help="Shorter matches are prefilled instead of loaded.")
@click.option("--allow-lossy", is_flag=True, help="Also reuse quantised (lossily encoded) KV; not token-exact.")
@click.option("--no-verify-digests", is_flag=True, help="Skip tensor digests (only for files you wrote yourself).")
@click.option("--served-model-name", "aliases", multiple=True,
              help="Also accept this `model` name (repeatable); the first is the name responses report.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
              help="Requests prefilled or decoded at once (the decode batch).")
@click.option("--max-queued", default=256, show_default=True, type=click.IntRange(1),
              help="Accepted requests not yet decoding; beyond this, 429 with Retry-After.")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(1),
              help="Longer prompts get 400 (default: the model's context length).")
@click.option("--max-body-bytes", default="8M", show_default=True, help="Larger request bodies get 400.")
@click.option("--request-timeout", default=600.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds from arrival after which a request is dropped (503).")
@kv_quant_options
@cache_options(ram=True)
@click.option("--blend", "blend", is_flag=False, flag_value="default", default=None, metavar="[R|RULE:R]",
              help="Default for requests without a `blend` field: reuse published documents anywhere in the prompt, "
                   "recomputing a fraction R of their tokens (approximate unless R = 1). Off by default.")
@click.option("--pipeline", is_flag=True, help="Under mlx.launch: pipeline stages instead of tensor parallel.")
def serve(model, dtype, store_dir, host, port, max_resident_bytes, min_reuse_tokens, allow_lossy, no_verify_digests,
          aliases, max_batch, max_queued, max_prompt_tokens, max_body_bytes, request_timeout, kv_bits, kv_group_size,
          quantized_kv_start, blend, pipeline, **cache_args) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions) that reuses published KV.

    Under mlx.launch, rank 0 serves HTTP and every rank runs the model's shard (as mlx_lm.server does)."""
    kv_quant = kv_quant_from(kv_bits, kv_group_size, quantized_kv_start)
    from ..serving.openai import (
        serve as serve_api,  # imported here: starlette and uvicorn only load for `serve`
    )
    from ..serving.sharded import serve_sharded

    try:
        budget = parse_size(max_resident_bytes) if max_resident_bytes else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-resident-bytes")
    try:
        body_bytes = parse_size(max_body_bytes)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-body-bytes")
    from ..runtime.blend import BlendSettings
    from ..runtime.blend import check_model as check_blend

    blend = None if blend is None else BlendSettings() if blend == "default" else BlendSettings.of(blend)
    lm = load_model(model, dtype, parallel="pipeline" if pipeline else None)
    if blend is not None:
        if lm.group is not None:
            raise click.UsageError("--blend runs in one process only: not under mlx.launch")
        check_blend(lm, kv_quant)  # a model blend cannot move is refused here, in one line
    serve_api = serve_sharded if lm.group is not None else serve_api
    names = list(aliases)
    store = Store(store_dir)
    cache = cache_from(lm, store, kv_quant, **cache_args) if lm.group is None else False
    if lm.group is not None and lm.group.rank() == 0 and not cache_args["no_cache"]:
        click.echo("kvmlx serve: the prefix cache is off under mlx.launch (published KV is still reused)", err=True)
    serve_api(lm, store, cache=cache, blend=blend, host=host, port=port, max_resident_bytes=budget, min_reuse_tokens=min_reuse_tokens,
              verify_digests=not no_verify_digests, allow_lossy=allow_lossy, kv_quant=kv_quant,
              model_name=names[0] if names else None, aliases=[lm.model_id] + names[1:], max_batch=max_batch,
              max_queued=max_queued, max_prompt_tokens=max_prompt_tokens, max_body_bytes=body_bytes,
              request_timeout=request_timeout,
              on_ready=lambda url: click.echo(f"kvmlx serve: {lm.model_id} at {url}" + _cache_words(cache), err=True))


def _cache_words(cache) -> str:
    if not cache:
        return "; prefix cache off"
    where = f"{cache.disk_bytes / 1e9:.1f} GB on disk in {cache.root}" if cache.persist else "not persisted"
    return f"; prefix cache: {cache.ram_bytes / 1e9:.1f} GB in memory, {where}"
