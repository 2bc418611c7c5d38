"""Runtimes behind one small protocol, in one explicit table.

Each adapter module defines ``NAME``, ``SUFFIXES`` (model files it runs), ``available() -> str |
None`` (None, or why it cannot run here) and ``load(model_path, threads, input_shapes) ->
Session``; a Session has ``input_names``, ``input_shapes``, ``input_dtypes``, ``output_names`` and
``run(feeds) -> list[np.ndarray]``. Adapters are imported only when used, so a missing optional
runtime costs nothing.

>>> sess = load_session("model.onnx", "openvino", input_shapes={"x": (1, 3, 32, 32)})   # doctest: +SKIP
>>> outputs = sess.run({"x": x})                                                          # doctest: +SKIP

:func:`device_providers` turns ``--device auto|cpu|<provider>`` into onnxruntime execution
providers, best first, among those installed here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekiln.errors import EdgekilnError

RUNTIMES: dict[str, str] = {
    "onnxruntime": "edgekiln.execution.runtimes.onnxruntime_rt",
    "openvino": "edgekiln.execution.runtimes.openvino_rt",
    "litert": "edgekiln.execution.runtimes.litert_rt",
    "null": "edgekiln.execution.runtimes.null_rt",
}
REAL = ("onnxruntime", "openvino", "litert")   # what "all" means (null is for tests)
InputShapes = Mapping[str, Sequence[int]]

CPU_PROVIDER = "CPUExecutionProvider"
#: ``--device`` names -> onnxruntime providers; ``auto`` tries the first five in this order, then the CPU.
DEVICES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "openvino": "OpenVINOExecutionProvider", "cpu": CPU_PROVIDER,
    "dml": "DmlExecutionProvider", "qnn": "QNNExecutionProvider", "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
              "CoreMLExecutionProvider", "OpenVINOExecutionProvider", CPU_PROVIDER)
NOT_DEVICES = ("AzureExecutionProvider",)   # a remote endpoint, not a unit of this machine


class Session(Protocol):
    input_names: list[str]
    input_shapes: list[list[int | None]]
    input_dtypes: list[Any]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def _module(name: str) -> Any:
    if name not in RUNTIMES:
        raise EdgekilnError(f"unknown runtime '{name}'; known: {', '.join(RUNTIMES)}")
    return importlib.import_module(RUNTIMES[name])


def available_runtimes() -> dict[str, str | None]:
    """Every real runtime mapped to None (usable) or the reason it is skipped."""
    return {name: _module(name).available() for name in REAL}


def runs_file(name: str, model_path: str | Path) -> bool:
    """Whether runtime ``name`` takes files like ``model_path`` (by suffix)."""
    return Path(model_path).suffix.lower() in _module(name).SUFFIXES


def skip_reason(name: str, model_path: str | Path, unavailable: dict[str, str | None] | None = None) -> str | None:
    """Why ``name`` cannot run ``model_path`` (not installed, or not its file type), or None.
    ``unavailable`` is :func:`available_runtimes`' answer when the caller already has it."""
    reason = (unavailable if unavailable is not None else available_runtimes()).get(name)
    if reason is None and not runs_file(name, model_path):
        reason = f"does not run {Path(model_path).suffix} files"
    return reason


def device_providers(device: str, available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime execution providers for ``device``, best first, ending with the CPU.

    ``auto``: the first present of TensorRT, CUDA, ROCm, CoreML and OpenVINO, then the CPU;
    ``cpu``: the CPU only; else a short name (``cuda``) or a provider name
    (``CUDAExecutionProvider``), which must be present (``available``, default
    ``onnxruntime.get_available_providers()``). Azure is never a device.

    >>> device_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"])
    ['CPUExecutionProvider']
    >>> device_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    key = str(device).strip()
    name = DEVICES.get(key.lower(), key)
    if name == CPU_PROVIDER:
        return [CPU_PROVIDER]
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    present = [p for p in available if p not in NOT_DEVICES]
    if key.lower() == "auto":
        return [p for p in AUTO_ORDER if p in present and p != CPU_PROVIDER] + [CPU_PROVIDER]
    if name not in present:
        short = {v: k for k, v in DEVICES.items()}
        listed = ", ".join(f"{short.get(p, p)} ({p})" for p in present) or "none"
        raise EdgekilnError(f"device '{device}' is not present here; present: {listed}; or use --device auto")
    return [name, CPU_PROVIDER]


def load_session(model_path: str | Path, runtime: str = "onnxruntime", *, threads: int = 1,
                 input_shapes: InputShapes | None = None, providers: Sequence[str] | None = None) -> Session:
    """Load ``model_path`` in ``runtime`` with ``threads`` intra-op threads. ``input_shapes``
    fixes dynamic dimensions (OpenVINO compiles for them; the session reports them). A model
    the runtime cannot load is one :class:`EdgekilnError` line with the runtime's reason.
    ``providers`` (onnxruntime only, see :func:`device_providers`) default to the CPU."""
    from edgekiln.execution.ort import error_line

    accel = providers is not None and list(providers) != [CPU_PROVIDER]
    if accel and runtime != "onnxruntime":
        raise EdgekilnError(f"execution providers {', '.join(providers or ())} apply to onnxruntime, not {runtime}")
    mod = _module(runtime)
    reason = mod.available()
    if reason:
        raise EdgekilnError(f"runtime '{runtime}' is not available: {reason}")
    if not runs_file(runtime, model_path):
        raise EdgekilnError(f"runtime '{runtime}' does not run {Path(model_path).suffix} files "
                            f"(it takes {', '.join(mod.SUFFIXES)})")
    if not Path(model_path).is_file():
        raise EdgekilnError(f"{model_path}: file not found")
    shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    try:
        session = (mod.load(model_path, threads, shapes or None, providers=tuple(providers or ())) if accel
                   else mod.load(model_path, threads, shapes or None))
    except EdgekilnError:
        raise
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own exception types
        raise EdgekilnError(f"{runtime} cannot load {Path(model_path).name}: {error_line(exc)}") from None
    unknown = sorted(set(shapes) - set(session.input_names))
    if unknown:
        raise EdgekilnError(f"--input-shape names {', '.join(unknown)}, but the model's inputs are "
                            f"{', '.join(session.input_names)}")
    return session


def fixed_shapes(declared: list[list[int | None]], names: list[str], shapes: InputShapes | None
                 ) -> list[list[int | None]]:
    """Declared input shapes with the given ``shapes`` in place of theirs (rank checked)."""
    out = []
    for name, dims in zip(names, declared, strict=True):
        given = (shapes or {}).get(name)
        if given is None:
            out.append(list(dims))
            continue
        if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims, given, strict=True)):
            raise EdgekilnError(f"input '{name}' is declared {['?' if d is None else d for d in dims]}; "
                                f"the given shape {list(given)} does not fit it")
        out.append([int(g) for g in given])
    return out


def runtime_version(name: str) -> str:
    """The installed version of runtime ``name`` ("not installed", or "-" for null)."""
    dist = {"onnxruntime": "onnxruntime", "openvino": "openvino", "litert": "ai-edge-litert"}.get(name)
    if not dist:
        return "-"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"
