"""Run folders: ``report.json`` (machine-readable), ``report.md`` (readable) and PNG plots.

Every command that produces artifacts calls :func:`write_report` once at the end. The JSON
carries a small envelope (schema version, command, edgekiln version, creation time) around the
command's own keys; docs/report-schema.md lists the keys per command.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edgekiln import __version__
from edgekiln.fileio import atomic_write_json, atomic_write_text

REPORT_SCHEMA_VERSION = 1


def write_report(run_dir: str | Path, *, command: str, data: dict[str, Any], markdown: str) -> Path:
    """Write ``report.json`` and ``report.md`` into ``run_dir``; return the JSON path.

    ``data`` holds the command's own keys; the envelope keys are added around it and never
    overwrite a key the command set.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    envelope = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "command": command,
        "edgekiln_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
    }
    out = {**envelope, **data}
    atomic_write_text(run_dir / "report.md", markdown.rstrip() + "\n")
    return atomic_write_json(run_dir / "report.json", out)


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
