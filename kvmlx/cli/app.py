"""The `kvmlx` root command group and what every command shares: one-line errors, JSON output,
progress bars, streaming text, the passphrase prompt.

Under a distributed launcher (`mlx.launch -n N kvmlx ...`) every rank runs the same command on its
shard of the model; rank 0 alone prints (text or --json), and errors name the rank that raised them.

Exit codes: 0 success; 1 a kvmlx error (bad, mismatched or unreadable artifact or model: one line on
stderr); 2 a usage error (Click's); 3 `--verify`/`demo` ran but reuse was not token-exact.
The commands live beside this module, one module per command group, and register on `main`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

import click

from .. import __version__
from ..artifact import trust as trust_api
from ..errors import KvmlxError

DTYPE_CHOICE = click.Choice(["float16", "bfloat16", "float32"])
EXIT_NOT_EXACT = 3


DEBUG_ENV = "KVMLX_DEBUG"  # set to 1 to see the traceback of an unexpected error


class KvmlxGroup(click.Group):
    """Turns every error into Click's one-line `Error: ...` and exit code 1: a `KvmlxError` as it is,
    a file-system error as `PATH: reason`, anything unexpected as one line naming its type (with
    $KVMLX_DEBUG=1 the traceback is shown instead). A user never sees a Python traceback."""

    lazy: dict[str, str] = {}  # command name -> the module (beside this one) that registers it

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str):
        """A command's module is imported when the command is asked for: `kvmlx generate` does not
        import the server, the benchmarks or the distribution code."""
        if name not in self.commands and name in self.lazy:
            importlib.import_module(f"{__package__}.{self.lazy[name]}")
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, never a traceback
            if isinstance(e, KvmlxError):
                raise click.ClickException(_ranked(one_line(str(e)))) from None
            if _RANK and isinstance(e, RuntimeError):  # under a launcher, MLX's backend failing on a lost rank
                from ..runtime.distributed import lost_peer

                if (lost := lost_peer(e)) is not None:
                    raise click.ClickException(_ranked(lost)) from None
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(_ranked(describe_error(e))) from None


def _ranked(message: str) -> str:
    """Under mlx.launch every rank prints its own errors: say whose this is."""
    return f"rank {_RANK[0]}: {message}" if _RANK else message


def one_line(text: str) -> str:
    """The first line of a message (errors are printed on exactly one line)."""
    return (text.strip().splitlines() or [""])[0]


def describe_error(e: BaseException) -> str:
    """One line for an error kvmlx did not raise on purpose: file-system errors name the path and the
    reason; anything else names its type and says how to see the traceback."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        return f"{where}: {e.strerror}" if where else e.strerror
    if isinstance(e, UnicodeDecodeError):
        return f"input is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
    if isinstance(e, (ValueError, TypeError)) and str(e):
        return one_line(str(e))
    return f"unexpected {type(e).__name__}: {one_line(str(e))} (set {DEBUG_ENV}=1 to see the traceback)"


def read_text(path: str, what: str = "file", *, allow_empty: bool = False) -> str:
    """The UTF-8 text of `path` (`-`: standard input), refusing with one line what is not: a directory,
    an unreadable file, bytes that are not UTF-8, and (unless `allow_empty`) an empty file."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except IsADirectoryError:
        raise KvmlxError(f"{name}: is a directory, expected a {what}") from None
    except OSError as e:
        raise KvmlxError(f"{name}: cannot read the {what} ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvmlxError(f"{name}: the {what} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
    if not allow_empty and not text.strip():
        raise KvmlxError(f"{name}: the {what} is empty")
    return text


def check_output_path(path: str, what: str = "output file") -> None:
    """Refuse, before any work, an output path whose directory is missing, not a directory or not
    writable, or that names a directory (so a long prefill never ends in a failed write)."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise KvmlxError(f"{path}: is a directory, expected a {what} path")
    if not os.path.exists(parent):
        raise KvmlxError(f"{path}: directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise KvmlxError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KvmlxError(f"{path}: directory {parent} is not writable")


@click.group(cls=KvmlxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmlx")
def main() -> None:
    """Publish a document's KV cache once; load it and continue token-exactly instead of prefilling."""
    _join_launcher()


main.lazy = {  # every command, by the module that registers it (tests/test_cli_errors.py checks it is complete)
    **dict.fromkeys(("publish", "generate", "inspect", "demo", "verify"), "artifact"),
    **dict.fromkeys(("serve-artifacts", "fetch", "token", "push", "pull"), "distribute"),
    **dict.fromkeys(("export", "import"), "interop"),
    **dict.fromkeys(("bench", "cost"), "measure"),
    "serve": "serve", "store": "store", **dict.fromkeys(("keygen", "trust"), "trust"),
}


_RANK: list[int] = []  # [this rank] when running under a distributed launcher


def _join_launcher() -> None:
    """Under `mlx.launch`: join the group, quiet every rank's stdout but rank 0's, and turn the
    launcher's SIGTERM (sent to all ranks when one fails) into a one-line error."""
    from ..models import distributed_group

    group = distributed_group()
    if group is None:
        return
    from ..runtime.distributed import install_launcher_handlers  # (imports mlx-lm: only under a launcher)

    _RANK[:] = [group.rank()]
    install_launcher_handlers()
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


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
            from tqdm import tqdm  # only at a terminal: importing it costs ~7 MB and ~40 ms on every command

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class Timings:
    """Where a command spends its time, for `--json`'s `timings` (seconds): `import` (kvmlx and what it
    imports, from its first line to the command starting; the interpreter's own start-up is not in
    it), then each phase the command marks (`with timings("model_load"): ...`) or sets."""

    def __init__(self):
        from .. import IMPORT_STARTED

        self.started = time.perf_counter()
        self.values: dict[str, float] = {"import": self.started - IMPORT_STARTED}

    def __call__(self, phase: str):
        timings = self

        class _Phase:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timings.values[phase] = timings.values.get(phase, 0.0) + time.perf_counter() - self.t

        return _Phase()

    def to_json(self) -> dict:
        return {**self.values, "command": time.perf_counter() - self.started}


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def stream_printer(lm, enabled: bool):
    """Print tokens as they arrive (plain text on stdout) unless output is JSON; like `mlx_lm.generate`,
    the text stops at the first end-of-sequence token, whose marker is not printed."""
    detok = lm.tokenizer.detokenizer
    detok.reset()
    eos = set(lm.tokenizer.eos_token_ids)
    ended = False

    def on_token(token: int) -> None:
        nonlocal ended
        if not enabled or ended:
            return
        if token in eos:
            ended = True
            detok.finalize()
        else:
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
