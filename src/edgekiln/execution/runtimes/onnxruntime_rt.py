"""onnxruntime (CPU) with explicit thread counts and sequential execution.

NOTE: the default session uses two spin-waiting threads at batch 1; every session here sets
``intra_op_num_threads`` and ``inter_op_num_threads`` explicitly (see :func:`ort_session`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.execution.ort import ort_session
from edgekiln.execution.runtimes import fixed_shapes
from edgekiln.execution.specs import numpy_dtype

NAME = "onnxruntime"
SUFFIXES = (".onnx",)


def available() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime not installed ({exc})"
    return None


class OrtSession:
    def __init__(self, model_path: str | Path, threads: int,
                 input_shapes: Mapping[str, Sequence[int]] | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.sess = ort_session(Path(model_path), threads=threads, providers=tuple(providers))
        self.options = self.sess.get_session_options()
        ins = self.sess.get_inputs()
        self.input_names = [i.name for i in ins]
        declared = [[d if isinstance(d, int) and d >= 0 else None for d in i.shape] for i in ins]
        self.input_shapes = fixed_shapes(declared, self.input_names, input_shapes)
        self.input_dtypes: list[Any] = [numpy_dtype(i.type) for i in ins]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, feeds)


def load(model_path: str | Path, threads: int = 1,
         input_shapes: Mapping[str, Sequence[int]] | None = None,
         providers: Sequence[str] = ("CPUExecutionProvider",)) -> OrtSession:
    return OrtSession(model_path, threads, input_shapes, providers)
