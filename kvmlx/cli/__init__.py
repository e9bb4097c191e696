"""The `kvmlx` command line: a thin layer of arguments and printing over the Python API."""

from .app import main  # noqa: F401
