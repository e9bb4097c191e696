"""`kvmlx store add|ls|rm|gc|reindex|verify`: the local content-addressed store.
"""

from __future__ import annotations

import sys
import time

import click

from ..runtime.store import Store, parse_size
from .app import emit, main


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
        emit(entry.to_json())
    else:
        click.echo(f"{entry.key}  {entry.num_tokens} tokens  {entry.file_bytes / 1e6:.1f} MB  {entry.model_id} {entry.dtype}")


@store_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def store_ls(store_dir, as_json) -> None:
    """List stored artifacts, most recently used first."""
    entries = Store(store_dir).ls()
    if as_json:
        emit([e.to_json() for e in entries])
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
        emit([e.to_json() for e in removed])
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
        emit(result.to_json())
    else:
        click.echo(f"evicted {len(result.evicted)} entries ({result.freed_bytes / 1e6:.1f} MB); kept {result.kept} "
                   f"({result.kept_bytes / 1e6:.1f} MB); removed {result.temp_removed} temp and "
                   f"{result.quarantine_removed} quarantined files"
                   + (f", and {result.parts_removed} orphaned parallel parts" if result.parts_removed else ""))


@store_group.command("reindex")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def store_reindex(store_dir, as_json) -> None:
    """Rebuild the prefix index from the stored files' headers."""
    result = Store(store_dir, sync=False).reindex()
    if as_json:
        emit(result.to_json())
    else:
        click.echo(f"indexed {result.indexed} artifacts" + (f"; skipped {', '.join(result.skipped)}" if result.skipped else ""))


@store_group.command("verify")
@click.argument("keys", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per entry.")
@click.pass_obj
def store_verify(store_dir, keys, as_json) -> None:
    """Scrub: re-hash every tensor of every entry (or of KEYS), quarantine bad ones, one line each.

    Good entries get their verified identity recorded, so loads in new processes hash nothing.
    Exits 1 when any entry was bad (and quarantined)."""
    store = Store(store_dir)

    def line(r) -> None:
        if as_json:
            return
        if r.ok:
            click.echo(f"ok   {r.key[:16]}  {r.file_bytes / 1e6:8.1f} MB  {r.file_bytes / 1e9 / max(r.seconds, 1e-9):5.2f} GB/s")
        else:
            click.echo(f"BAD  {r.key[:16]}  {r.reason}; quarantined as {r.quarantined or '(file already gone)'}")

    results = store.verify(keys, on_result=line)
    bad = [r for r in results if not r.ok]
    if as_json:
        emit([r.to_json() for r in results])
    else:
        click.echo(f"{len(results) - len(bad)} ok, {len(bad)} bad" + (" (quarantined)" if bad else ""), err=True)
    if bad:
        sys.exit(1)
