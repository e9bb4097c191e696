"""The `kvmlx` command line: a thin layer of arguments and printing over the Python API.

`app.py` holds the root group and shared helpers; each other module registers one group of commands
on it when that command is first asked for (`main.lazy`: a command runs with only its own module's
imports; `all_commands()` registers them all).
"""

import importlib
import sys

from .app import EXIT_NOT_EXACT, main

WITHOUT_MLX_LM = {"trust"}  # command modules that never import mlx-lm (tests/test_cli_errors.py checks it)


def all_commands() -> dict:
    """Every command, registered (imports every command module)."""
    for module in sorted(set(main.lazy.values())):
        importlib.import_module(f"{__name__}.{module}")
    return dict(main.commands)


def run(argv: list[str] | None = None) -> None:
    """The `kvmlx` program (and `python -m kvmlx`): `main`, with mlx-lm imported first when the command
    uses it, here at the top of the call stack as `python -m mlx_lm` imports it. CPython 3.11 frees a
    16 KiB chunk of its frame stack whenever the frame at the chunk's start returns; imported from
    inside click and kvmlx's modules, the nested imports of mlx-lm and transformers cross such a
    boundary thousands of times (`kvmlx generate`: 3,700 mmap/munmap pairs and their page faults,
    ~40 ms); from here, about as often as under `python -m mlx_lm`."""
    args = sys.argv[1:] if argv is None else argv
    module = main.lazy.get(args[0]) if args else None
    if module is not None and module not in WITHOUT_MLX_LM:
        importlib.import_module("mlx_lm")
    main(args)


__all__ = ["EXIT_NOT_EXACT", "all_commands", "main", "run"]
