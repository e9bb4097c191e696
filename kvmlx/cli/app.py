"""The `kvmlx` command: a thin Click layer over the Python API.

Exit codes: 0 success; 1 a kvmlx error (bad, mismatched or unreadable artifact or model: one line on
stderr); 2 a usage error (Click's); 3 `--verify`/`demo` ran but reuse was not token-exact.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from .. import __version__
from ..runtime.agent import Agent, chat_prefix_tokens, chat_prompt_tokens
from ..errors import KvmlxError
from ..measure import bench as bench_api
from ..measure.bench import DEFAULT_LENGTHS as BENCH_LENGTHS, DEFAULT_RUNS as BENCH_RUNS, SHAPES, parse_lengths
from ..artifact.format import ENCODINGS, Artifact, read_header
from ..runtime.generate import DEFAULT_MAX_TOKENS, generate as generate_api, verify as verify_api
from ..models import load_model
from ..runtime.publish import DEFAULT_CHUNK, publish as publish_api
from ..artifact import trust as trust_api
from ..runtime.store import Store, parse_size

DTYPE_CHOICE = click.Choice(["float16", "bfloat16", "float32"])
EXIT_NOT_EXACT = 3
DEMO_PROMPT = "\n\nQuestion: Why should an agent load a published KV cache instead of running prefill?\nAnswer:"


class KvmlxGroup(click.Group):
    """Turns every `KvmlxError` into Click's one-line `Error: ...` and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KvmlxError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=KvmlxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmlx")
def main() -> None:
    """Publish a document's KV cache once; load it and continue token-exactly instead of prefilling."""


class _Progress:
    """A tqdm bar on stderr, shown only to a person at a terminal (never in --json or piped runs)."""

    def __init__(self, desc: str, quiet: bool, unit: str = "tok"):
        self.desc, self.unit, self.bar = desc, unit, None
        self.enabled = not quiet and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(desc: str, quiet: bool, unit: str = "tok") -> _Progress:
    """A progress callback `(done, total)` that is also a context manager closing its bar."""
    return _Progress(desc, quiet, unit)


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _stream_printer(lm, enabled: bool):
    """Print tokens as they arrive (plain text on stdout) unless output is JSON."""
    detok = lm.tokenizer.detokenizer

    def on_token(token: int) -> None:
        if enabled:
            detok.add_token(token)
            click.echo(detok.last_segment, nl=False)

    return on_token


@main.command()
@click.argument("document", type=click.File("r", encoding="utf-8"))
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def publish(document, out, to_store, store_dir, chat, system, model, dtype, chunk_size, encoding, sign_key, as_json) -> None:
    """Prefill DOCUMENT (a text file, or - for stdin) once and write its KV artifact (--out) or store it (--store)."""
    to_store = to_store or store_dir is not None
    if (out is None) != to_store:
        raise click.UsageError("give --out FILE or --store, not both" if out else "give --out FILE or --store")
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    key = trust_api.load_private_key(sign_key, _ask_passphrase) if sign_key else None  # fail before the prefill
    signing = {"sign": trust_api.signer(key)} if key else {}
    lm = load_model(model, dtype)
    text = document.read()
    payload = chat_prefix_tokens(lm, text, system) if chat else text
    stored = None
    with _progress("prefill", as_json) as progress:
        if to_store:
            stored = Store(store_dir).publish(lm, payload, chunk_size=chunk_size, encoding=encoding, progress=progress,
                                               **signing)
            result = stored.result  # None when the store already held these tokens: nothing was computed
        else:
            result = publish_api(lm, payload, out, chunk_size=chunk_size, encoding=encoding, progress=progress, **signing)
    if result is not None:
        summary = {
            "artifact": str(result.path), "model": lm.model_id, "dtype": lm.dtype, "tokens": result.num_tokens,
            "artifact_bytes": result.artifact_bytes, "kv_bytes": result.kv_bytes,
            "prefill_seconds": result.prefill_seconds, "write_seconds": result.write_seconds,
            "model_fingerprint": result.header["model"]["fingerprint"], "encoding": encoding,
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
    if as_json:
        _emit(summary)
    elif result is None:
        click.echo(f"already stored: {summary['tokens']} tokens of KV as {stored.key[:12]} ({summary['artifact']})")
    else:
        where = f"store entry {stored.key[:12]} ({result.path})" if stored else str(result.path)
        click.echo(f"published {result.num_tokens} tokens of KV ({result.artifact_bytes / 1e6:.1f} MB, {lm.dtype}) "
                   f"to {where} in {result.prefill_seconds:.2f} s prefill + {result.write_seconds:.2f} s write")


@main.command()
@click.argument("artifact", required=False, default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt", "-p", default=None,
              help="With ARTIFACT: text that continues the document (tokenized without special tokens). Without: the "
                   "whole prompt (tokenized as the model's tokenizer does); the stored KV sharing its longest prefix is reused.")
@click.option("--prompt-file", type=click.File("r", encoding="utf-8"), default=None, help="Read the prompt from a file.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="Without ARTIFACT: the store to reuse from (default: $KVMLX_HOME/store).")
@click.option("--chat-document", type=click.File("r", encoding="utf-8"), default=None,
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate(artifact, prompt, prompt_file, store_dir, chat_document, system, allow_lossy, model, dtype, max_tokens,
             verify, single_pass, no_verify_digests, require_exact, require_signed, as_json) -> None:
    """Continue a prompt greedily without re-running the prefill of a published document.

    With ARTIFACT, the prompt continues that artifact's document. Without, the prompt is complete and
    kvmlx reuses the stored artifact (see `kvmlx store`) sharing its longest token prefix, if any.
    """
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    text = prompt_file.read() if prompt_file is not None else (prompt or "")
    if artifact is None:
        if require_exact:
            raise click.UsageError("without ARTIFACT, reuse is exact unless --allow-lossy")
        _generate_from_store(text, store_dir, chat_document, system, allow_lossy, model, dtype, max_tokens, verify,
                             single_pass, no_verify_digests, as_json, require_signed)
        return
    if store_dir is not None or chat_document is not None or system is not None or allow_lossy:
        raise click.UsageError("--store, --chat-document, --system and --allow-lossy are for prompts without ARTIFACT")
    trust_list = trust_api.TrustList.load() if require_signed else None
    with Artifact(artifact) as art:  # the publisher is checked before the header names a model to load
        trust_api.check_signature(art, require_signed, trust_list)
        header = art.header
    lm = load_model(model or trust_api.model_spec_from_header(header), dtype or header["kv"]["dtype"])
    printer = _stream_printer(lm, not as_json)
    if verify:
        report = verify_api(artifact, lm, text, max_tokens=max_tokens, single_pass=single_pass, on_token=printer,
                            require_signed=require_signed, trust_list=trust_list)
        _finish_verification(lm, report, as_json)
        return
    gen, loaded = generate_api(artifact, lm, text, max_tokens=max_tokens, on_token=printer,
                               verify_digests=not no_verify_digests, require_exact=require_exact,
                               require_signed=require_signed, trust_list=trust_list)
    if as_json:
        _emit({
            "text": lm.tokenizer.decode(gen.tokens), "tokens": gen.tokens, "reused_tokens": gen.reused_tokens,
            "prefilled_tokens": gen.prefilled_tokens, "load_seconds": loaded.load_seconds,
            "reuse_first_token_seconds": gen.first_token_seconds, "total_seconds": gen.total_seconds,
            "load_path": loaded.load_path, "artifact_bytes": loaded.header["file_bytes"],
            "signature": loaded.signature.to_json() if loaded.signature else None,
        })
    else:
        click.echo()


def _generate_from_store(text, store_dir, chat_document, system, allow_lossy, model, dtype, max_tokens, verify,
                         single_pass, no_verify_digests, as_json, require_signed=False) -> None:
    """`generate` without ARTIFACT: the store finds the longest published prefix of the prompt."""
    if system is not None and chat_document is None:
        raise click.UsageError("--system needs --chat-document")
    lm = load_model(model, dtype)
    agent = Agent(lm, Store(store_dir), verify_digests=not no_verify_digests, allow_lossy=allow_lossy,
                  require_signed=require_signed, trust_list=trust_api.TrustList.load() if require_signed else None)
    tokens = chat_prompt_tokens(lm, chat_document.read(), text, system) if chat_document is not None else agent.encode(text)
    if not tokens:
        raise click.UsageError("the prompt is empty: give --prompt or --prompt-file")
    printer = _stream_printer(lm, not as_json)
    if verify:
        report = agent.verify(tokens, max_tokens=max_tokens, single_pass=single_pass, on_token=printer)
        _finish_verification(lm, report, as_json)
        return
    gen = agent.generate(tokens, max_tokens=max_tokens, on_token=printer)
    if as_json:
        _emit(gen.to_json())
        return
    click.echo()
    source = f"store entry {gen.key[:12]}" if gen.key else "the store (no match)"
    click.echo(f"reused {gen.reused_tokens} of {gen.prompt_tokens} prompt tokens from {source}; "
               f"prefilled {gen.prefilled_tokens}", err=True)


def _finish_verification(lm, report, as_json: bool, *, lead: str = "", extra: dict | None = None) -> None:
    """Print a verification's result (`extra` fields join the JSON; `lead` precedes the words) and
    exit with EXIT_NOT_EXACT when reuse diverged."""
    if as_json:
        _emit({**report.to_json(), **(extra or {}), "text": lm.tokenizer.decode(report.reuse.tokens)})
    else:
        click.echo()
        click.echo(lead + _verification_words(report))
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
    """Show ARTIFACT's header: what produced it, its geometry, tokens and tensors (validated, digests unchecked)."""
    h = read_header(artifact)
    if as_json:
        _emit(h)
        return
    m, kv, tensors = h["model"], h["kv"], h["tensors"]
    kv_bytes = sum(t["nbytes"] for t in tensors if t["name"].startswith("layers."))
    tokens = h["document"]["tokens"]
    preview = " ".join(map(str, tokens[:12])) + (" ..." if len(tokens) > 12 else "")
    rows = [
        ("format", f"kvmlx v{h['version']} ({h.get('created_by', '?')})"),
        ("model", f"{m['id']} ({m['model_type']})"),
        ("model fingerprint", m["fingerprint"]),
        ("tokenizer fingerprint", h["tokenizer"]["fingerprint"]),
        ("geometry", f"{m['num_layers']} layers x {m['num_kv_heads']} KV heads x head_dim {m['head_dim']}, layout {kv['layout']}"),
        ("rope", json.dumps(m["rope"], sort_keys=True)),
        ("kv", f"{kv['dtype']}, {kv['num_tokens']} tokens, prefill chunk {kv['chunk_size']}"),
        ("bytes", f"{h['file_bytes']} in the file, {kv_bytes} of KV ({h['file_bytes'] / max(kv_bytes, 1):.3f}x)"),
        ("tensors", f"{len(tensors)} ({h['digest']} digest each), 16 KiB-aligned"),
        ("tokens", preview),
    ]
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
    document = resources.files("kvmlx").joinpath("data/sample_document.txt").read_text(encoding="utf-8")
    say(f"1. loading {model} (built on first use, offline)")
    lm = load_model(model)
    with tempfile.TemporaryDirectory(prefix="kvmlx-demo-") as tmp:
        path = Path(out or Path(tmp) / "sample.kvmlx")
        with _progress("prefill", as_json) as progress:
            pub = publish_api(lm, document, path, progress=progress)
        say(f"2. published the sample document: {pub.num_tokens} tokens -> {path.name}, "
            f"{pub.artifact_bytes / 1e6:.2f} MB of {lm.dtype} KV, prefill {pub.prefill_seconds:.2f} s")
        say(f"3. generating from the artifact with the prompt {DEMO_PROMPT.strip()!r}:\n")
        report = verify_api(path, lm, DEMO_PROMPT, max_tokens=max_tokens, single_pass=True,
                            on_token=_stream_printer(lm, not as_json))
    _finish_verification(lm, report, as_json, lead="\n4. ", extra={
        "model": lm.model_id, "dtype": lm.dtype, "document_tokens": pub.num_tokens,
        "publish_prefill_seconds": pub.prefill_seconds})


@main.group("store")
@click.option("--dir", "store_dir", type=click.Path(file_okay=False), default=None,
              help="The store's directory (default: $KVMLX_HOME/store).")
@click.pass_context
def store_group(ctx, store_dir) -> None:
    """The local content-addressed store that `kvmlx generate` without ARTIFACT reuses from."""
    ctx.obj = store_dir


@store_group.command("add")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
@click.pass_obj
def store_add(store_dir, artifact, as_json) -> None:
    """Verify ARTIFACT (every tensor digest) and copy it into the store."""
    store = Store(store_dir)
    entry = store.get(store.add(artifact))
    if as_json:
        _emit(entry.to_json())
    else:
        click.echo(f"{entry.key}  {entry.num_tokens} tokens  {entry.file_bytes / 1e6:.1f} MB  {entry.model_id} {entry.dtype}")


@store_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def store_ls(store_dir, as_json) -> None:
    """List stored artifacts, most recently used first."""
    entries = Store(store_dir).ls()
    if as_json:
        _emit([e.to_json() for e in entries])
        return
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        click.echo(f"{e.key[:16]}  {e.num_tokens:>7} tok  {e.file_bytes / 1e6:>8.1f} MB  {e.dtype:<8} {e.encoding:<14} "
                   f"{used}  {e.model_id}")


@store_group.command("rm")
@click.argument("keys", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the removed entries as JSON.")
@click.pass_obj
def store_rm(store_dir, keys, as_json) -> None:
    """Remove entries by KEY (a full key, or a unique prefix of 4+ hex digits)."""
    store = Store(store_dir)
    removed = [store.rm(k) for k in keys]
    if as_json:
        _emit([e.to_json() for e in removed])
    else:
        for e in removed:
            click.echo(f"removed {e.key}")


@store_group.command("gc")
@click.option("--max-bytes", default=None, help="Evict least recently used entries until the artifacts total at most "
                                                 "this (bytes, or 500M, 2G, 1GiB).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def store_gc(store_dir, max_bytes, as_json) -> None:
    """Remove dead writers' temp files and quarantined files; with --max-bytes, evict LRU entries."""
    try:
        budget = None if max_bytes is None else parse_size(max_bytes)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-bytes") from None
    result = Store(store_dir).gc(budget)
    if as_json:
        _emit(result.to_json())
    else:
        click.echo(f"evicted {len(result.evicted)} entries ({result.freed_bytes / 1e6:.1f} MB); kept {result.kept} "
                   f"({result.kept_bytes / 1e6:.1f} MB); removed {result.temp_removed} temp and "
                   f"{result.quarantine_removed} quarantined files")


@store_group.command("reindex")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def store_reindex(store_dir, as_json) -> None:
    """Rebuild the prefix index from the stored files' headers."""
    result = Store(store_dir, sync=False).reindex()
    if as_json:
        _emit(result.to_json())
    else:
        click.echo(f"indexed {result.indexed} artifacts" + (f"; skipped {', '.join(result.skipped)}" if result.skipped else ""))


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
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True, writable=True), default=None,
              help="Parent of the temporary directory for artifacts (pick one on the disk you care about).  [default: the system's]")
@click.option("--chunk-size", default=DEFAULT_CHUNK, show_default=True, type=click.IntRange(1), help="Prefill chunk size, as in publish.")
@click.option("--no-cold", is_flag=True, help="Skip cold loads (files evicted from the page cache before each run).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (machine, config, roofline, results, targets).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write a PNG: time vs document length, log axes, the paper's M1 Pro figures for reference.")
def bench(model, dtype, lengths, runs, shape, compression, directory, chunk_size, no_cold, as_json, plot_path) -> None:
    """Time loading a published KV against prefill and mlx-lm's prompt cache, load included."""
    if shape and (model or dtype or compression):
        raise click.UsageError("--shape times the load path without a model: drop --model/--dtype/--compression")
    if compression:
        lm = load_model(model or "builtin:small", dtype)
        with _progress("encodings", as_json, unit="enc") as bar:
            result = bench_api.run_compression_bench(lm, max(lengths), runs=runs, directory=directory,
                                                     chunk_size=chunk_size, progress=bar)
        _emit(result) if as_json else click.echo(bench_api.format_compression_table(result))
        return
    with _progress("bench", as_json, unit="phase") as bar:
        options = dict(directory=directory, cold=not no_cold, chunk_size=chunk_size,
                       progress=lambda done, total, _phase: bar(done, total))
        if shape:
            result = bench_api.run_shape_bench(shape, lengths, runs, **options)
        else:
            result = bench_api.run_model_bench(load_model(model or "builtin:small", dtype), lengths, runs, **options)
    if plot_path is not None:
        result["plot"] = str(bench_api.plot(result, plot_path))
    if as_json:
        _emit(result)
    else:
        click.echo(bench_api.format_table(result))
        if plot_path is not None:
            click.echo(f"\nplot: {plot_path}")


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
        _emit(cost_api.report_dict(inputs, costs, sources, plot_path))
    else:
        click.echo(cost_api.format_table(inputs, costs, sources))
        if plot_path is not None:
            click.echo(f"\nplot: {plot_path}")


def _ask_passphrase() -> str:
    """The passphrase of an encrypted key: $KVMLX_KEY_PASSPHRASE, else a prompt (only at a terminal)."""
    if (env := os.environ.get(trust_api.PASSPHRASE_ENV)) is not None:
        return env
    if not sys.stdin.isatty():
        raise KvmlxError(f"the key is passphrase-protected; set ${trust_api.PASSPHRASE_ENV} (no terminal to ask on)")
    return click.prompt("key passphrase", hide_input=True, err=True)


@main.command()
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Private key file to write (default: keys/publisher.pem under $KVMLX_HOME or ~/.config/kvmlx).")
@click.option("--raw", is_flag=True, help="Write the raw 32-byte seed instead of PEM (cannot be encrypted).")
@click.option("--encrypt", is_flag=True, help="Protect the key with a passphrase ($KVMLX_KEY_PASSPHRASE, or asked twice).")
@click.option("--force", is_flag=True, help="Replace an existing key file (artifacts it signed stop being verifiable as yours).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def keygen(out, raw, encrypt, force, as_json) -> None:
    """Make an Ed25519 publisher key (file mode 0600) and print its public id for `kvmlx trust add`."""
    passphrase = None
    if encrypt:
        if raw:
            raise click.UsageError("--raw keys cannot be encrypted; drop --raw or --encrypt")
        passphrase = os.environ.get(trust_api.PASSPHRASE_ENV) or click.prompt(
            "new key passphrase", hide_input=True, confirmation_prompt=True, err=True)
    key = trust_api.generate_key()
    path = trust_api.write_private_key(key, out or trust_api.default_key_path(), encoding="raw" if raw else "pem",
                                       passphrase=passphrase, overwrite=force)
    key_id = trust_api.public_key_id(key)
    if as_json:
        _emit({"public_key": key_id, "key_file": str(path), "public_key_file": f"{path}.pub", "encrypted": bool(passphrase)})
    else:
        click.echo(key_id)
        click.echo(f"private key: {path} (mode 600{', passphrase-protected' if passphrase else ''}); public id also in {path}.pub",
                   err=True)


@main.group(cls=KvmlxGroup)
def trust() -> None:
    """Manage the publishers whose signed artifacts you accept (`generate --require-signed`, `verify`)."""


def _key_argument(value: str) -> str:
    """A public key id, or a file holding one (such as the .pub file `kvmlx keygen` writes)."""
    if not value.strip().startswith(trust_api.KEY_PREFIX) and Path(value).is_file():
        with open(value, encoding="utf-8", errors="replace") as f:
            return f.read(256).strip().split("\n")[0]
    return value


@trust.command("add")
@click.argument("pubkey")
@click.option("--name", "-n", default=None, help="A name for this publisher (default: the key's first characters).")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def trust_add(pubkey, name, as_json) -> None:
    """Trust PUBKEY (ed25519:..., or a .pub file) as a publisher."""
    entry = trust_api.TrustList.load().add(_key_argument(pubkey), name)
    if as_json:
        _emit(entry.to_json())
    else:
        click.echo(f"trusted {entry.key} as {entry.name!r}")


@trust.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the trust list as JSON.")
def trust_ls(as_json) -> None:
    """List trusted publishers."""
    trusted = trust_api.TrustList.load()
    if as_json:
        _emit({"path": str(trusted.path), **trusted.to_json()})
        return
    for e in trusted.entries:
        click.echo(f"{e.key}  {e.name}  (added {e.added})")
    if not trusted.entries:
        click.echo(f"no trusted publishers ({trusted.path})", err=True)


@trust.command("rm")
@click.argument("key_or_name")
@click.option("--json", "as_json", is_flag=True, help="Print the removed entry as JSON.")
def trust_rm(key_or_name, as_json) -> None:
    """Stop trusting a publisher, by key id or name."""
    entry = trust_api.TrustList.load().remove(_key_argument(key_or_name))
    if as_json:
        _emit(entry.to_json())
    else:
        click.echo(f"removed {entry.key} ({entry.name!r})")


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
def serve(model, dtype, store_dir, host, port, max_resident_bytes, min_reuse_tokens, allow_lossy, no_verify_digests) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions) that reuses published KV."""
    from ..serving.engine import serve as serve_api  # imported here: starlette and uvicorn only load for `serve`

    try:
        budget = parse_size(max_resident_bytes) if max_resident_bytes else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-resident-bytes")
    lm = load_model(model, dtype)
    serve_api(lm, Store(store_dir), host=host, port=port, max_resident_bytes=budget, min_reuse_tokens=min_reuse_tokens,
              verify_digests=not no_verify_digests, allow_lossy=allow_lossy,
              on_ready=lambda url: click.echo(f"kvmlx serve: {lm.model_id} at {url}", err=True))


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
        _emit(report.to_json())
    else:
        click.echo(report.describe())
    report.raise_if_failed()


# Distribution commands (kvmlx/distribute.py): serve-artifacts, fetch, token issue|report, push, pull.
from ..serving.artifacts import register_commands as _register_distribution  # noqa: E402

_register_distribution(main, _emit)
