"""Presentation pieces of a run folder: the ``report.json`` envelope, Markdown tables and PNG plots.

The run folder itself (``report.json`` with its typed ``model`` block, ``report.md``, the
model and its data) is :class:`edgekiln.models.run_folder.RunFolder`; docs/report-schema.md
lists the keys.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPORT_SCHEMA_VERSION = 2


def envelope(command: str) -> dict[str, Any]:
    """The keys every ``report.json`` starts with.

    >>> sorted(envelope("bench"))
    ['command', 'created', 'edgekiln_version', 'machine', 'schema_version']
    """
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "command": command,
        "edgekiln_version": version("edgekiln"),   # the installed distribution; the package root is the top layer
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
    }


def machine_summary() -> dict[str, Any]:
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats get 4 significant digits.

    >>> print(md_table(["a", "b"], [[1, 2.5]]))
    | a | b |
    |---|---|
    | 1 | 2.5 |
    """
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    from edgekiln.fileio import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def new_figure(width: float = 8.0, height: float = 4.0, *, nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    """``(figure, axes)`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height))
