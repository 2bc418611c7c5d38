"""TFLite lowering of the IR's spatial kinds (:mod:`edgekiln.codegen.lower_spatial`): ``pad`` and
``resize``.

* ``pad`` with stride 1 (ONNX Pad) is PADV2 with the fill value. With a stride (the zeros a
  ConvTranspose puts between input pixels) it is data movement from the input pixels plus one
  fill pixel: ``RESHAPE (pixels, C) -> CONCATENATION`` with a constant fill row ``-> GATHER`` (one
  index per output pixel) ``-> RESHAPE``. Both are exact.
* ``resize`` in nearest mode is the same GATHER of source pixels (the IR's row and column tables
  give each output pixel's source): exact. Bilinear resize becomes TFLite's RESIZE_BILINEAR when
  the IR's source coordinates are one of its modes (half-pixel centers, aligned corners, or
  neither); its int8 kernel weights in its own fixed point, so it may differ from the IR's Q15
  one-rounding kernel by 1 LSB.
* an ``avg_pool`` whose window covers whole axes (a global pool, a ReduceMean over any axes,
  :mod:`edgekiln.codegen.lower_reduce`) is MEAN over those axes (:func:`mean`), which requantizes once.

>>> from edgekiln.codegen.ir import IntGraph, Op, QTensor
>>> from edgekiln.codegen.tflite.schema import op_names, read_model
>>> from edgekiln.codegen.tflite.writer import to_tflite_bytes
>>> t = {"x": QTensor("x", (1, 2, 2, 3), 0.1, 4), "y": QTensor("y", (1, 5, 5, 3), 0.1, 4)}
>>> zeros_between = Op("pad", "deconv_pad", ["x"], "y", attrs=dict(in_h=2, in_w=2, channels=3, out_h=5,
...                    out_w=5, pad_top=1, pad_left=1, stride_h=2, stride_w=2, value=4))
>>> op_names(read_model(to_tflite_bytes(IntGraph(t, [zeros_between], "x", "y", "x", (), ()))))
['RESHAPE', 'CONCATENATION', 'GATHER', 'RESHAPE']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgekiln.codegen.tflite.schema import options
from edgekiln.errors import EdgekilnError

if TYPE_CHECKING:
    from edgekiln.codegen.tflite.writer import Lowering

#: the IR's fixed-point one of a resize weight (codegen/lower_spatial.py RESIZE_ONE).
_ONE = 1 << 15


def _gather_pixels(low: Lowering, op: Any, src: int, index: np.ndarray, fill: int | None) -> None:
    """``y`` pixel ``i`` = input pixel ``index[i]`` (``index == H*W``: the ``fill`` pixel)."""
    a = op.attrs
    x, y = low.ir.tensors[op.inputs[0]], low.ir.tensors[op.output]
    n_in, c = a["in_h"] * a["in_w"], a["channels"]
    rows = low.temp(op.name + "/pixels", (n_in, c), x.scale, x.zero_point)
    low.reshape_to(src, rows, (n_in, c), op.name + "/in")
    if fill is not None:
        row = low.g.add_tensor(op.name + "/fill", (1, c), np.int8, data=np.full((1, c), fill, np.int8),
                               scale=np.float32(x.scale), zero_point=x.zero_point)
        both = low.temp(op.name + "/pixels_fill", (n_in + 1, c), x.scale, x.zero_point)
        low.op("CONCATENATION", [rows, row], [both], options("ConcatenationOptions", axis=0))
        rows = both
    idx = low.g.add_tensor(op.name + "/index", (index.size,), np.int32, data=index.astype(np.int32))
    moved = low.temp(op.name + "/moved", (index.size, c), x.scale, x.zero_point)
    low.op("GATHER", [rows, idx], [moved], options("GatherOptions", axis=0))
    low.reshape_to(moved, low.act(y.name), y.shape, op.name + "/out")


def pad(low: Lowering, op: Any) -> None:
    """A ``value``-filled map holding input pixel (y, x) at (pad_top + y*stride_h, pad_left + x*stride_w)."""
    a = op.attrs
    x = low.ir.tensors[op.inputs[0]]
    src = low.act(x.name)
    if a["stride_h"] == 1 and a["stride_w"] == 1:
        rows = [a["pad_top"], a["out_h"] - a["in_h"] - a["pad_top"]]
        cols = [a["pad_left"], a["out_w"] - a["in_w"] - a["pad_left"]]
        pt = low.g.add_tensor(op.name + "/paddings", (4, 2), np.int32,
                              data=np.array([[0, 0], rows, cols, [0, 0]], np.int32))
        fill = low.g.add_tensor(op.name + "/pad_value", (), np.int8, data=np.array(a["value"], np.int8),
                                scale=np.float32(x.scale), zero_point=x.zero_point)
        low.op("PADV2", [src, pt, fill], [low.act(op.output)], options("PadV2Options"))
        return
    index = np.full(a["out_h"] * a["out_w"], a["in_h"] * a["in_w"], np.int64)
    ys, xs = np.meshgrid(np.arange(a["in_h"]), np.arange(a["in_w"]), indexing="ij")
    index[(a["pad_top"] + ys * a["stride_h"]) * a["out_w"] + a["pad_left"] + xs * a["stride_w"]] = ys * a["in_w"] + xs
    _gather_pixels(low, op, src, index, a["value"])


def _bilinear_mode(op: Any) -> dict[str, bool] | None:
    """The RESIZE_BILINEAR flags whose source coordinates are the IR's, or None."""
    a, arr = op.attrs, op.arrays
    got_y = arr["y0"].astype(np.float64) + arr["wy"] / _ONE
    got_x = arr["x0"].astype(np.float64) + arr["wx"] / _ONE
    for flags in ({"alignCorners": False, "halfPixelCenters": True}, {"alignCorners": True, "halfPixelCenters": False},
                  {"alignCorners": False, "halfPixelCenters": False}):
        ok = True
        for got, n_in, n_out in ((got_y, a["in_h"], a["out_h"]), (got_x, a["in_w"], a["out_w"])):
            o = np.arange(n_out, dtype=np.float64)
            if flags["alignCorners"]:
                c = o * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
            elif flags["halfPixelCenters"]:
                c = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
            else:
                c = o * (n_in / n_out)
            c = np.minimum(c, n_in - 1)
            ok &= bool(np.all(np.abs(c - got) <= 1.0 / _ONE))
        if ok:
            return flags
    return None


def resize(low: Lowering, op: Any) -> None:
    """Nearest: an exact GATHER of source pixels; bilinear: RESIZE_BILINEAR in the matching mode."""
    a, arr = op.attrs, op.arrays
    x = low.ir.tensors[op.inputs[0]]
    if not (np.any(arr["wy"]) or np.any(arr["wx"])):
        index = (arr["y0"].astype(np.int64)[:, None] * a["in_w"] + arr["x0"].astype(np.int64)[None, :]).reshape(-1)
        _gather_pixels(low, op, low.act(x.name), index, None)
        return
    flags = _bilinear_mode(op)
    if flags is None:
        raise EdgekilnError(f"node {op.name!r}: the bilinear Resize's coordinate mode is none of TFLite's "
                            "(half-pixel centers, aligned corners, asymmetric)")
    size = low.g.add_tensor(op.name + "/size", (2,), np.int32, data=np.array([a["out_h"], a["out_w"]], np.int32))
    low.op("RESIZE_BILINEAR", [low.act(x.name), size], [low.act(op.output)],
           options("ResizeBilinearOptions", **flags))


def mean(low: Lowering, op: Any, axes: list[int]) -> None:
    """An average pool whose window covers whole axes of the map ``(1, in_h, in_w, channels)`` (a
    global pool, a ReduceMean) as MEAN over those axes, which requantizes once; the IR tensors
    are viewed as that map and back (RESHAPE, a no-op in memory) where their shapes differ."""
    a = op.attrs
    x, y = low.ir.tensors[op.inputs[0]], low.ir.tensors[op.output]
    src, dst = low.act(x.name), low.act(y.name)
    view = (1, a["in_h"], a["in_w"], a["channels"])
    if tuple(x.shape) != view:
        src = low.temp(op.name + "/as_map", view, x.scale, x.zero_point)
        low.reshape_to(low.act(x.name), src, view, op.name + "/as_map")
    pooled = (1, a["out_h"], a["out_w"], a["channels"])
    keep = len(y.shape) == 4  # a ReduceMean with keepdims=0 over H, W gives (1, C)
    if tuple(y.shape) != (pooled if keep else (1, a["channels"])):
        dst, keep = low.temp(op.name + "/mean", pooled, y.scale, y.zero_point), True
    at = low.g.add_tensor(op.name + "/axes", (len(axes),), np.int32, data=np.array(axes, np.int32))
    low.op("MEAN", [src, at], [dst], options("ReducerOptions", keepDims=keep))
    if dst != low.act(y.name):
        low.reshape_to(dst, low.act(y.name), y.shape, op.name + "/out")


#: IR kind -> (lowering function, the TFLite ops it writes), merged into the writer's table.
KINDS = {
    "pad": (pad, "PADV2, or with a stride RESHAPE + CONCATENATION (fill) + GATHER + RESHAPE"),
    "resize": (resize, "nearest: RESHAPE + GATHER + RESHAPE; bilinear: RESIZE_BILINEAR"),
}
