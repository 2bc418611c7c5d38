"""Running the scoreboard's rows and measuring them against the FP32 model.

A :class:`Runner` runs one row's model on its runtime and hands back every output as float in the
ONNX model's layout, so every row is compared the same way: LiteRT's int8 NHWC outputs are
dequantized with their tensor's scale and zero point and transposed back. SQNR is
``20 log10(|y| / |y - y_q|)`` over all held-out samples of an output, lowest output counting
(:func:`benchmarks.corpus_run.sqnr_db`).

>>> to_onnx_layout(np.zeros((1, 4, 5, 3)), (1, 3, 4, 5)).shape
(1, 3, 4, 5)
>>> top1_agreement(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([[0.2, 0.7], [0.3, 0.6]]))
0.5
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peers
from benchmarks.corpus_run import sqnr_db

Feeds = dict[str, np.ndarray]
#: categories whose first per-sample vector output is a class score vector (logits or probabilities).
CLASS_CATEGORIES = ("classification", "non-float")


@dataclass
class Runner:
    """``run(feeds)`` -> outputs as float in ONNX layout; ``timing_feed`` turns a float ONNX feed
    into what the runtime takes without conversion (so timing measures the runtime only)."""

    run: Callable[[Feeds], list[np.ndarray]]
    raw: Callable[[Feeds], Any]
    timing_feed: Callable[[Feeds], Feeds]


def open_runner(path: Path, runtime: str, fixed_shape: Mapping[str, tuple[int, ...]],
                onnx_shapes: list[tuple[int, ...]] | None = None) -> Runner:
    """A :class:`Runner` for ``path`` on ``runtime`` (onnxruntime, openvino or litert). OpenVINO
    compiles for ``fixed_shape`` (batch 1), as the other runtimes run; LiteRT needs the ONNX
    output shapes (``onnx_shapes``) to put its outputs back in ONNX layout."""
    if runtime == "onnxruntime":
        run = peers.onnxruntime_session(path)
        return Runner(run, run, lambda f: f)
    if runtime == "openvino":
        run = peers.openvino_session(path, fixed_shape=fixed_shape)
        return Runner(run, run, lambda f: f)
    if runtime == "litert":
        return _litert_runner(path, onnx_shapes or [])
    raise ValueError(f"no runner for runtime {runtime!r}")


def _litert_runner(path: Path, onnx_shapes: list[tuple[int, ...]]) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    from edgekiln.execution import load_session

    sess = load_session(path, "litert")
    # NOTE: a second interpreter only to read the tensors' quantization (the session keeps its own private).
    probe = Interpreter(model_path=str(path))
    ins, outs = probe.get_input_details(), probe.get_output_details()
    order = match_outputs([tuple(int(s) for s in d["shape"]) for d in outs], onnx_shapes)

    def run(feeds: Feeds) -> list[np.ndarray]:
        # NOTE: the .tflite names its inputs after the ONNX model's QuantizeLinear outputs: by position.
        got = sess.run({d["name"]: x for d, x in zip(ins, feeds.values(), strict=True)})
        result = []
        for j, shape in zip(order, onnx_shapes, strict=True):
            scale, zp = outs[j]["quantization"]
            y = got[j].astype(np.float64)
            if np.issubdtype(got[j].dtype, np.integer) and scale:
                y = (y - zp) * scale
            result.append(to_onnx_layout(y, shape))
        return result

    def timing_feed(feeds: Feeds) -> Feeds:
        return {d["name"]: quantize_input(np.asarray(x), d) for d, x in zip(ins, feeds.values(), strict=True)}

    return Runner(run, sess.run, timing_feed)


def quantize_input(x: np.ndarray, det: Mapping[str, Any]) -> np.ndarray:
    """A float ONNX-layout input as the ``.tflite`` input tensor takes it (NHWC, int8 with its
    scale and zero point), computed once outside the timed call."""
    shape, dtype = tuple(int(s) for s in det["shape"]), np.dtype(det["dtype"])
    if x.ndim == 4 and x.shape != shape:
        x = x.transpose(0, 2, 3, 1)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
        scale, zp = det["quantization"]
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x / scale) + zp, info.min, info.max)
    return np.ascontiguousarray(x.reshape(shape), dtype=dtype)


def to_onnx_layout(y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A TFLite output (channels last) in the ONNX output's layout ``shape`` (channels first)."""
    if y.shape == tuple(shape):
        return y
    if y.ndim == 4 and y.transpose(0, 3, 1, 2).shape == tuple(shape):
        return y.transpose(0, 3, 1, 2)
    if y.ndim == 3 and y.transpose(0, 2, 1).shape == tuple(shape):
        return y.transpose(0, 2, 1)
    if y.size == int(np.prod(shape)) and y.squeeze().shape == tuple(s for s in shape if s != 1):
        return y.reshape(shape)
    raise ValueError(f"TFLite output {list(y.shape)} does not map onto the ONNX output {list(shape)}")


def match_outputs(tflite_shapes: list[tuple[int, ...]], onnx_shapes: list[tuple[int, ...]]) -> list[int]:
    """For each ONNX output, the index of the TFLite output holding it: the first unused one with
    the same number of elements (in order, so equal sizes keep the ONNX order).

    >>> match_outputs([(1, 2), (1, 6, 6, 4)], [(1, 4, 6, 6), (1, 2)])
    [1, 0]
    """
    used: list[int] = []
    for shape in onnx_shapes:
        size = int(np.prod(shape))
        j = next((k for k, s in enumerate(tflite_shapes) if k not in used and int(np.prod(s)) == size), None)
        if j is None:
            raise ValueError(f"no TFLite output with {size} elements for the ONNX output {list(shape)}")
        used.append(j)
    return used


def outputs(run: Callable[[Feeds], list[np.ndarray]], data: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Every output over the held-out samples, one sample a call, stacked: ``[n, *per-sample shape]``."""
    n = len(next(iter(data.values())))
    per = [run({k: v[i:i + 1] for k, v in data.items()}) for i in range(n)]
    return [np.stack([np.asarray(p[j], np.float64) for p in per]) for j in range(len(per[0]))]


def class_output(ref: list[np.ndarray], category: str) -> int | None:
    """The output that is a class vector (one score per class, per sample), or None: in a
    classifier category the first ``[1, C]`` output, elsewhere the first that is a probability
    vector (non-negative, sums to 1).

    >>> class_output([np.ones((3, 1, 4)), np.full((3, 1, 2), 0.5)], "face")
    1
    >>> class_output([np.ones((3, 1, 4))], "audio") is None
    True
    """
    for j, y in enumerate(ref):
        rows = y.reshape(len(y), -1)
        if y.ndim != 3 or y.shape[1] != 1 or rows.shape[1] < 2:
            continue
        probabilities = bool((rows >= 0).all() and np.allclose(rows.sum(1), 1.0, atol=1e-3))
        if probabilities or category in CLASS_CATEGORIES:
            return j
    return None


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Share of samples whose top-1 class is the FP32 model's."""
    a, b = ref.reshape(len(ref), -1).argmax(1), got.reshape(len(got), -1).argmax(1)
    return float((a == b).mean())


def compare(ref: list[np.ndarray], got: list[np.ndarray], cls: int | None) -> dict[str, Any]:
    """SQNR (lowest output) and top-1 agreement of ``got`` against the FP32 outputs ``ref``."""
    if [r.shape for r in ref] != [g.shape for g in got]:
        raise ValueError(f"output shapes {[list(g.shape) for g in got]} differ from FP32's "
                         f"{[list(r.shape) for r in ref]}")
    sqnr = sqnr_db([r.ravel() for r in ref], [g.ravel() for g in got])
    return {"sqnr_db": sqnr, "top1": None if cls is None else top1_agreement(ref[cls], got[cls])}
