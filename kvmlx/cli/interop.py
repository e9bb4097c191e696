"""`kvmlx export ARTIFACT --mlx-lm OUT.safetensors` and `kvmlx import CACHE.safetensors`: to and from
mlx-lm's prompt-cache files (kvmlx.runtime.interop); arguments and printing only.
"""

from __future__ import annotations

import click

from ..models import load_model
from ..runtime import interop
from .app import DTYPE_CHOICE, check_output_path, emit, main, read_text


@main.command("export")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--mlx-lm", "out", required=True, type=click.Path(dir_okay=False),
              help="Write an mlx-lm prompt-cache file here (for mlx_lm.generate --prompt-cache-file).")
@click.option("--model-id", default=None,
              help="The `model` metadata mlx_lm.generate compares its --model with (default: the artifact's model; "
                   "a built-in preset's local directory).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_command(artifact, out, model_id, as_json) -> None:
    """Write ARTIFACT's KV (every digest checked) as an mlx-lm prompt cache that mlx-lm continues from."""
    check_output_path(out, "prompt-cache file")
    res = interop.export_mlx_lm(artifact, out, model=model_id)
    if as_json:
        emit(res.to_json())
    else:
        click.echo(f"wrote {res.num_tokens} tokens of KV to {res.path} ({res.file_bytes / 1e6:.1f} MB); "
                   f"continue with: mlx_lm.generate --model {res.model} --prompt-cache-file {res.path} --prompt ...")


@main.command("import")
@click.argument("cache_file", metavar="CACHE.safetensors", type=click.Path(exists=True, dir_okay=False))
@click.option("--document", "-d", required=True, type=click.Path(exists=True, allow_dash=True),
              help="The text the cache was made from (as given to mlx_lm.cache_prompt --prompt).")
@click.option("--model", "-m", default=None, help="The model that made the cache (default: the cache's `model` metadata).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Model dtype (default: the cache's KV dtype).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Artifact file to write (.kvmlx).")
@click.option("--recompute", "-r", default=64, show_default=True, type=click.IntRange(0),
              help="Prefill the first N tokens from scratch and compare their KV before writing.")
@click.option("--probe", default=8, show_default=True, type=click.IntRange(0),
              help="Recompute K random positions (the last always) from the stored KV and compare.")
@click.option("--tolerance", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Largest accepted |difference| (0: bit-exact, right for the CPU backend).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def import_command(cache_file, document, model, dtype, out, recompute, probe, tolerance, as_json) -> None:
    """Turn an mlx_lm.cache_prompt file of DOCUMENT into a checked kvmlx artifact.

    The document is tokenized as cache_prompt does (its chat template, a user message continued, when
    the tokenizer has one); the token count must equal the cache's, and recomputed positions must
    match before anything is written."""
    from ..measure.spotcheck import spot_check

    text = read_text(document, "document")
    check_output_path(out, "artifact")
    caches, meta = interop.read_mlx_lm_cache(cache_file)  # refuse a bad file before loading any model
    spec = model or meta.get("model")
    if not spec:
        raise click.UsageError("the cache names no model: pass --model")
    lm = load_model(spec, dtype or str(caches[0].keys.dtype).split(".")[-1])
    del caches

    def check(staged):
        spot_check(staged, lm, recompute=recompute, probe=probe, tolerance=tolerance).raise_if_failed()

    res = interop.import_mlx_lm(cache_file, lm, text, out, check=check, tolerance=tolerance)
    summary = {"artifact": str(res.path), "model": lm.model_id, "dtype": lm.dtype, "tokens": res.num_tokens,
               "artifact_bytes": res.artifact_bytes, "recomputed": recompute, "probed": probe,
               "model_fingerprint": res.header["model"]["fingerprint"]}
    if as_json:
        emit(summary)
    else:
        click.echo(f"imported {res.num_tokens} tokens of KV into {res.path} ({res.artifact_bytes / 1e6:.1f} MB); "
                   f"{min(recompute, res.num_tokens)} positions recomputed from scratch and {probe} probed: identical")
