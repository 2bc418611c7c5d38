"""OpenVINO (CPU) on ONNX or OpenVINO IR models.

NOTE: on AMX CPUs OpenVINO silently runs bf16 even for an fp32 model; the honest fp32 number
needs ``INFERENCE_PRECISION_HINT='f32'``, which is set here (int8 layers of a quantized model
stay int8). Threads, streams and the latency hint are fixed as well. Dynamic input dimensions
are fixed with ``input_shapes`` before compiling (OpenVINO compiles for one shape at a time).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.execution.ort import error_line
from edgekiln.execution.runtimes import fixed_shapes

NAME = "openvino"
SUFFIXES = (".onnx", ".xml")


def available() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'edgekiln[bench]')"
    return None


class OvSession:
    def __init__(self, model_path: str | Path, threads: int,
                 input_shapes: Mapping[str, Sequence[int]] | None = None,
                 extra_config: Mapping[str, Any] | None = None) -> None:
        import openvino as ov

        name = Path(model_path).name
        core = ov.Core()
        try:
            model = core.read_model(str(model_path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with a multi-line trace
            raise EdgekilnError(f"openvino cannot read {name}: {error_line(exc)}") from None
        names = [_port_name(i, input_shapes) for i in model.inputs]
        declared = [[d.get_length() if d.is_static else None for d in i.get_partial_shape()] for i in model.inputs]
        unknown = sorted(set(input_shapes or {}) - set(names))
        if unknown:
            raise EdgekilnError(f"--input-shape names {', '.join(unknown)}, but the model's inputs are "
                                f"{', '.join(names)}")
        shapes = fixed_shapes(declared, names, input_shapes)
        if input_shapes:
            model.reshape({n: ov.PartialShape(s) for n, s in zip(names, shapes, strict=True) if n in input_shapes})
        self.config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_PRECISION_HINT": "f32", **(extra_config or {})}
        try:
            self.compiled = core.compile_model(model, "CPU", self.config)
        except Exception as exc:  # noqa: BLE001
            raise EdgekilnError(f"openvino cannot compile {name}: {error_line(exc)}") from None
        self.request = self.compiled.create_infer_request()
        ins = self.compiled.inputs
        self.input_names = [_port_name(i, input_shapes) for i in ins]
        self.input_shapes = [[d.get_length() if d.is_static else None for d in i.get_partial_shape()] for i in ins]
        self.input_dtypes: list[Any] = [i.get_element_type().to_dtype() for i in ins]
        self.outputs = self.compiled.outputs
        self.output_names = [o.get_any_name() for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # NOTE: shared buffers skip OpenVINO's copy of every input and output (33.7 -> 22.6 us per
        # call on a tiny model, 90 -> 79 us on a 512 KB one, measured here); a shared output is the
        # request's own buffer, which the next infer overwrites, so the outputs are copied.
        result = self.request.infer(feeds, share_inputs=True, share_outputs=True)
        return [np.array(result[o], copy=True) for o in self.outputs]


_GENERATED = re.compile(r"graph_input_cast_\d+$")


def _port_name(port: Any, wanted: Mapping[str, Sequence[int]] | None) -> str:
    """The port's name the caller uses. NOTE: OpenVINO merges the names of tensors it fuses, and
    ``get_any_name`` returns the first in order: an fp16 model's input 'input' (read by a Cast
    to float16) comes back as 'graph_input_cast_0', so the ONNX name given is preferred."""
    names = sorted(port.get_names())
    given = [n for n in names if n in (wanted or {})]
    # NOTE: without a given shape, prefer the ONNX input's own name over the Cast's generated one
    own = [n for n in names if not _GENERATED.match(n)]
    return (given or own or [port.get_any_name()])[0]


def load(model_path: str | Path, threads: int = 1,
         input_shapes: Mapping[str, Sequence[int]] | None = None) -> OvSession:
    return OvSession(model_path, threads, input_shapes)
