"""The CLI run in-process, as the integration tests drive it: ``run_cli(argv)`` is the exit code
``edgekiln ARGV...`` would give (0 when the command returns normally)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgekiln.cli.app import main


def run_cli(argv: Sequence[Any]) -> int:
    """Run ``edgekiln`` with ``argv`` (paths and numbers are turned into strings); its exit code."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:   # NOTE: as the interpreter exits: None is 0, a message is 1
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0
