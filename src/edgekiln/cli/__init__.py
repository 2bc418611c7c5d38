"""Command-line interface; see :mod:`edgekiln.cli.app`."""

from edgekiln.cli.app import app, main

__all__ = ["app", "main"]
