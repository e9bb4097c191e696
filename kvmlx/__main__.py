"""`python -m kvmlx` runs the CLI."""

from .cli import run

run()
