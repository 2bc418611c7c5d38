"""OpenVINO (CPU) on ONNX or OpenVINO IR models.

NOTE: on AMX CPUs OpenVINO silently runs bf16 even for an fp32 model; the honest fp32 number
needs ``INFERENCE_PRECISION_HINT='f32'``, which is set here (int8 layers of a quantized model
stay int8). Threads, streams and the latency hint are fixed as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NAME = "openvino"
SUFFIXES = (".onnx", ".xml")


def available() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'edgekiln[bench]')"
    return None


class OvSession:
    def __init__(self, model_path: str | Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(model_path))
        self.config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = core.compile_model(model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        ins = self.compiled.inputs
        self.input_names = [i.get_any_name() for i in ins]
        self.input_shapes = [[d.get_length() if d.is_static else None for d in i.get_partial_shape()] for i in ins]
        self.input_dtypes: list[Any] = [i.get_element_type().to_dtype() for i in ins]
        self.outputs = self.compiled.outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.asarray(result[o]) for o in self.outputs]


def load(model_path: str | Path, threads: int = 1) -> OvSession:
    return OvSession(model_path, threads)
