"""The prefix cache's options, shared by `serve` and `generate`, and their checks."""

from __future__ import annotations

import click

from ..runtime.prefix import DEFAULT_BLOCK


def cache_options(ram: bool = False):
    """Click options for the prefix cache (`--cache-ram` only where a process lives long: `serve`)."""
    opts = [
        click.option("--no-cache", is_flag=True,
                     help="Do not keep or reuse computed prefixes (published KV is still reused)."),
        click.option("--cache-disk", default=None,
                     help="Disk budget of the prefix cache (e.g. 20G; default: 10% of free space, at most 64G)."),
        click.option("--cache-block", default=DEFAULT_BLOCK, show_default=True, type=click.IntRange(1),
                     help="Tokens per cache block (records never cross a multiple of it)."),
        click.option("--min-cache-tokens", default=None, type=click.IntRange(1),
                     help="Prompts shorter than this write nothing to the cache (default: one block)."),
    ]
    if ram:
        opts += [
            click.option("--cache-ram", default=None,
                         help="Memory budget of the prefix cache (e.g. 2G; default: 1/8 of physical memory)."),
            click.option("--no-persist", is_flag=True, help="Keep the prefix cache in memory only (lost at exit)."),
        ]

    def wrap(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return wrap


def _size(text, flag: str) -> int | None:
    if text is None:
        return None
    from ..runtime.store import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=flag) from None


def cache_from(lm, store, kv_quant, *, no_cache: bool, cache_disk=None, cache_block: int = DEFAULT_BLOCK,
               min_cache_tokens=None, cache_ram=None, no_persist: bool = False):
    """The prefix cache (a `PrefixCache`) these options ask for, or False with --no-cache (or where it cannot run)."""
    if no_cache:
        return False
    from ..runtime.prefix import PrefixCache, PrefixCacheError

    disk, ram = _size(cache_disk, "--cache-disk"), _size(cache_ram, "--cache-ram")
    if no_persist and cache_disk is not None:
        raise click.UsageError("--cache-disk has no use with --no-persist")
    try:
        return PrefixCache(lm, store.root, block=cache_block, ram_bytes=ram, disk_bytes=disk, persist=not no_persist,
                           min_tokens=min_cache_tokens, kv_quant=kv_quant)
    except PrefixCacheError as e:
        click.echo(f"kvmlx: {e}", err=True)
        return False
