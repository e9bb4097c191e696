"""`python -m kvmlx` runs the CLI."""

from .cli import main

main()
