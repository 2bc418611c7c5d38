"""onnxruntime (CPU) with explicit thread counts and sequential execution.

NOTE: the default session uses two spin-waiting threads at batch 1; every number here sets
``intra_op_num_threads`` and ``inter_op_num_threads`` explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NAME = "onnxruntime"
SUFFIXES = (".onnx",)
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def available() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime not installed ({exc})"
    return None


class OrtSession:
    def __init__(self, model_path: str | Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.options = so
        self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        ins = self.sess.get_inputs()
        self.input_names = [i.name for i in ins]
        self.input_shapes = [[d if isinstance(d, int) else None for d in i.shape] for i in ins]
        self.input_dtypes: list[Any] = [_DTYPES.get(i.type, np.float32) for i in ins]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, feeds)


def load(model_path: str | Path, threads: int = 1) -> OrtSession:
    return OrtSession(model_path, threads)
