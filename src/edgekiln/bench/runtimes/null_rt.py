"""A runtime that does no work: zeros of the declared output shapes. Lets the harness and the
CLI be tested with no real inference cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAME = "null"
SUFFIXES = (".onnx",)


def available() -> str | None:
    return None


class NullSession:
    def __init__(self, model_path: str | Path, threads: int) -> None:
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        ins = [i for i in model.graph.input if i.name not in inits]
        self.input_names = [i.name for i in ins]
        self.input_shapes = [[d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                             for i in ins]
        self.input_dtypes = [np.float32 for _ in ins]
        self.out_shapes = [[d.dim_value or 1 for d in o.type.tensor_type.shape.dim] for o in model.graph.output]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros(s, np.float32) for s in self.out_shapes]


def load(model_path: str | Path, threads: int = 1) -> NullSession:
    return NullSession(model_path, threads)
