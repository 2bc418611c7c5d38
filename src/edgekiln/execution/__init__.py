"""The bottom layer: every model edgekiln runs is run through here (runtime adapters behind one
``Session`` protocol, session options, intermediate tensors, the dtype table, feeds, timing).

Names are re-exported lazily: importing :mod:`edgekiln.execution` imports neither onnxruntime
nor OpenVINO.

>>> from edgekiln.execution import TensorSpec, random_feeds
>>> random_feeds([TensorSpec("x", (1, 2))])["x"].shape
(1, 2)
"""

from __future__ import annotations

import importlib
from typing import Any

from edgekiln.execution.specs import ONNX_ELEM_TYPES, ORT_TYPES, TensorSpec, numpy_dtype, onnx_elem_dtype

_LAZY = {
    "edgekiln.execution.runtimes": ("RUNTIMES", "REAL", "Session", "available_runtimes", "runs_file", "skip_reason",
                                    "runtime_version", "load_session", "device_providers"),
    "edgekiln.execution.chain": ("SegmentSpec", "ChainSession", "load_chain"),
    "edgekiln.execution.ort": ("ort_session", "run_with_intermediates", "intermediates_runner", "expose_tensors",
                               "lower_ir_version", "lower_for_ort", "readable_file", "max_ir_version", "max_opset_version",
                               "load_proto", "error_line"),
    "edgekiln.execution.feeds": ("random_feeds", "npz_feeds", "load_npz", "batch_rows", "calibration_feeds",
                                 "specs_from_session"),
    "edgekiln.execution.timing": ("latency_stats", "time_calls", "time_round_robin", "BenchResult", "benchmark",
                                  "compare", "model_size"),
    "edgekiln.execution.memory": ("rss_bytes", "peak_rss_bytes", "reset_peak"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["ONNX_ELEM_TYPES", "ORT_TYPES", "TensorSpec", "numpy_dtype", "onnx_elem_dtype", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'edgekiln.execution' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
