"""The document commands: `publish`, `generate` (from an artifact or the store, with `--verify`),
`inspect`, `verify` (spot checks) and `demo`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

import click

from ..artifact import trust as trust_api
from ..artifact.format import ENCODINGS, Artifact
from ..artifact.layout import describe, header_layout
from ..caches import layer_groups
from ..errors import BadSignatureError, TrustListError
from ..models import load_model
from ..runtime.distributed import per_rank, running_layout
from ..runtime.generate import DEFAULT_MAX_TOKENS, visible_text
from ..runtime.generate import generate as generate_api
from ..runtime.generate import verify as verify_api
from ..runtime.publish import DEFAULT_CHUNK
from ..runtime.publish import publish as publish_api
from .cache import cache_from, cache_options
from .app import (
    DTYPE_CHOICE,
    EXIT_NOT_EXACT,
    Progress,
    Timings,
    ask_passphrase,
    check_output_path,
    emit,
    kv_quant_from,
    kv_quant_options,
    read_text,
    main,
    stream_printer,
)

PIPELINE_OPTION = click.option(
    "--pipeline", is_flag=True,
    help="Under mlx.launch: shard the model in pipeline stages (layers per rank) instead of tensor parallel (KV heads per rank).")


def parallel_mode(pipeline: bool) -> str | None:
    """load_model's `parallel`: pipeline when asked, else tensor parallel under a launcher (None lets it choose)."""
    return "pipeline" if pipeline else None


DEMO_PROMPT = "\n\nQuestion: Why should an agent load a published KV cache instead of running prefill?\nAnswer:"


@main.command()
@click.argument("document", type=click.Path(exists=True, allow_dash=True))
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False, writable=True), help="Artifact file to write (.kvmlx).")
@click.option("--store", "to_store", is_flag=True, help="Write into the local store instead of a file (`kvmlx generate` then finds it by prompt).")
@click.option("--store-dir", type=click.Path(file_okay=False), default=None, help="The store's directory (implies --store; default: $KVMLX_HOME/store).")
@click.option("--chat", is_flag=True, help="Publish the chat-templated prefix: [system turn], then the user turn up to the end of the document.")
@click.option("--system", default=None, help="With --chat: the system prompt.")
@click.option("--model", "-m", default=None, help="Local path or Hugging Face repo id (default: the built-in tiny Qwen3).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Run the model (and store the KV) in this dtype (default: the model's).")
@click.option("--chunk-size", default=DEFAULT_CHUNK, show_default=True, type=click.IntRange(1), help="Prefill chunk size (recorded; agents reuse it).")
@click.option("--encoding", type=click.Choice(list(ENCODINGS)), default="raw", show_default=True,
              help="KV encoding: raw, lossless (bytesplit-zstd, expsplit-zstd) or lossy (int8-tensor, q8, q4).")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sign the artifact with this Ed25519 private key (from `kvmlx keygen`).")
@click.option("--checkpoint-every", type=click.IntRange(1), default=None,
              help="Models with recurrent state or sliding windows: store a state checkpoint every N tokens (a multiple "
                   "of --chunk-size) so prompts sharing part of the document reuse it (default: auto, by state size).")
@click.option("--format-version", type=click.Choice(["1", "2", "3"]), default="3", show_default=True,
              help="With --out: 1 or 2 write kvmlx's own container, for kvmlx readers older than version 3 "
                   "(the header version follows the model: 2 for cache families); 3 is a safetensors file mx.load reads.")
@kv_quant_options
@PIPELINE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def publish(document, out, to_store, store_dir, chat, system, model, dtype, chunk_size, encoding, sign_key, checkpoint_every,
            format_version, kv_bits, kv_group_size, quantized_kv_start, pipeline, as_json) -> None:
    """Prefill DOCUMENT (a text file, or - for stdin) once and write its KV artifact (--out) or store it (--store)."""
    to_store = to_store or store_dir is not None
    kv_quant = kv_quant_from(kv_bits, kv_group_size, quantized_kv_start)
    if checkpoint_every is not None and checkpoint_every % chunk_size:
        raise click.BadParameter(f"{checkpoint_every} is not a multiple of --chunk-size {chunk_size}",
                                 param_hint="--checkpoint-every")
    if kv_quant is not None and encoding != "raw":
        raise click.UsageError("--kv-bits stores mlx-lm's quantized KV as it is: it takes no --encoding")
    if (out is None) != to_store:
        raise click.UsageError("give --out FILE or --store, not both" if out else "give --out FILE or --store")
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    if to_store and format_version != "3":
        raise click.UsageError("--format-version applies to --out files (the store writes the current version)")
    text = read_text(document, "document")  # every input is checked before the model loads and the prefill runs
    if out is not None:
        check_output_path(out, "artifact")
    key = trust_api.load_private_key(sign_key, ask_passphrase) if sign_key else None
    signing = {"sign": trust_api.signer(key)} if key else {}
    signing.update(kv_quant=kv_quant, checkpoint_every=checkpoint_every)
    lm = load_model(model, dtype, parallel=parallel_mode(pipeline))
    if chat:
        from ..runtime.agent import chat_prefix_tokens

        text = chat_prefix_tokens(lm, text, system)
    stored = None
    with Progress("prefill", as_json) as bar:
        if to_store:
            from ..runtime.store import Store

            stored = Store(store_dir).publish(lm, text, chunk_size=chunk_size, encoding=encoding, progress=bar,
                                               **signing)
            result = stored.result  # None when the store already held these tokens: nothing was computed
        else:
            result = publish_api(lm, text, out, chunk_size=chunk_size, encoding=encoding, progress=bar,
                                 format_version=int(format_version), **signing)
    if result is not None:
        summary = {
            "artifact": str(result.path), "model": lm.model_id, "dtype": lm.dtype, "tokens": result.num_tokens,
            "artifact_bytes": result.artifact_bytes, "kv_bytes": result.kv_bytes,
            "prefill_seconds": result.prefill_seconds, "write_seconds": result.write_seconds,
            "model_fingerprint": result.header["model"]["fingerprint"], "encoding": encoding,
            "format_version": result.header["version"], "kv_quantization": result.header["kv"].get("quantization"),
            "checkpoints": result.num_checkpoints, "checkpoint_every": result.checkpoint_every,
            "checkpoint_bytes": result.checkpoint_bytes,
        }
    else:
        e = stored.entry
        summary = {"artifact": str(e.path), "model": lm.model_id, "dtype": lm.dtype, "tokens": e.num_tokens,
                   "artifact_bytes": e.file_bytes, "prefill_seconds": 0.0, "write_seconds": 0.0,
                   "model_fingerprint": e.model_fingerprint, "encoding": e.encoding}
    if stored is not None:
        summary.update(key=stored.key, existed=stored.existed)
    summary["chat"] = chat
    summary["signed_by"] = trust_api.public_key_id(key) if key and result is not None else None
    ranks = per_rank(lm, part_bytes=result.artifact_bytes if result else None,
                     prefill_seconds=result.prefill_seconds if result else 0.0,
                     write_seconds=result.write_seconds if result else 0.0)
    if ranks is not None:
        summary["parallel"] = {"layout": describe(running_layout(lm)), "ranks": ranks}
        summary.pop("artifact_bytes", None)  # each rank's part is in ranks[]; the manifest is at `artifact`
    if as_json:
        emit(summary)
    elif result is None:
        click.echo(f"already stored: {summary['tokens']} tokens of KV as {stored.key[:12]} ({summary['artifact']})")
    else:
        where = f"store entry {stored.key[:12]} ({result.path})" if stored else str(result.path)
        click.echo(f"published {result.num_tokens} tokens of KV ({result.artifact_bytes / 1e6:.1f} MB, {lm.dtype}) "
                   f"to {where} in {result.prefill_seconds:.2f} s prefill + {result.write_seconds:.2f} s write")
        if result.num_checkpoints:
            click.echo(f"{result.num_checkpoints} state checkpoints every {result.checkpoint_every} tokens "
                       f"({result.checkpoint_bytes / 1e6:.2f} MB)")
        if ranks is not None:
            click.echo(_rank_words(summary["parallel"], "part_bytes", "write_seconds", "wrote"))


@main.command()
@click.argument("artifact", required=False, default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt", "-p", default=None,
              help="With ARTIFACT: text that continues the document (tokenized without special tokens). Without: the "
                   "whole prompt (tokenized as the model's tokenizer does); the stored KV sharing its longest prefix is reused.")
@click.option("--prompt-file", type=click.Path(exists=True, allow_dash=True), default=None, help="Read the prompt from a file (- for stdin).")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="Without ARTIFACT: the store to reuse from (default: $KVMLX_HOME/store).")
@click.option("--chat-document", type=click.Path(exists=True, allow_dash=True), default=None,
              help="Without ARTIFACT: ask the prompt as a question about this document, in the model's chat template.")
@click.option("--system", default=None, help="With --chat-document: the system prompt.")
@click.option("--allow-lossy", is_flag=True, help="Without ARTIFACT: also reuse quantised (lossily encoded) KV; not token-exact.")
@click.option("--model", "-m", default=None, help="Local path or Hugging Face repo id (default: the model the artifact names; "
                                                    "without ARTIFACT, the built-in tiny Qwen3).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Model dtype (default: the artifact's KV dtype, or the model's).")
@click.option("--max-tokens", "-n", default=DEFAULT_MAX_TOKENS, show_default=True, type=click.IntRange(1))
@click.option("--verify", is_flag=True, help="Also prefill document + prompt from scratch and compare tokens and logits.")
@click.option("--single-pass", is_flag=True, help="With --verify, also compare against one unchunked forward pass.")
@click.option("--no-verify-digests", is_flag=True, help="Skip tensor digests (only for files you wrote yourself).")
@click.option("--require-exact", is_flag=True, help="Refuse lossily encoded (quantised) artifacts.")
@click.option("--require-signed", is_flag=True,
              help="Only use artifacts signed by a key in your trust list (`kvmlx trust`); without ARTIFACT, "
                   "stored entries from other publishers are skipped.")
@kv_quant_options
@PIPELINE_OPTION
@cache_options()
@click.option("--blend", "blend", is_flag=False, flag_value="default", default=None, metavar="[R|RULE:R]",
              help="Without ARTIFACT: reuse published documents anywhere in the prompt, recomputing a fraction R of "
                   "their tokens (rules cacheblend, epic, anchored); approximate unless R = 1. Off by default.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate(artifact, prompt, prompt_file, store_dir, chat_document, system, allow_lossy, model, dtype, max_tokens,
             verify, single_pass, no_verify_digests, require_exact, require_signed, kv_bits, kv_group_size,
             quantized_kv_start, pipeline, blend, as_json, **cache_args) -> None:
    """Continue a prompt greedily without re-running the prefill of a published document.

    With ARTIFACT, the prompt continues that artifact's document. Without, the prompt is complete and
    kvmlx reuses the stored artifact (see `kvmlx store`) sharing its longest token prefix, if any, or
    the deeper prefix its prefix cache kept from an earlier run (which this run extends: --no-cache).
    With ARTIFACT and no --kv-bits, KV quantization continues with the artifact's settings; given
    settings that differ from the artifact's are refused.
    """
    kv_quant = kv_quant_from(kv_bits, kv_group_size, quantized_kv_start)
    timings = Timings()
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    text = read_text(prompt_file, "prompt file", allow_empty=True) if prompt_file is not None else (prompt or "")
    blend = _blend_settings(blend, artifact, verify)
    if artifact is None:
        if require_exact:
            raise click.UsageError("without ARTIFACT, reuse is exact unless --allow-lossy")
        _generate_from_store(text, store_dir, chat_document, system, allow_lossy, model, dtype, max_tokens, verify,
                             single_pass, no_verify_digests, as_json, require_signed, kv_quant, pipeline, timings,
                             cache_args, blend=blend)
        return
    kv = {"kv_quant": kv_quant if kv_bits is not None else "artifact"}
    if store_dir is not None or chat_document is not None or system is not None or allow_lossy:
        raise click.UsageError("--store, --chat-document, --system and --allow-lossy are for prompts without ARTIFACT")
    trust_list = trust_api.TrustList.load() if require_signed else None
    with Artifact(artifact) as art:  # the publisher is checked before the header names a model to load
        trust_api.check_signature(art, require_signed, trust_list)
        header = art.header
    with timings("model_load"):
        lm = load_model(model or trust_api.model_spec_from_header(header), dtype or header["kv"]["dtype"],
                        parallel=parallel_mode(pipeline))
    with timings("fingerprints"):
        fingerprints(lm)  # memoised: the load's binding check below reuses them
    printer = stream_printer(lm, not as_json)
    if verify:
        report = verify_api(artifact, lm, text, max_tokens=max_tokens, single_pass=single_pass, on_token=printer,
                            require_signed=require_signed, trust_list=trust_list, **kv)
        _finish_verification(lm, report, as_json, extra=_load_ranks(lm, report.load_seconds, report.bytes_read,
                                                                     report.artifact_bytes))
        return
    gen, loaded = generate_api(artifact, lm, text, max_tokens=max_tokens, on_token=printer,
                               verify_digests=not no_verify_digests, require_exact=require_exact,
                               require_signed=require_signed, trust_list=trust_list, **kv)
    ranks = _load_ranks(lm, loaded.load_seconds, loaded.bytes_read, loaded.header["file_bytes"])
    if as_json:
        emit({**ranks,
            "text": visible_text(lm.tokenizer, gen.tokens), "tokens": gen.tokens, "reused_tokens": gen.reused_tokens,
            "prefilled_tokens": gen.prefilled_tokens, "load_seconds": loaded.load_seconds,
            "reuse_first_token_seconds": gen.first_token_seconds, "total_seconds": gen.total_seconds,
            "load_path": loaded.load_path, "artifact_bytes": loaded.header["file_bytes"],
            "signature": loaded.signature.to_json() if loaded.signature else None, "bytes_read": loaded.bytes_read,
            "digests": loaded.digests,
            "timings": _phases(timings, loaded.load_seconds, gen.first_token_seconds, gen.total_seconds),
        })
    else:
        click.echo()
        if ranks:
            click.echo(_rank_words(ranks["parallel"], "bytes_read", "load_seconds", "read"))


def _blend_settings(value, artifact, verify):
    """--blend's value as settings (None: off); refused with ARTIFACT and with --verify."""
    if value is None:
        return None
    if artifact is not None or verify:
        raise click.UsageError("--blend is for prompts without ARTIFACT, and not with --verify (see kvmlx bench --blend)")
    from ..runtime.blend import BlendSettings

    return BlendSettings() if value == "default" else BlendSettings.of(value)


def fingerprints(lm) -> None:
    """Compute (and memoise) the model's and tokenizer's fingerprints, for timing them apart."""
    from ..artifact.identity import model_fingerprint, tokenizer_fingerprint

    model_fingerprint(lm)
    tokenizer_fingerprint(lm)


def _phases(timings, load_s: float, first_token_s: float, total_s: float) -> dict:
    """`timings` for --json: import, model_load, fingerprints, kv_load, suffix_prefill (the rest of the
    time to the first token: prefill of the suffix, with the lookup for a store), decode, command."""
    timings.values.update(kv_load=load_s, suffix_prefill=max(first_token_s - load_s, 0.0),
                          decode=max(total_s - first_token_s, 0.0))
    return timings.to_json()


def _generate_from_store(text, store_dir, chat_document, system, allow_lossy, model, dtype, max_tokens, verify,
                         single_pass, no_verify_digests, as_json, require_signed=False, kv_quant=None,
                         pipeline=False, timings=None, cache_args=None, blend=None) -> None:
    """`generate` without ARTIFACT: the store finds the longest published (or cached) prefix of the prompt."""
    from ..runtime.agent import Agent, chat_prompt_tokens
    from ..runtime.store import Store

    timings = timings or Timings()
    if system is not None and chat_document is None:
        raise click.UsageError("--system needs --chat-document")
    document = read_text(chat_document, "document") if chat_document is not None else None
    with timings("model_load"):
        lm = load_model(model, dtype, parallel=parallel_mode(pipeline))
    with timings("fingerprints"):
        fingerprints(lm)
    store = Store(store_dir)
    cache = cache_from(lm, store, kv_quant, **(cache_args or {"no_cache": True})) if lm.group is None else False
    agent = Agent(lm, store, verify_digests=not no_verify_digests, allow_lossy=allow_lossy,
                  require_signed=require_signed, trust_list=trust_api.TrustList.load() if require_signed else None,
                  kv_quant=kv_quant, cache=cache, blend=blend)
    tokens = chat_prompt_tokens(lm, document, text, system) if chat_document is not None else agent.encode(text)
    if not tokens:
        raise click.UsageError("the prompt is empty: give --prompt or --prompt-file")
    printer = stream_printer(lm, not as_json)
    if verify:
        report = agent.verify(tokens, max_tokens=max_tokens, single_pass=single_pass, on_token=printer)
        _warn_quarantined(report.reuse.quarantined)
        _finish_verification(lm, report, as_json)
        return
    gen = agent.generate(tokens, max_tokens=max_tokens, on_token=printer)
    _warn_quarantined(gen.quarantined)
    if as_json:
        emit({**gen.to_json(), "text": visible_text(lm.tokenizer, gen.tokens), "timings": _phases(timings, gen.load_seconds, gen.first_token_seconds, gen.total_seconds)})
        return
    click.echo()
    if blend is not None:
        click.echo(f"blend ({blend.rule}, R={blend.r:g}): reused {gen.reused_tokens}, recomputed {gen.recomputed_tokens}, "
                   f"computed {gen.computed_tokens} of {gen.prompt_tokens} prompt tokens from "
                   f"{len(gen.blend.documents)} documents" + ("; approximate" if gen.approximate else ""), err=True)
        return
    source = f"store entry {gen.key[:12]}" if gen.key else (
        "the prefix cache (" + ", ".join(f"{n} from {t}" for t, n in gen.tiers.items()) + ")" if gen.tiers
        else "the store (no match)")
    click.echo(f"reused {gen.reused_tokens} of {gen.prompt_tokens} prompt tokens from {source}; "
               f"prefilled {gen.prefilled_tokens}", err=True)


def _load_ranks(lm, load_seconds: float, bytes_read: int | None, part_bytes: int) -> dict:
    """{"parallel": layout and each rank's load figures} under a launcher (every rank calls it), else {}."""
    ranks = per_rank(lm, load_seconds=float(load_seconds), bytes_read=bytes_read, part_bytes=part_bytes)
    return {} if ranks is None else {"parallel": {"layout": describe(running_layout(lm)), "ranks": ranks}}


def _rank_words(parallel: dict, bytes_key: str, seconds_key: str, verb: str) -> str:
    each = "; ".join(f"rank {r['rank']} {verb} {r[bytes_key] / 1e6:.2f} MB in {r[seconds_key] * 1e3:.0f} ms"
                     if r[bytes_key] is not None else f"rank {r['rank']}: {r[seconds_key] * 1e3:.0f} ms"
                     for r in parallel["ranks"])
    return f"{parallel['layout']}: {each}"
def _warn_quarantined(quarantined: list[dict]) -> None:
    """One line on stderr per store entry that failed to load and was moved to quarantine/ (even with
    --json, whose object lists them too): a bad entry never fails a generation, and never goes unsaid."""
    for q in quarantined:
        where = f"moved to {q['path']}" if q["path"] else "its file was already gone"
        click.echo(f"warning: store entry {q['key'][:12]} {q['reason']}; {where} (reason beside it)", err=True)


def _finish_verification(lm, report, as_json: bool, *, lead: str = "", extra: dict | None = None) -> None:
    """Print a verification's result (`extra` fields join the JSON; `lead` precedes the words) and
    exit with EXIT_NOT_EXACT when reuse diverged."""
    if as_json:
        emit({**report.to_json(), **(extra or {}), "text": visible_text(lm.tokenizer, report.reuse.tokens)})
    else:
        click.echo()
        click.echo(lead + _verification_words(report))
        if extra and "parallel" in extra:
            click.echo(_rank_words(extra["parallel"], "bytes_read", "load_seconds", "read"))
    if not report.token_exact:
        sys.exit(EXIT_NOT_EXACT)


def _verification_words(report) -> str:
    r = report.to_json()
    verdict = "TOKEN-EXACT" if r["token_exact"] else f"NOT exact (first difference at token {r['first_mismatch']})"
    lines = [
        f"verify: {verdict}: {r['tokens_compared']} greedy tokens compared with prefilling from scratch; "
        f"max |logit difference| = {r['max_abs_logit_diff']:.3g}" + (" (bit-identical)" if r["logits_identical"] else ""),
        f"reused {r['reused_tokens']} tokens from a {r['artifact_bytes'] / 1e6:.2f} MB artifact, prefilled {r['prefilled_tokens']}; "
        f"first token after {r['reuse_first_token_seconds'] * 1e3:.1f} ms (load {r['load_seconds'] * 1e3:.1f} ms) "
        f"vs {r['prefill_seconds'] * 1e3:.1f} ms from scratch ({r['speedup_first_token']:.1f}x)",
    ]
    if report.single_pass:
        sp = report.single_pass
        lines.append(f"single unchunked forward pass: tokens {'equal' if sp['token_exact'] else 'differ'}, "
                     f"max |logit difference| = {sp['max_abs_logit_diff']:.3g}")
    return "\n".join(lines)


@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole validated header as JSON.")
def inspect(artifact, as_json) -> None:
    """Show ARTIFACT's header digest (its name in catalogs, prices and tokens), signature status, what
    produced it, its geometry, tokens and tensors (validated, tensor digests unchecked)."""
    with Artifact(artifact) as art:
        h, header_digest = art.header, art.header_digest.hex()
        try:
            signature = trust_api.check_signature(art, False, trust_api.TrustList.load()).describe()
        except BadSignatureError as e:
            signature = f"INVALID: {e}"
        except TrustListError as e:  # a malformed trust list: the signature is still checked
            signature = f"{trust_api.check_signature(art).describe()} (trust list unreadable: {e})"
    if as_json:
        emit({**h, "header_digest": header_digest, "signature": signature})
        return
    m, kv, tensors = h["model"], h["kv"], h["tensors"]
    kv_bytes = sum(t["nbytes"] for t in tensors if t["name"].startswith("layers."))
    ckpt_bytes = sum(t["nbytes"] for t in tensors if t["name"].startswith("checkpoints."))
    tokens = h["document"]["tokens"]
    preview = " ".join(map(str, tokens[:12])) + (" ..." if len(tokens) > 12 else "")
    rows = [
        ("header digest", header_digest),
        ("signature", signature),
        ("format", f"kvmlx v{h['version']} ({h.get('created_by', '?')})"),
        ("model", f"{m['id']} ({m['model_type']})"),
        ("model fingerprint", m["fingerprint"]),
        ("tokenizer fingerprint", h["tokenizer"]["fingerprint"]),
        ("geometry", f"{m['num_layers']} layers x {m['num_kv_heads']} KV heads x head_dim {m['head_dim']}, layout {kv['layout']}"),
        ("rope", json.dumps(m["rope"], sort_keys=True)),
        ("kv", f"{kv['dtype']}, {kv['num_tokens']} tokens, prefill chunk {kv['chunk_size']}"),
        ("bytes", f"{h['file_bytes']} in the file, {kv_bytes} of KV and state ({h['file_bytes'] / max(kv_bytes, 1):.3f}x)"
                  + (f", {ckpt_bytes} of checkpoints every {kv.get('checkpoint_every')} tokens" if ckpt_bytes else "")),
        ("tensors", f"{len(tensors)} ({h['digest']} digest each), 16 KiB-aligned"),
        ("tokens", preview),
        ("weights", _weights_words(m.get("weights_quantization"))),
    ]
    if (layout := header_layout(h)) is not None:
        p = h["parallel"]
        what = f"rank {p['part']}'s part" if "part" in p else "manifest of " + ", ".join(e["file"] for e in p["parts"])
        rows.insert(5, ("parallel", f"{layout.describe()}; {what}"))
    if kv.get("quantization"):
        q = kv["quantization"]
        rows.append(("kv quantization", f"{q['bits']} bits, group {q['group_size']}, from token {q['start']} (mlx-lm --kv-bits)"))
    for g in layer_groups(h):
        plural = "s" if len(g["layers"]) > 1 else ""
        rows.append((f"layer{plural} {_ranges(g['layers'])}", _group_words(g)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.option("--model", "-m", default="builtin:tiny", show_default=True, help="Model to demonstrate with.")
@click.option("--max-tokens", "-n", default=DEFAULT_MAX_TOKENS, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Keep the artifact here (default: a temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def demo(model, max_tokens, out, as_json) -> None:
    """Publish the bundled sample document, generate from its artifact, and verify against prefill."""
    say = (lambda s: None) if as_json else click.echo
    if out is not None:
        check_output_path(out, "artifact")
    document = resources.files("kvmlx").joinpath("data/sample_document.txt").read_text(encoding="utf-8")
    say(f"1. loading {model} (built on first use, offline)")
    lm = load_model(model)
    with tempfile.TemporaryDirectory(prefix="kvmlx-demo-") as tmp:
        path = Path(out or Path(tmp) / "sample.kvmlx")
        with Progress("prefill", as_json) as bar:
            pub = publish_api(lm, document, path, progress=bar)
        say(f"2. published the sample document: {pub.num_tokens} tokens -> {path.name}, "
            f"{pub.artifact_bytes / 1e6:.2f} MB of {lm.dtype} KV, prefill {pub.prefill_seconds:.2f} s")
        say(f"3. generating from the artifact with the prompt {DEMO_PROMPT.strip()!r}:\n")
        report = verify_api(path, lm, DEMO_PROMPT, max_tokens=max_tokens, single_pass=True,
                            on_token=stream_printer(lm, not as_json))
    _finish_verification(lm, report, as_json, lead="\n4. ", extra={
        "model": lm.model_id, "dtype": lm.dtype, "document_tokens": pub.num_tokens,
        "publish_prefill_seconds": pub.prefill_seconds})


@main.command("verify")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "-m", default=None, help="Model to check against (default: the model id the artifact names).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Model dtype (default: the artifact's KV dtype).")
@click.option("--recompute", "-r", default=None, type=click.IntRange(0),
              help="Prefill the first N tokens from scratch and compare their KV.  [default: 64]")
@click.option("--sample", "-s", default=0, show_default=True, type=click.IntRange(0),
              help="Also recompute from scratch up to K random prefix lengths (costs a prefill of the longest).")
@click.option("--probe", default=None, type=click.IntRange(0),
              help="Recompute K random positions (the last always) from the stored KV before them, one step each.  [default: 8]")
@click.option("--seed", default=None, type=int, help="Seed for the --sample/--probe positions (default: random).")
@click.option("--tolerance", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Largest accepted |difference| (0: bit-exact, right for the CPU backend; GPU backends may need more).")
@click.option("--no-model", is_flag=True, help="Check structure, digests and signature only (no model is loaded).")
@click.option("--require-signed", is_flag=True, help="Fail unless the artifact is signed by a key in your trust list.")
@click.option("--no-verify-digests", is_flag=True, help="Skip tensor digests (only for files you wrote yourself).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_command(artifact, model, dtype, recompute, sample, probe, seed, tolerance, no_model, require_signed,
                   no_verify_digests, as_json) -> None:
    """Check ARTIFACT: structure, digests, signature, model binding, and recomputed-KV spot checks."""
    from ..measure import spotcheck

    trust_list = trust_api.TrustList.load()
    lm = None
    if not no_model:
        with Artifact(artifact) as art:  # the publisher is checked before the header names a model to load
            trust_api.check_signature(art, require_signed, trust_list)
            header = art.header
        lm = load_model(model or trust_api.model_spec_from_header(header), dtype or header["kv"]["dtype"])
    report = spotcheck.spot_check(
        artifact, lm, recompute=spotcheck.DEFAULT_RECOMPUTE if recompute is None else recompute, sample=sample,
        probe=spotcheck.DEFAULT_PROBE if probe is None else probe, seed=seed, tolerance=tolerance,
        verify_digests=not no_verify_digests, require_signed=require_signed, trust_list=trust_list)
    if as_json:
        emit(report.to_json())
    else:
        click.echo(report.describe())
    report.raise_if_failed()


def _weights_words(q) -> str:
    if not q:
        return "not quantized"
    return f"{q['bits']}-bit, group size {q.get('group_size', '?')}" + (f" ({q['mode']})" if q.get("mode") else "")


def _ranges(layers: list[int]) -> str:
    out, start = [], layers[0]
    for a, b in zip(layers, [*layers[1:], None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def _group_words(g: dict) -> str:
    words = {"kv": "full attention (KVCache)",
             "rotating": f"sliding window of {g.get('window')} tokens (RotatingKVCache, keep {g.get('keep')})",
             "arrays": f"recurrent state (ArraysCache, {g.get('size')} slots)",
             "quantized": f"quantized KV (QuantizedKVCache, {g.get('bits')} bits, group {g.get('group_size')})",
             "list": "several caches (CacheList)"}[g["family"]]
    cps = g["checkpoints"]
    if cps:
        words += f"; checkpoints at {', '.join(map(str, cps[:8]))}" + (" ..." if len(cps) > 8 else "")
    return words
