"""The check every model file passes before a command writes it into a run folder.

An ONNX file must pass ``onnx.checker`` with the full check (strict shape inference), then load
and run once (random inputs of the artifact's shapes) in onnxruntime and in every other runtime
the command's report gives a measurement for. A failure is one line naming the check, the node
at fault when the message names one, and the reason: a file that no runtime can run is never
written next to a report that looks complete. (``onnxruntime.transformers.float16`` once
produced fp16 models the checker refused; `quantize --scheme fp16` wrote them with exit 0.)

Non-ONNX artifacts (a generated C library, a ``.tflite`` file) are checked by the command that
makes them (``verify-c``, the TFLite ``--data`` check) and pass through here unchanged.

>>> node_in_message("[ShapeInferenceError] (op_type:Add, node name: add1): B has inconsistent type")
"'add1' (Add)"
>>> node_in_message("Nodes in a graph must be topologically sorted, however input 'c' of node: "
...                 "\\nname: /Unsqueeze OpType: Unsqueeze\\n is not output of any previous nodes.")
"'/Unsqueeze' (Unsqueeze)"
>>> reported_runtimes("quantize", {"latency_by_runtime": [{"runtime": "openvino", "p50": 1.0},
...                                                       {"runtime": "litert", "error": "x"}]})
('onnxruntime', 'openvino')
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.execution.specs import TensorSpec

ALWAYS = ("onnxruntime",)   # the reference runtime: edgekiln's metrics and parity checks run on it
# Where each command's report.json lists the runtimes it measured the written model on: the
# path of keys to a list of rows ``{"runtime": name, ...}``; a row with one of TIMED is a measurement
# (a row with a "file" timed another format of the model, e.g. quantize's LiteRT ``.tflite``).
RUNTIME_ROWS: dict[str, tuple[str, ...]] = {
    "quantize": ("latency_by_runtime",),
    "bench": ("results",),
    "optimize": ("selected", "runtimes"),
}
TIMED = ("p50", "p50_ms", "latency_ms")
_NODE_PATTERNS = (
    re.compile(r"\(op_type:(?P<op>[\w.]+), node name: (?P<name>[^)]*)\)"),      # onnx shape inference
    re.compile(r"name: (?P<name>\S+) OpType: (?P<op>[\w.]+)"),                    # onnx.checker
    re.compile(r"Node \((?P<name>[^)]*)\) Op \((?P<op>[\w.]+)\)"),                # onnxruntime at load
    re.compile(r"running (?P<op>[\w.]+) node\. Name:'(?P<name>[^']*)'"),          # onnxruntime at run
)
_passed: set[tuple[Any, ...]] = set()   # files already checked in this process (path, size, mtime, runtimes)


def reported_runtimes(command: str, measurements: Mapping[str, Any]) -> tuple[str, ...]:
    """The runtimes a ``command``'s measurements report for the model it writes, with onnxruntime."""
    rows: Any = measurements
    for key in RUNTIME_ROWS.get(command, ()):
        rows = rows.get(key) if isinstance(rows, Mapping) else None
    names = [r["runtime"] for r in rows or () if isinstance(r, Mapping) and isinstance(r.get("runtime"), str)
             and any(k in r for k in TIMED) and "file" not in r] if isinstance(rows, list) else []
    return tuple(dict.fromkeys([*ALWAYS, *names]))


def node_in_message(text: str) -> str | None:
    """``'name' (OpType)`` of the node an onnx or onnxruntime error message names, else None."""
    for pattern in _NODE_PATTERNS:
        found = pattern.search(text)
        if found:
            return f"'{found['name'].strip()}' ({found['op']})"
    return None


def check_model_file(path: str | Path, *, runtimes: Sequence[str] = ALWAYS, inputs: Sequence[TensorSpec] = (),
                     label: str = "") -> None:
    """Raise a one-line :class:`EdgekilnError` unless the ONNX file ``path`` passes the full
    ``onnx.checker`` check and loads and runs once in each of ``runtimes`` (those not installed
    here are skipped); ``inputs`` give the shapes of dynamic inputs. Other files pass unchecked.
    ``label`` starts the message (who was about to use the file).

    >>> check_model_file("model.onnx", label="quantize (nothing written)")          # doctest: +SKIP
    EdgekilnError: quantize (nothing written): model.onnx fails onnx.checker (full check) at node ...
    """
    path = Path(path)
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, tuple(runtimes),
           tuple((s.name, s.shape) for s in inputs))
    if key in _passed:
        return
    prefix = f"{label}: " if label else ""
    _full_check(path, prefix)
    for runtime in runtimes:
        _runs_once(path, runtime, inputs, prefix)
    _passed.add(key)


def _full_check(path: Path, prefix: str) -> None:
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
        # NOTE: with external data the checker is given the path: it reads the weights itself.
        external = any(uses_external_data(t) for t in model.graph.initializer)
        onnx.checker.check_model(str(path) if external else model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, InferenceError, DecodeError
        raise EdgekilnError(_message(prefix, path, "fails onnx.checker (full check)", str(exc))) from None


def _runs_once(path: Path, runtime: str, inputs: Sequence[TensorSpec], prefix: str) -> None:
    from edgekiln.execution.feeds import random_feeds, specs_from_session
    from edgekiln.execution.runtimes import load_session, skip_reason

    if skip_reason(runtime, path) is not None:
        return
    shapes = {s.name: s.shape for s in inputs}
    stage = "does not load"
    try:
        session = load_session(path, runtime, threads=1, input_shapes=shapes or None)
        specs = tuple(inputs) or specs_from_session(session)
        stage = "does not run"
        session.run(random_feeds(specs))
    except Exception as exc:  # noqa: BLE001 - every runtime raises its own exception types
        raise EdgekilnError(_message(prefix, path, f"{stage} in {runtime}", str(exc))) from None


def _message(prefix: str, path: Path, what: str, reason: str) -> str:
    from edgekiln.execution.ort import error_line

    node = node_in_message(reason)
    line = error_line(RuntimeError(reason), 240)
    where = f" at node {node}" if node else ""
    return f"{prefix}{path.name} {what}{where}: {line}"
