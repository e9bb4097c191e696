"""`kvmlx store add|ls|rm|gc|reindex|verify|stats|purge`: the local content-addressed store and its
prefix cache.
"""

from __future__ import annotations

import sys
import time

import click

from ..runtime import prefix
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
    """List published artifacts, most recently used first, then what the prefix cache holds.

    (`--json`: the published entries; `kvmlx store stats --json` has the cache's figures.)"""
    store = Store(store_dir)
    entries = store.ls()
    if as_json:
        emit([e.to_json() for e in entries])
        return
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        click.echo(f"{e.key[:16]}  {e.num_tokens:>7} tok  {e.file_bytes / 1e6:>8.1f} MB  {e.dtype:<8} {e.encoding:<14} "
                   f"{used}  {e.model_id}")
    cached = prefix.summary(store.root)
    if cached["records"]:
        click.echo(f"cached (prefix cache, not published): {cached['tokens']} tokens in {cached['segments']} segments "
                   f"and {cached['snapshots']} snapshots, {cached['bytes'] / 1e6:.1f} MB on disk")


@store_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def store_stats(store_dir, as_json) -> None:
    """Published artifacts and the prefix cache's records, counted apart, with bytes on disk.

    (A server's memory tier is its own: see its /v1/kvmlx/stats.)"""
    store = Store(store_dir)
    entries = store.ls()
    out = {"published": {"entries": len(entries), "bytes": sum(e.file_bytes for e in entries),
                         "tokens": sum(e.num_tokens for e in entries)},
           "cached": {**prefix.summary(store.root), "tier": "disk"}}
    if as_json:
        emit(out)
        return
    p, c = out["published"], out["cached"]
    click.echo(f"published  {p['entries']:>6} artifacts  {p['tokens']:>9} tokens  {p['bytes'] / 1e6:>9.1f} MB")
    click.echo(f"cached     {c['records']:>6} records    {c['tokens']:>9} tokens  {c['bytes'] / 1e6:>9.1f} MB on disk "
               f"({c['segments']} segments, {c['snapshots']} snapshots)")


@store_group.command("purge")
@click.option("--cached", is_flag=True, required=True, help="Remove every prefix-cache record (published artifacts stay).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def store_purge(store_dir, cached, as_json) -> None:
    """Remove what the prefix cache kept (conversations' KV): `kvmlx store purge --cached`."""
    result = prefix.purge(Store(store_dir).root)
    if as_json:
        emit(result)
    else:
        click.echo(f"purged {result['records']} cached records ({result['bytes'] / 1e6:.1f} MB)")


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
@click.option("--cache-max-bytes", default=None, help="Evict least recently used prefix-cache records (leaves first) "
                                                       "until they total at most this.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def store_gc(store_dir, max_bytes, cache_max_bytes, as_json) -> None:
    """Remove dead writers' temp files and quarantined files; with --max-bytes, evict LRU entries.

    Published entries are evicted only here (or by `rm`); the prefix cache keeps to its own budget
    (--cache-max-bytes here, --cache-disk where it runs)."""
    budgets = {}
    for flag, value in (("--max-bytes", max_bytes), ("--cache-max-bytes", cache_max_bytes)):
        try:
            budgets[flag] = None if value is None else parse_size(value)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=flag) from None
    store = Store(store_dir)
    result = store.gc(budgets["--max-bytes"])
    cache = prefix.evict_to(store.root, budgets["--cache-max-bytes"] if cache_max_bytes is not None else 1 << 62)
    if as_json:
        emit({**result.to_json(), "cache": cache})
    else:
        if cache["evicted"] or cache["temp_removed"]:
            click.echo(f"prefix cache: evicted {cache['evicted']} records ({cache['freed_bytes'] / 1e6:.1f} MB), "
                       f"removed {cache['temp_removed']} temp files")
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
@click.option("--cached", is_flag=True, help="Scrub the prefix cache's records instead (every model).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per entry.")
@click.pass_obj
def store_verify(store_dir, keys, cached, as_json) -> None:
    """Scrub: re-hash every tensor of every entry (or of KEYS), quarantine bad ones, one line each.

    Good entries get their verified identity recorded, so loads in new processes hash nothing.
    Exits 1 when any entry was bad (and quarantined)."""
    store = Store(store_dir)
    if cached:
        if keys:
            raise click.UsageError("--cached scrubs every cached record: give no KEYS")
        result = prefix.verify(store.root)
        if as_json:
            emit(result)
        else:
            for b in result["bad"]:
                click.echo(f"BAD  cached {b['key'][:16]}  {b['reason']}; quarantined as {b['quarantined']}")
            click.echo(f"{result['ok']} cached records ok, {len(result['bad'])} bad", err=True)
        if result["bad"]:
            sys.exit(1)
        return

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
