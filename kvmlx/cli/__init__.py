"""The `kvmlx` command line: a thin layer of arguments and printing over the Python API.

`app.py` holds the root group and shared helpers; each other module registers one group of commands.
"""

from . import artifact, distribute, interop, measure, serve, store, trust  # noqa: F401  (registers the commands)
from .app import EXIT_NOT_EXACT, main

__all__ = ["EXIT_NOT_EXACT", "main"]
