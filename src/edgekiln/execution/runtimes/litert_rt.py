"""Benchmark runtime adapter: ``.tflite`` models through LiteRT (``ai-edge-litert``).

Feeds may be given either in the ``.tflite``'s own dtype and layout (e.g. int8 NHWC), which are
passed through untouched, or as float32 in ONNX layout (NCHW), which are transposed to NHWC and
quantized with the input tensor's scale and zero point (LiteRT int8 models take int8 inputs).
Quantizing costs a few microseconds per call; benchmark with pre-quantized feeds to exclude it.

>>> sess = load("model.tflite", threads=1)            # doctest: +SKIP
>>> out = sess.run({sess.input_names[0]: x})           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

NAME = "litert"
SUFFIXES = (".tflite",)


def available() -> str | None:
    """``None`` when LiteRT can be imported, otherwise the reason it cannot."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError as exc:
        return f"ai-edge-litert not installed ({exc}); pip install ai-edge-litert"
    return None


class LiteRTSession:
    """One LiteRT interpreter with tensors allocated once; ``run`` never reallocates."""

    def __init__(self, model_path: str | Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        path = Path(model_path)
        if path.suffix not in SUFFIXES:
            raise EdgekilnError(f"{path}: the litert runtime runs .tflite files")
        self.model_path = path
        self._it = Interpreter(model_path=str(path), num_threads=int(threads))
        self._it.allocate_tensors()
        self._in = self._it.get_input_details()
        self._out = self._it.get_output_details()
        self.input_names = [d["name"] for d in self._in]
        self.input_shapes = [tuple(int(s) for s in d["shape"]) for d in self._in]
        self.input_dtypes = [np.dtype(d["dtype"]) for d in self._in]
        self.output_names = [d["name"] for d in self._out]

    @property
    def input_details(self) -> list[dict[str, Any]]:
        """LiteRT's details of each input: ``name``, ``shape`` (NHWC), ``dtype``, ``quantization``."""
        return self._in

    @property
    def output_details(self) -> list[dict[str, Any]]:
        return self._out

    def _prepare(self, x: np.ndarray, det: dict[str, Any]) -> np.ndarray:
        shape, dtype = tuple(int(s) for s in det["shape"]), np.dtype(det["dtype"])
        if x.dtype == dtype and x.shape == shape:
            return x  # already in the model's own dtype and layout
        if x.ndim == 4:  # float feeds are ONNX layout (NCHW), always
            x = x.transpose(0, 2, 3, 1)
        if x.shape != shape:
            raise EdgekilnError(f"feed shape {x.shape} does not match {det['name']!r} {shape} (batch is fixed)")
        if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
            scale, zp = det["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.rint(x / scale) + zp, info.min, info.max)
        return np.ascontiguousarray(x, dtype=dtype)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; outputs come back in the model's own dtype and layout."""
        for det in self._in:
            if det["name"] not in feeds:
                raise EdgekilnError(f"missing feed {det['name']!r}; inputs are {self.input_names}")
            self._it.set_tensor(det["index"], self._prepare(np.asarray(feeds[det["name"]]), det))
        self._it.invoke()
        return [self._it.get_tensor(d["index"]) for d in self._out]

    def native_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds in the ``.tflite``'s own dtype and layout (float NCHW quantized and transposed once),
        so timing ``run`` measures the model, not numpy's input conversion."""
        return {d["name"]: self._prepare(np.asarray(feeds[d["name"]]), d) for d in self._in}

    def run_as_onnx(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``run``, with outputs as the ONNX model they came from gives them: float32 (int8 outputs
        through their scale and zero point) and rank-4 outputs NCHW (a ``.tflite`` keeps NHWC)."""
        out = []
        for x, det in zip(self.run(feeds), self._out, strict=True):
            scale, zp = det["quantization"]
            y = (x.astype(np.float32) - zp) * scale if np.issubdtype(x.dtype, np.integer) and scale else \
                np.asarray(x, np.float32)
            out.append(y.transpose(0, 3, 1, 2) if y.ndim == 4 else y)
        return out


def load(model_path: str | Path, threads: int = 1,
         input_shapes: Mapping[str, Sequence[int]] | None = None) -> LiteRTSession:
    """Open ``model_path`` (a ``.tflite``) in LiteRT with ``threads`` CPU threads.

    NOTE: ``input_shapes`` is ignored: a ``.tflite`` file has fixed input shapes (in its own
    NHWC layout, while the given shapes are the ONNX model's)."""
    reason = available()
    if reason:
        raise EdgekilnError(reason)
    return LiteRTSession(model_path, threads)
