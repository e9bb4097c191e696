"""The `kvmlx` root command group and what every command shares: one-line errors, JSON output,
progress bars, streaming text, the passphrase prompt.

Exit codes: 0 success; 1 a kvmlx error (bad, mismatched or unreadable artifact or model: one line on
stderr); 2 a usage error (Click's); 3 `--verify`/`demo` ran but reuse was not token-exact.
The commands live beside this module, one module per command group, and register on `main`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from tqdm import tqdm

from .. import __version__
from ..artifact import trust as trust_api
from ..errors import KvmlxError

DTYPE_CHOICE = click.Choice(["float16", "bfloat16", "float32"])
EXIT_NOT_EXACT = 3


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


class Progress:
    """A progress callback `(done, total)`: a tqdm bar on stderr, shown only to a person at a terminal
    (never in --json or piped runs); a context manager that closes its bar."""

    def __init__(self, desc: str, quiet: bool, unit: str = "tok"):
        self.desc, self.unit, self.bar = desc, unit, None
        self.enabled = not quiet and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def stream_printer(lm, enabled: bool):
    """Print tokens as they arrive (plain text on stdout) unless output is JSON."""
    detok = lm.tokenizer.detokenizer

    def on_token(token: int) -> None:
        if enabled:
            detok.add_token(token)
            click.echo(detok.last_segment, nl=False)

    return on_token


def ask_passphrase() -> str:
    """The passphrase of an encrypted key: $KVMLX_KEY_PASSPHRASE, else a prompt (only at a terminal)."""
    if (env := os.environ.get(trust_api.PASSPHRASE_ENV)) is not None:
        return env
    if not sys.stdin.isatty():
        raise KvmlxError(f"the key is passphrase-protected; set ${trust_api.PASSPHRASE_ENV} (no terminal to ask on)")
    return click.prompt("key passphrase", hide_input=True, err=True)


def kv_quant_options(f):
    """`--kv-bits`, `--kv-group-size`, `--quantized-kv-start`: mlx-lm's KV quantization settings."""
    f = click.option("--quantized-kv-start", type=click.IntRange(0), default=None,
                     help="With --kv-bits: quantize once a cache holds this many tokens (mlx-lm's default 5000).")(f)
    f = click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default=None,
                     help="With --kv-bits: quantization group size (default 64).")(f)
    return click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
                        help="Quantize the KV cache as mlx_lm.generate --kv-bits does (exact against the same settings).")(f)


def kv_quant_from(kv_bits, kv_group_size, quantized_kv_start):
    """The `KVQuantization` the three options describe (None without --kv-bits)."""
    from ..caches import KVQuantization
    from ..caches.quantized import DEFAULT_GROUP_SIZE, DEFAULT_START

    if kv_bits is None:
        if kv_group_size is not None or quantized_kv_start is not None:
            raise click.UsageError("--kv-group-size and --quantized-kv-start need --kv-bits")
        return None
    return KVQuantization(int(kv_bits), int(kv_group_size or DEFAULT_GROUP_SIZE),
                          DEFAULT_START if quantized_kv_start is None else quantized_kv_start)
