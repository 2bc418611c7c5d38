"""A runtime that does no work: zeros of the declared output shapes. Lets the timing code and
the CLI be tested with no real inference cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgekiln.execution.runtimes import fixed_shapes
from edgekiln.execution.specs import onnx_elem_dtype

NAME = "null"
SUFFIXES = (".onnx",)


def available() -> str | None:
    return None


class NullSession:
    def __init__(self, model_path: str | Path, threads: int,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        ins = [i for i in model.graph.input if i.name not in inits]
        self.input_names = [i.name for i in ins]
        declared = [[d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                     for d in i.type.tensor_type.shape.dim] for i in ins]
        self.input_shapes = fixed_shapes(declared, self.input_names, input_shapes)
        self.input_dtypes = [onnx_elem_dtype(i.type.tensor_type.elem_type) for i in ins]
        self.output_names = [o.name for o in model.graph.output]
        self.out_shapes = [[d.dim_value or 1 for d in o.type.tensor_type.shape.dim] for o in model.graph.output]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros(s, np.float32) for s in self.out_shapes]


def load(model_path: str | Path, threads: int = 1,
         input_shapes: Mapping[str, Sequence[int]] | None = None) -> NullSession:
    return NullSession(model_path, threads, input_shapes)
