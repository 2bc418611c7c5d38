"""Integer graph IR -> int8 ``.tflite`` flatbuffer (no TensorFlow).

Input is the C backend's :class:`~edgekiln.codegen.ir.IntGraph` (``load_qdq`` of an int8 QDQ
ONNX model), which is already in TFLite's layout:

* activations are NHWC, batch 1 (the ``.tflite`` input is ``(1, H, W, C)``; feed it transposed
  NCHW -> NHWC, quantized with the input tensor's scale and zero point);
* conv weights are OHWI = TFLite's ``[out, kh, kw, in]``, per-channel ``quantized_dimension`` 0;
  depthwise weights are written ``[1, kh, kw, out]``, ``quantized_dimension`` 3;
* fully connected weights are ``[out, in]`` (columns already permuted when an NCHW Flatten fed
  them), ``quantized_dimension`` 0;
* biases are int32 with ``scale = input_scale * weight_scale`` per channel, zero point 0.

The float32 weight scales TFLite stores come from the IR op's ``weight_scale`` (export-time
metadata the lowering keeps next to the requantization multipliers, :func:`weight_scales`).

Where TFLite kernels demand equal input/output quantization (concatenation inputs, pooling) or a
fixed one (int8 softmax output: scale 1/256, zero point -128), a QUANTIZE (int8 -> int8
requantize) op is inserted; global average pooling is written as MEAN, which requantizes itself.

>>> from edgekiln.codegen.ir import load_qdq
>>> from edgekiln.codegen.testmodels import tiny_qdq_model
>>> path = write_tflite(load_qdq(tiny_qdq_model("tiny_int8.onnx")), "model.tflite")
>>> path.read_bytes()[4:8]   # the TFLite file identifier
b'TFL3'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.codegen.binary32 import binary32_multiplier, onnx_qlinear_scale
from edgekiln.codegen.tflite.schema import TFLiteGraph, activation_code, options
from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_bytes

#: IR op kinds this writer lowers, and the TFLite builtin each becomes.
SUPPORTED_KINDS = {
    "conv2d": "CONV_2D or DEPTHWISE_CONV_2D (after a PAD when pads are not SAME)", "fully_connected": "FULLY_CONNECTED", "add": "ADD",
    "max_pool": "MAX_POOL_2D", "avg_pool": "AVERAGE_POOL_2D or MEAN", "reshape": "RESHAPE",
    "concat": "CONCATENATION", "softmax": "SOFTMAX", "requantize": "QUANTIZE / RELU / RELU6",
    "transpose_nchw": "RESHAPE + TRANSPOSE + RESHAPE",
}

# NOTE: operator versions as the TFLite converter sets them for int8 kernels (TFLM ignores them;
# LiteRT picks its kernel registration by them).
_VERSION = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MAX_POOL_2D": 2,
            "AVERAGE_POOL_2D": 2, "MEAN": 2, "PAD": 2, "RESHAPE": 1, "CONCATENATION": 2, "SOFTMAX": 2,
            "QUANTIZE": 2, "RELU": 2, "RELU6": 2, "TRANSPOSE": 2}


def weight_scales(op: Any, in_scale: float, out_scale: float) -> np.ndarray:
    """Per-channel float32 weight scales of a conv/fc IR op (as the QDQ model stored them).

    ``in_scale``/``out_scale`` are only used to check them against the op's requantization
    multipliers (``in * w / out`` evaluated in float32 must give the stored significand/shift).
    """
    if op.weight_scale is None:
        raise EdgekilnError(f"node {op.name!r}: the IR op carries no weight scales (not built by load_qdq)")
    scales = np.asarray(op.weight_scale, dtype=np.float32).reshape(-1)
    mant, rshift = binary32_multiplier(onnx_qlinear_scale(in_scale, scales, out_scale))
    if not (np.array_equal(mant, op.arrays["mult"]) and np.array_equal(rshift, op.arrays["shift"])):
        raise EdgekilnError(f"node {op.name!r}: weight scales do not match the op's requantization multipliers")
    return scales


def _padding(name: str, a: dict[str, int], in_hw: tuple[int, int], k: tuple[int, int],
             dil: tuple[int, int] = (1, 1)) -> int:
    """TFLite ``Padding`` (SAME=0 / VALID=1) matching the IR's explicit pads, or an error."""
    strides = (a["stride_h"], a["stride_w"])
    pads = (a["pad_top"], a["pad_left"])
    outs = (a["out_h"], a["out_w"])
    same = valid = True
    for i in range(2):
        eff = dil[i] * (k[i] - 1) + 1
        valid &= pads[i] == 0 and outs[i] == (in_hw[i] - eff) // strides[i] + 1
        total = max((math.ceil(in_hw[i] / strides[i]) - 1) * strides[i] + eff - in_hw[i], 0)
        same &= outs[i] == math.ceil(in_hw[i] / strides[i]) and pads[i] == total // 2
    if valid:
        return 1
    if same:
        return 0
    raise EdgekilnError(f"node {name!r}: padding (top {pads[0]}, left {pads[1]}, stride {strides}) is neither "
                        "TFLite SAME nor VALID; re-export the model with symmetric 'same' padding")


class _Lowering:
    """Walks the IR schedule once, adding TFLite tensors and ops."""

    def __init__(self, graph: Any) -> None:
        self.ir = graph
        self.g = TFLiteGraph("edgekiln")
        self.ids: dict[str, int] = {}

    def act(self, name: str) -> int:
        if name not in self.ids:
            t = self.ir.tensors[name]
            self.ids[name] = self.g.add_tensor(name, t.shape, np.int8, scale=np.float32(t.scale),
                                               zero_point=t.zero_point)
        return self.ids[name]

    def temp(self, name: str, shape: tuple[int, ...], scale: float, zp: int) -> int:
        return self.g.add_tensor(name, shape, np.int8, scale=np.float32(scale), zero_point=zp)

    def op(self, code: str, inputs: list[int], outputs: list[int], opts: Any = None) -> None:
        self.g.add_op(code, inputs, outputs, opts, version=_VERSION.get(code, 1))

    def requantize_to(self, src: int, name: str, shape: tuple[int, ...], scale: float, zp: int) -> int:
        dst = self.temp(name, shape, scale, zp)
        self.op("QUANTIZE", [src], [dst])
        return dst

    def fused(self, op: Any) -> int:
        """TFLite fused activation equal to the IR's (act_min, act_max) clamp on the output grid."""
        y = self.ir.tensors[op.output]
        lo, hi = op.attrs.get("act_min", -128), op.attrs.get("act_max", 127)

        def q(v: float) -> int:
            return int(np.clip(np.rint(v / y.scale) + y.zero_point, -128, 127))

        if lo <= -128 and hi >= 127:
            return activation_code(None)
        if lo == max(q(0.0), -128) and hi >= 127:
            return activation_code("RELU")
        if lo == max(q(0.0), -128) and hi == q(6.0):
            return activation_code("RELU6")
        raise EdgekilnError(f"node {op.name!r}: fused clamp [{lo}, {hi}] is not RELU or RELU6 on the output "
                            "grid; TFLite cannot express it")

    def explicit_pad(self, op: Any, src: int) -> int:
        """A PAD op (pad value = the input zero point, i.e. real 0) for pads TFLite SAME cannot express."""
        a, x = op.attrs, self.ir.tensors[op.inputs[0]]
        rows, cols = [], []
        for io, k, d, s, p, o in (("h", a["k_h"], a["dil_h"], a["stride_h"], a["pad_top"], a["out_h"]),
                                  ("w", a["k_w"], a["dil_w"], a["stride_w"], a["pad_left"], a["out_w"])):
            after = max((o - 1) * s + d * (k - 1) + 1 - a[f"in_{io}"] - p, 0)
            (rows if io == "h" else cols).extend([p, after])
        paddings = np.array([[0, 0], rows, cols, [0, 0]], dtype=np.int32)
        shape = (1, a["in_h"] + rows[0] + rows[1], a["in_w"] + cols[0] + cols[1], a["in_c"])
        dst = self.temp(op.name + "/padded", shape, x.scale, x.zero_point)
        pt = self.g.add_tensor(op.name + "/paddings", (4, 2), np.int32, data=paddings)
        self.op("PAD", [src, pt], [dst], options("PadOptions"))
        return dst

    # ---- one method per IR kind ------------------------------------------------------------
    def conv2d(self, op: Any) -> None:
        a = op.attrs
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        s_w = weight_scales(op, x.scale, y.scale)
        w = op.arrays["weights"]  # OHWI
        src = self.act(x.name)
        try:
            pad = _padding(op.name, a, (a["in_h"], a["in_w"]), (a["k_h"], a["k_w"]), (a["dil_h"], a["dil_w"]))
        except EdgekilnError:
            src, pad = self.explicit_pad(op, src), 1  # e.g. PyTorch's stride-2 padding=1: pad, then VALID
        common = dict(padding=pad, strideH=a["stride_h"], strideW=a["stride_w"], dilationHFactor=a["dil_h"],
                      dilationWFactor=a["dil_w"], fusedActivationFunction=self.fused(op))
        bias = self.g.add_tensor(op.name + "/bias", (a["out_c"],), np.int32, data=op.arrays["bias"],
                                 scale=np.float32(x.scale) * s_w, zero_point=0)
        if a["groups"] == 1:
            wt = self.g.add_tensor(op.name + "/weights", w.shape, np.int8, data=w, scale=s_w, zero_point=0,
                                   quantized_dimension=0)
            self.op("CONV_2D", [src, wt, bias], [self.act(y.name)], options("Conv2DOptions", **common))
        elif a["groups"] == a["in_c"] and a["out_c"] % a["in_c"] == 0:
            # NOTE: depthwise: ONNX (out, 1, kh, kw) -> IR (out, kh, kw, 1) -> TFLite (1, kh, kw, out).
            wd = np.ascontiguousarray(w.transpose(3, 1, 2, 0))
            wt = self.g.add_tensor(op.name + "/weights", wd.shape, np.int8, data=wd, scale=s_w, zero_point=0,
                                   quantized_dimension=3)
            self.op("DEPTHWISE_CONV_2D", [src, wt, bias], [self.act(y.name)],
                    options("DepthwiseConv2DOptions", depthMultiplier=a["out_c"] // a["in_c"], **common))
        else:
            raise EdgekilnError(f"node {op.name!r}: grouped convolution with {a['groups']} groups is not "
                                "supported by the TFLite writer (only groups=1 and depthwise)")

    def fully_connected(self, op: Any) -> None:
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        s_w = weight_scales(op, x.scale, y.scale)
        w = op.arrays["weights"]
        wt = self.g.add_tensor(op.name + "/weights", w.shape, np.int8, data=w, scale=s_w, zero_point=0)
        bias = self.g.add_tensor(op.name + "/bias", (w.shape[0],), np.int32, data=op.arrays["bias"],
                                 scale=np.float32(x.scale) * s_w, zero_point=0)
        self.op("FULLY_CONNECTED", [self.act(x.name), wt, bias], [self.act(y.name)],
                options("FullyConnectedOptions", fusedActivationFunction=self.fused(op)))

    def add(self, op: Any) -> None:
        ins = [self.act(n) for n in op.inputs]
        self.op("ADD", ins, [self.act(op.output)], options("AddOptions", fusedActivationFunction=self.fused(op)))

    def _pool(self, op: Any, code: str) -> None:
        a = op.attrs
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        pad = _padding(op.name, a, (a["in_h"], a["in_w"]), (a["k_h"], a["k_w"]))
        opts = options("Pool2DOptions", padding=pad, strideH=a["stride_h"], strideW=a["stride_w"],
                       filterHeight=a["k_h"], filterWidth=a["k_w"])
        if (x.scale, x.zero_point) == (y.scale, y.zero_point):
            self.op(code, [self.act(x.name)], [self.act(y.name)], opts)
            return
        # NOTE: TFLite int8 pooling requires equal in/out quantization: pool, then requantize.
        tmp = self.temp(op.output + "/pooled", y.shape, x.scale, x.zero_point)
        self.op(code, [self.act(x.name)], [tmp], opts)
        self.op("QUANTIZE", [tmp], [self.act(y.name)])

    def max_pool(self, op: Any) -> None:
        self._pool(op, "MAX_POOL_2D")

    def avg_pool(self, op: Any) -> None:
        a = op.attrs
        if a["out_h"] == 1 and a["out_w"] == 1 and a["k_h"] == a["in_h"] and a["k_w"] == a["in_w"] \
                and a["pad_top"] == 0 and a["pad_left"] == 0:
            axes = self.g.add_tensor(op.name + "/axes", (2,), np.int32, data=np.array([1, 2], np.int32))
            self.op("MEAN", [self.act(op.inputs[0]), axes], [self.act(op.output)],
                    options("ReducerOptions", keepDims=True))
            return
        if a["count_include_pad"] and (a["pad_top"] or a["pad_left"]):
            raise EdgekilnError(f"node {op.name!r}: average pooling with count_include_pad=1 over padding has "
                                "no TFLite equivalent")
        self._pool(op, "AVERAGE_POOL_2D")

    def _reshape_to(self, src: int, dst: int, shape: tuple[int, ...], name: str) -> None:
        s = self.g.add_tensor(name + "/shape", (len(shape),), np.int32, data=np.array(shape, np.int32))
        self.op("RESHAPE", [src, s], [dst], options("ReshapeOptions", newShape=[int(d) for d in shape]))

    def reshape(self, op: Any) -> None:
        y = self.ir.tensors[op.output]
        self._reshape_to(self.act(op.inputs[0]), self.act(op.output), y.shape, op.name)

    def transpose_nchw(self, op: Any) -> None:
        a, x = op.attrs, self.ir.tensors[op.inputs[0]]
        nhwc = self.temp(op.name + "/nhwc", (1, a["height"], a["width"], a["channels"]), x.scale, x.zero_point)
        nchw = self.temp(op.name + "/nchw", (1, a["channels"], a["height"], a["width"]), x.scale, x.zero_point)
        self._reshape_to(self.act(x.name), nhwc, (1, a["height"], a["width"], a["channels"]), op.name + "/in")
        perm = self.g.add_tensor(op.name + "/perm", (4,), np.int32, data=np.array([0, 3, 1, 2], np.int32))
        self.op("TRANSPOSE", [nhwc, perm], [nchw], options("TransposeOptions"))
        self._reshape_to(nchw, self.act(op.output), self.ir.tensors[op.output].shape, op.name + "/out")

    def concat(self, op: Any) -> None:
        y = self.ir.tensors[op.output]
        ins = []
        for n in op.inputs:
            t = self.ir.tensors[n]
            src = self.act(n)
            if (t.scale, t.zero_point) != (y.scale, y.zero_point):
                # NOTE: TFLite int8 concatenation needs every input on the output's grid.
                src = self.requantize_to(src, f"{n}/to_{op.name}", t.shape, y.scale, y.zero_point)
            ins.append(src)
        self.op("CONCATENATION", ins, [self.act(y.name)],
                options("ConcatenationOptions", axis=len(y.shape) - 1))

    def softmax(self, op: Any) -> None:
        y = self.ir.tensors[op.output]
        opts = options("SoftmaxOptions", beta=1.0)
        if abs(y.scale * 256 - 1) < 1e-6 and y.zero_point == -128:
            self.op("SOFTMAX", [self.act(op.inputs[0])], [self.act(y.name)], opts)
            return
        # NOTE: int8 SOFTMAX in TFLite/TFLM only produces scale 1/256, zero point -128.
        tmp = self.temp(op.output + "/softmax", y.shape, 1.0 / 256, -128)
        self.op("SOFTMAX", [self.act(op.inputs[0])], [tmp], opts)
        self.op("QUANTIZE", [tmp], [self.act(y.name)])

    def requantize(self, op: Any) -> None:
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        act = self.fused(op)
        code = {activation_code(None): "QUANTIZE", activation_code("RELU"): "RELU",
                activation_code("RELU6"): "RELU6"}[act]
        self.op(code, [self.act(x.name)], [self.act(y.name)])


def to_tflite_bytes(graph: Any, *, description: str = "edgekiln int8") -> bytes:
    """Lower an :class:`~edgekiln.codegen.ir.IntGraph` to ``.tflite`` bytes.

    Raises :class:`EdgekilnError` naming the op kind and node for anything outside
    :data:`SUPPORTED_KINDS` or a configuration TFLite cannot express.
    """
    if graph.extra_outputs:
        # NOTE: the C backend packs several outputs into one buffer; the TFLite checks and the
        # TFLM harness still compare one output, so this writer refuses rather than half-check.
        raise EdgekilnError(f"the TFLite writer supports one graph output; this model has {len(graph.outputs)}")
    low = _Lowering(graph)
    low.act(graph.input)
    for op in graph.ops:
        method = getattr(low, op.kind, None) if op.kind in SUPPORTED_KINDS else None
        if method is None:
            raise EdgekilnError(f"op {op.kind} (node {op.name!r}) is not supported by the TFLite writer; "
                                f"supported: {', '.join(SUPPORTED_KINDS)}")
        method(op)
    return low.g.to_bytes(inputs=[low.ids[graph.input]], outputs=[low.act(graph.output)],
                          description=description)


def write_tflite(graph: Any, path: str | Path) -> Path:
    """Write ``graph`` (an IntGraph) as an int8 ``.tflite`` file atomically; returns the path."""
    return atomic_write_bytes(path, to_tflite_bytes(graph))
