"""Benchmark runtimes behind one small protocol, in one explicit table.

Each adapter module defines ``NAME``, ``SUFFIXES`` (model files it runs), ``available() -> str |
None`` (None, or why it cannot run here) and ``load(model_path, threads) -> Session``; a Session
has ``input_names``, ``input_shapes``, ``input_dtypes`` and ``run(feeds) -> list[np.ndarray]``.
Adapters are imported only when used, so a missing optional runtime costs nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekiln.errors import EdgekilnError

RUNTIMES: dict[str, str] = {
    "onnxruntime": "edgekiln.bench.runtimes.onnxruntime_rt",
    "openvino": "edgekiln.bench.runtimes.openvino_rt",
    "litert": "edgekiln.bench.runtimes.litert_rt",
    "null": "edgekiln.bench.runtimes.null_rt",
}
REAL = ("onnxruntime", "openvino", "litert")   # what "all" means (null is for tests)


class Session(Protocol):
    input_names: list[str]
    input_shapes: list[list[int | None]]
    input_dtypes: list[Any]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def _module(name: str) -> Any:
    if name not in RUNTIMES:
        raise EdgekilnError(f"unknown runtime '{name}'; known: {', '.join(RUNTIMES)}")
    return importlib.import_module(RUNTIMES[name])


def available_runtimes() -> dict[str, str | None]:
    """Every real runtime mapped to None (usable) or the reason it is skipped."""
    return {name: _module(name).available() for name in REAL}


def runs_file(name: str, model_path: str | Path) -> bool:
    return Path(model_path).suffix.lower() in _module(name).SUFFIXES


def skip_reason(name: str, model_path: str | Path, unavailable: dict[str, str | None] | None = None) -> str | None:
    """Why ``name`` cannot run ``model_path`` (not installed, or not its file type), or None.
    ``unavailable`` is :func:`available_runtimes`' answer when the caller already has it."""
    reason = (unavailable if unavailable is not None else available_runtimes()).get(name)
    if reason is None and not runs_file(name, model_path):
        reason = f"does not run {Path(model_path).suffix} files"
    return reason


def load_session(model_path: str | Path, runtime: str = "onnxruntime", *, threads: int = 1) -> Session:
    """Load ``model_path`` in ``runtime`` with ``threads`` intra-op threads."""
    mod = _module(runtime)
    reason = mod.available()
    if reason:
        raise EdgekilnError(f"runtime '{runtime}' is not available: {reason}")
    if not runs_file(runtime, model_path):
        raise EdgekilnError(f"runtime '{runtime}' does not run {Path(model_path).suffix} files "
                            f"(it takes {', '.join(mod.SUFFIXES)})")
    return mod.load(model_path, threads)


def version(name: str) -> str:
    dist = {"onnxruntime": "onnxruntime", "openvino": "openvino", "litert": "ai-edge-litert"}.get(name)
    if not dist:
        return "-"
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(dist)
    except PackageNotFoundError:
        return "not installed"
