"""The `kvmlx` command line: a thin layer of arguments and printing over the Python API.

`app.py` holds the root group and shared helpers; each other module registers one group of commands
on it when that command is first asked for (`main.lazy`: a command runs with only its own module's
imports; `all_commands()` registers them all).
"""

import importlib

from .app import EXIT_NOT_EXACT, main


def all_commands() -> dict:
    """Every command, registered (imports every command module)."""
    for module in sorted(set(main.lazy.values())):
        importlib.import_module(f"{__name__}.{module}")
    return dict(main.commands)


__all__ = ["EXIT_NOT_EXACT", "all_commands", "main"]
