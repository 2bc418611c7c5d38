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

Where TFLite kernels demand equal input/output quantization (concatenation inputs, pooling), a
requantization is inserted, as DEQUANTIZE -> QUANTIZE through float32 (see
:meth:`Lowering.requantize_to`); an average over whole axes (global pooling, ReduceMean) is
written as MEAN, which requantizes itself.

The kinds this module writes are :class:`Lowering` methods; those that take several TFLite ops
live in sibling modules, one function per kind: :mod:`.elementwise` (lookup tables, ``mul``,
``add_lut``, ``mean_lut``, ``softmax``), :mod:`.movement` (``gather``, ``constant``), :mod:`.spatial`
(``pad``, ``resize``, MEAN). Every form is checked op by
op against the integer reference in LiteRT and TFLM (:mod:`.per_op`).

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
from edgekiln.codegen.tflite import elementwise, movement, spatial
from edgekiln.codegen.tflite.schema import TFLiteGraph, activation_code, options
from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_bytes

#: IR op kinds this writer lowers, and the TFLite builtin each becomes.
SUPPORTED_KINDS = {
    "conv2d": "CONV_2D, DEPTHWISE_CONV_2D, or SPLIT + CONV_2D per group + CONCATENATION (after a PAD when pads are "
              "not SAME)", "fully_connected": "FULLY_CONNECTED", "add": "ADD",
    "max_pool": "MAX_POOL_2D", "avg_pool": "AVERAGE_POOL_2D or MEAN", "reshape": "RESHAPE",
    "concat": "CONCATENATION", "requantize": "DEQUANTIZE + QUANTIZE / RELU / RELU6",
    "transpose_nchw": "RESHAPE + TRANSPOSE + RESHAPE",
    **{kind: ops for kind, (_, ops) in (elementwise.KINDS | movement.KINDS | spatial.KINDS).items()},
}

#: most row bands an elementwise op with a wide temporary is cut into (Lowering.in_bands), and the
#: smallest tensor (elements) worth cutting.
BANDS = 8
BAND_MIN_ELEMENTS = 4096
#: most inputs TFLM's CONCATENATION kernel accepts (kMaxInputNum).
MAX_CONCAT_INPUTS = 10

# NOTE: operator versions as the TFLite converter sets them for int8 kernels (TFLM ignores them;
# LiteRT picks its kernel registration by them).
_VERSION = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MAX_POOL_2D": 2,
            "AVERAGE_POOL_2D": 2, "MEAN": 2, "PAD": 2, "PADV2": 2, "RESHAPE": 1, "CONCATENATION": 2, "SOFTMAX": 2,
            "QUANTIZE": 2, "DEQUANTIZE": 2, "MAXIMUM": 2, "MINIMUM": 2, "SPLIT": 2, "SPLIT_V": 2, "MUL": 2, "RELU": 2, "RELU6": 2, "TRANSPOSE": 2}


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


class Lowering:
    """Walks the IR schedule once, adding TFLite tensors and ops."""

    def __init__(self, graph: Any, *, float_islands: bool = False) -> None:
        self.ir = graph
        self.float_islands = float_islands
        self.g = TFLiteGraph("edgekiln")
        self.ids: dict[str, int] = {}
        self._clamps: list[tuple[int, Any]] = []

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

    def in_bands(self, src: int, dst: int, shape: tuple[int, ...], name: str, body: Any) -> None:
        """Apply an elementwise ``body(src_id, dst_id, shape)`` to ``src`` -> ``dst`` in bands of rows.

        NOTE: the exact elementwise forms (table lookups, float32 requantization) need a 4- or
        8-byte temporary per element; on a large feature map that temporary, not the model, would
        set the TFLM arena (measured: MTCNN P-Net 711 kB instead of ~200 kB). SPLIT_V into up to
        :data:`BANDS` bands along H, the body per band, CONCATENATION back: the temporaries shrink
        to one band's, for two cheap copies. Small tensors go through in one piece.
        """
        parts_in = self.split_rows(src, shape, name)
        if len(parts_in) == 1:
            body(src, dst, shape)
            return
        ys = self.g.tensors[dst]
        parts_out = []
        for i, a in enumerate(parts_in):
            parts_out.append(self.g.add_tensor(f"{name}/band{i}_out", self.g.tensors[a].shape, np.dtype(ys.dtype),
                                               scale=ys.scale, zero_point=ys.zero_point))
            body(a, parts_out[-1], tuple(self.g.tensors[a].shape))
        self.concatenate(parts_out, dst, axis=1, name=name)

    def split_rows(self, src: int, shape: tuple[int, ...], name: str) -> list[int]:
        """``src`` cut into up to :data:`BANDS` bands of rows (SPLIT_V along H), or ``[src]`` when it
        is small or has one row (see :meth:`in_bands`)."""
        h = shape[1] if len(shape) == 4 else 1
        if h < 2 or int(np.prod(shape)) < BAND_MIN_ELEMENTS:
            return [src]
        k = min(BANDS, h)
        rows = [h // k + (1 if i < h % k else 0) for i in range(k)]
        xs = self.g.tensors[src]
        parts = [self.g.add_tensor(f"{name}/band{i}", (shape[0], r, *shape[2:]), np.dtype(xs.dtype), scale=xs.scale,
                                   zero_point=xs.zero_point) for i, r in enumerate(rows)]
        sizes = self.g.add_tensor(name + "/band_rows", (k,), np.int32, data=np.array(rows, np.int32))
        axis = self.g.add_tensor(name + "/band_axis", (), np.int32, data=np.array(1, np.int32))
        self.op("SPLIT_V", [src, sizes, axis], parts, options("SplitVOptions", numSplits=k))
        return parts

    def requantize_to(self, src: int, name: str, shape: tuple[int, ...], scale: float, zp: int,
                      dst: int | None = None) -> int:
        """int8 ``src`` onto another int8 grid (a new tensor ``name``, or ``dst``), through float32.

        NOTE: not one int8 -> int8 QUANTIZE: LiteRT's (XNNPACK, also without it) was measured 1 LSB
        off the exact requantization on 2-3% of the elements of each concat input, which compounded
        through ShuffleNetV2-0.5 to 8% identical outputs and 75% top-1 agreement (TFLM's was exact).
        DEQUANTIZE -> QUANTIZE computes onnxruntime's ``rint(real / scale) + zp`` in float32: bit-exact
        with the integer reference in LiteRT and TFLM alike (ShuffleNet 100%), for a float32 temporary
        (in bands: SqueezeNet-1.1's TFLM arena 282 -> 298 kB) and a little time (LiteRT p50, 1 thread,
        round-robin: SqueezeNet 0.673 -> 0.713 ms, ShuffleNet 3.30 -> 3.38 ms).
        """
        if dst is None:
            dst = self.temp(name, shape, scale, zp)

        def body(a: int, b: int, band: tuple[int, ...]) -> None:
            real = self.g.add_tensor(f"{self.g.tensors[b].name}/real", band, np.float32)
            self.op("DEQUANTIZE", [a], [real])
            self.op("QUANTIZE", [real], [b])

        self.in_bands(src, dst, shape, name + "/requantize", body)
        return dst

    def fused(self, op: Any) -> int | None:
        """TFLite fused activation equal to the IR's (act_min, act_max) clamp on the output grid, or
        None when no fused activation is (use :meth:`out`, which then clamps after the op)."""
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
        return None

    def out(self, op: Any) -> tuple[int, int]:
        """(tensor the op writes, its fused activation) for an op with an ``act_min``/``act_max`` clamp.

        NOTE: a clamp that is neither RELU nor RELU6 on the output grid (a Clip(-1, 1) say) is
        written exactly as MAXIMUM and MINIMUM with constants after the op, which writes a
        temporary; :meth:`flush_clamp` adds them once the op is written.
        """
        act = self.fused(op)
        if act is not None:
            return self.act(op.output), act
        y = self.ir.tensors[op.output]
        tmp = self.temp(op.output + "/unclamped", y.shape, y.scale, y.zero_point)
        self._clamps.append((tmp, op))
        return tmp, activation_code(None)

    def flush_clamp(self) -> None:
        """Write the MAXIMUM/MINIMUM pair of every clamp :meth:`out` deferred."""
        for tmp, op in self._clamps:
            y = self.ir.tensors[op.output]
            mid = self.temp(op.output + "/clamped_low", y.shape, y.scale, y.zero_point)
            for code, bound, src, dst in (("MAXIMUM", op.attrs["act_min"], tmp, mid),
                                          ("MINIMUM", op.attrs["act_max"], mid, self.act(y.name))):
                c = self.g.add_tensor(f"{op.name}/{code.lower()}", (), np.int8, data=np.array(bound, np.int8),
                                      scale=np.float32(y.scale), zero_point=y.zero_point)
                self.op(code, [src, c], [dst])
        self._clamps = []

    def explicit_pad(self, op: Any, src: int, value: int | None = None) -> int:
        """A PAD op for pads TFLite SAME cannot express (e.g. ``ceil_mode`` windows), then VALID.

        The pad value is the input zero point (real 0: convolution, average pooling that counts
        the padding), or ``value`` through PADV2 (-128 for max pooling: never the maximum of a
        window that holds an input element, which every ONNX window does).
        """
        a, x = op.attrs, self.ir.tensors[op.inputs[0]]
        rows, cols = [], []
        for io, k, d, s, p, o in (("h", a["k_h"], a.get("dil_h", 1), a["stride_h"], a["pad_top"], a["out_h"]),
                                  ("w", a["k_w"], a.get("dil_w", 1), a["stride_w"], a["pad_left"], a["out_w"])):
            after = max((o - 1) * s + d * (k - 1) + 1 - a[f"in_{io}"] - p, 0)
            (rows if io == "h" else cols).extend([p, after])
        paddings = np.array([[0, 0], rows, cols, [0, 0]], dtype=np.int32)
        shape = (1, a["in_h"] + rows[0] + rows[1], a["in_w"] + cols[0] + cols[1], x.shape[-1])
        dst = self.temp(op.name + "/padded", shape, x.scale, x.zero_point)
        pt = self.g.add_tensor(op.name + "/paddings", (4, 2), np.int32, data=paddings)
        if value is None:
            self.op("PAD", [src, pt], [dst], options("PadOptions"))
        else:
            fill = self.g.add_tensor(op.name + "/pad_value", (), np.int8, data=np.array(value, np.int8),
                                     scale=np.float32(x.scale), zero_point=x.zero_point)
            self.op("PADV2", [src, pt, fill], [dst], options("PadV2Options"))
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
        dst, act = self.out(op)
        common = dict(padding=pad, strideH=a["stride_h"], strideW=a["stride_w"], dilationHFactor=a["dil_h"],
                      dilationWFactor=a["dil_w"], fusedActivationFunction=act)
        bias = self.g.add_tensor(op.name + "/bias", (a["out_c"],), np.int32, data=op.arrays["bias"],
                                 scale=np.float32(x.scale) * s_w, zero_point=0)
        if a["groups"] == 1:
            wt = self.g.add_tensor(op.name + "/weights", w.shape, np.int8, data=w, scale=s_w, zero_point=0,
                                   quantized_dimension=0)
            self.op("CONV_2D", [src, wt, bias], [dst], options("Conv2DOptions", **common))
        elif a["groups"] != a["in_c"]:
            self._grouped_conv(op, src, dst, s_w, common)
        elif a["out_c"] % a["in_c"] == 0:
            # NOTE: depthwise: ONNX (out, 1, kh, kw) -> IR (out, kh, kw, 1) -> TFLite (1, kh, kw, out).
            wd = np.ascontiguousarray(w.transpose(3, 1, 2, 0))
            wt = self.g.add_tensor(op.name + "/weights", wd.shape, np.int8, data=wd, scale=s_w, zero_point=0,
                                   quantized_dimension=3)
            self.op("DEPTHWISE_CONV_2D", [src, wt, bias], [dst],
                    options("DepthwiseConv2DOptions", depthMultiplier=a["out_c"] // a["in_c"], **common))

    def _grouped_conv(self, op: Any, src: int, dst: int, s_w: np.ndarray, common: dict[str, Any]) -> None:
        """A grouped (not depthwise) conv as SPLIT on channels, one CONV_2D per group, CONCATENATION.

        NOTE: TFLM's CONV_2D takes no groups; per group it is the same arithmetic on a slice of the
        channels (exact), and the concatenation copies outputs already on the output's grid.
        """
        a, g = op.attrs, op.attrs["groups"]
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        w, b = op.arrays["weights"], op.arrays["bias"]
        cout_g = a["out_c"] // g
        shape = list(self.g.tensors[src].shape)
        shape[3] //= g
        parts = [self.temp(f"{op.name}/in{i}", tuple(shape), x.scale, x.zero_point) for i in range(g)]
        axis = self.g.add_tensor(op.name + "/split_axis", (), np.int32, data=np.array(3, np.int32))
        self.op("SPLIT", [axis, src], parts, options("SplitOptions", numSplits=g))
        outs = []
        for i, part in enumerate(parts):
            sl = slice(i * cout_g, (i + 1) * cout_g)
            wt = self.g.add_tensor(f"{op.name}/weights{i}", w[sl].shape, np.int8, data=w[sl], scale=s_w[sl],
                                   zero_point=0, quantized_dimension=0)
            bt = self.g.add_tensor(f"{op.name}/bias{i}", (cout_g,), np.int32, data=b[sl],
                                   scale=np.float32(x.scale) * s_w[sl], zero_point=0)
            outs.append(self.temp(f"{op.name}/out{i}", (*y.shape[:3], cout_g), y.scale, y.zero_point))
            self.op("CONV_2D", [part, wt, bt], [outs[-1]], options("Conv2DOptions", **common))
        self.concatenate(outs, dst, axis=3, name=op.name)

    def fully_connected(self, op: Any) -> None:
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        s_w = weight_scales(op, x.scale, y.scale)
        w = op.arrays["weights"]
        wt = self.g.add_tensor(op.name + "/weights", w.shape, np.int8, data=w, scale=s_w, zero_point=0)
        bias = self.g.add_tensor(op.name + "/bias", (w.shape[0],), np.int32, data=op.arrays["bias"],
                                 scale=np.float32(x.scale) * s_w, zero_point=0)
        dst, act = self.out(op)
        self.op("FULLY_CONNECTED", [self.act(x.name), wt, bias], [dst],
                options("FullyConnectedOptions", fusedActivationFunction=act))

    def add(self, op: Any) -> None:
        ins = [self.act(n) for n in op.inputs]
        dst, act = self.out(op)
        self.op("ADD", ins, [dst], options("AddOptions", fusedActivationFunction=act))

    def _pool(self, op: Any, code: str, *, can_pad: bool, fill: int | None = None, always_pad: bool = False) -> None:
        """Pooling. Pads TFLite SAME/VALID cannot express (``ceil_mode`` windows) become an explicit
        pad of ``fill`` (``None``: the zero point) when ``can_pad``; else an error names the node."""
        a = op.attrs
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        src = self.act(x.name)
        try:
            if always_pad:
                raise EdgekilnError("explicit pad")
            pad = _padding(op.name, a, (a["in_h"], a["in_w"]), (a["k_h"], a["k_w"]))
        except EdgekilnError:
            if not can_pad:
                raise
            src, pad = self.explicit_pad(op, src, fill), 1
        opts = options("Pool2DOptions", padding=pad, strideH=a["stride_h"], strideW=a["stride_w"],
                       filterHeight=a["k_h"], filterWidth=a["k_w"])
        if (x.scale, x.zero_point) == (y.scale, y.zero_point):
            self.op(code, [src], [self.act(y.name)], opts)
            return
        # NOTE: TFLite int8 pooling requires equal in/out quantization: pool, then requantize.
        tmp = self.temp(op.output + "/pooled", y.shape, x.scale, x.zero_point)
        self.op(code, [src], [tmp], opts)
        self.requantize_to(tmp, op.output + "/pooled", y.shape, y.scale, y.zero_point, self.act(y.name))

    def max_pool(self, op: Any) -> None:
        self._pool(op, "MAX_POOL_2D", can_pad=True, fill=-128)

    def avg_pool(self, op: Any) -> None:
        a = op.attrs
        unpadded = a["pad_top"] == 0 and a["pad_left"] == 0
        whole = [axis for axis, (o, i, k) in ((1, ("out_h", "in_h", "k_h")), (2, ("out_w", "in_w", "k_w")))
                 if a[o] == 1 and a[k] == a[i]]
        kept = all(a[k] == 1 and a[s] == 1 and a[o] == a[i] for o, i, k, s in
                   (("out_h", "in_h", "k_h", "stride_h"), ("out_w", "in_w", "k_w", "stride_w"))
                   if (1 if o == "out_h" else 2) not in whole)
        if unpadded and whole and kept:
            spatial.mean(self, op, whole)
            return
        # NOTE: TFLite's average divides by the window's count of input elements, as ONNX's
        # count_include_pad=0 does, so SAME padding matches it, and other pads (ceil_mode) cannot be
        # written as a PAD (the pad would be counted). With count_include_pad=1 an explicit PAD of
        # real 0 is exact, and needed wherever there are pads.
        include = bool(a["count_include_pad"])
        valid = all(a[o] == (a[i] - a[k]) // a[st] + 1 for o, i, k, st in
                    (("out_h", "in_h", "k_h", "stride_h"), ("out_w", "in_w", "k_w", "stride_w")))
        unpadded = valid and not (a["pad_top"] or a["pad_left"])
        self._pool(op, "AVERAGE_POOL_2D", can_pad=include, always_pad=include and not unpadded)

    def reshape_to(self, src: int, dst: int, shape: tuple[int, ...], name: str) -> None:
        s = self.g.add_tensor(name + "/shape", (len(shape),), np.int32, data=np.array(shape, np.int32))
        self.op("RESHAPE", [src, s], [dst], options("ReshapeOptions", newShape=[int(d) for d in shape]))

    def reshape(self, op: Any) -> None:
        y = self.ir.tensors[op.output]
        self.reshape_to(self.act(op.inputs[0]), self.act(op.output), y.shape, op.name)

    def transpose_nchw(self, op: Any) -> None:
        a, x = op.attrs, self.ir.tensors[op.inputs[0]]
        nhwc = self.temp(op.name + "/nhwc", (1, a["height"], a["width"], a["channels"]), x.scale, x.zero_point)
        nchw = self.temp(op.name + "/nchw", (1, a["channels"], a["height"], a["width"]), x.scale, x.zero_point)
        self.reshape_to(self.act(x.name), nhwc, (1, a["height"], a["width"], a["channels"]), op.name + "/in")
        perm = self.g.add_tensor(op.name + "/perm", (4,), np.int32, data=np.array([0, 3, 1, 2], np.int32))
        self.op("TRANSPOSE", [nhwc, perm], [nchw], options("TransposeOptions"))
        self.reshape_to(nchw, self.act(op.output), self.ir.tensors[op.output].shape, op.name + "/out")

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
        self.concatenate(ins, self.act(y.name), axis=op.attrs.get("axis", len(y.shape) - 1), name=op.name)

    def concatenate(self, ins: list[int], dst: int, *, axis: int, name: str) -> None:
        """CONCATENATION of ``ins`` (same quantization as ``dst``), in groups TFLM accepts.

        NOTE: TFLM's kernel takes at most :data:`MAX_CONCAT_INPUTS` inputs; more are joined in
        groups first (a copy each, exact: every input is on the output's grid already).
        """
        while len(ins) > MAX_CONCAT_INPUTS:
            group, ins = ins[:MAX_CONCAT_INPUTS], ins[MAX_CONCAT_INPUTS:]
            shapes = [self.g.tensors[i].shape for i in group]
            shape = list(shapes[0])
            shape[axis] = sum(sh[axis] for sh in shapes)
            t = self.g.tensors[dst]
            part = self.g.add_tensor(f"{name}/part{len(self.g.tensors)}", tuple(shape), np.dtype(t.dtype),
                                     scale=t.scale, zero_point=t.zero_point)
            self.op("CONCATENATION", group, [part], options("ConcatenationOptions", axis=axis))
            ins = [part, *ins]
        self.op("CONCATENATION", ins, [dst], options("ConcatenationOptions", axis=axis))

    def requantize(self, op: Any) -> None:
        x, y = self.ir.tensors[op.inputs[0]], self.ir.tensors[op.output]
        dst, act = self.out(op)
        if act == activation_code(None):
            self.requantize_to(self.act(x.name), op.name, y.shape, y.scale, y.zero_point, dst)
            return
        self.op("RELU" if act == activation_code("RELU") else "RELU6", [self.act(x.name)], [dst])


#: the kinds lowered by functions in sibling modules (the rest are :class:`Lowering` methods).
_MODULE_KINDS = {kind: fn for kind, (fn, _) in (elementwise.KINDS | movement.KINDS | spatial.KINDS).items()}


def to_tflite_bytes(graph: Any, *, description: str = "edgekiln int8", inputs: list[str] | None = None,
                    float_islands: bool = False) -> bytes:
    """Lower an :class:`~edgekiln.codegen.ir.IntGraph` to ``.tflite`` bytes.

    ``inputs`` (default: the graph's inputs, in ONNX order) names the IR tensors that become
    ``.tflite`` inputs, e.g. both operands when one two-input op is checked alone. Raises
    :class:`EdgekilnError` naming the op kind and node for anything outside
    :data:`SUPPORTED_KINDS` or a configuration TFLite cannot express. ``float_islands``: write the
    float islands that have a float form (``Op.float_form``) as DEQUANTIZE, the float op, QUANTIZE,
    for CPU runtimes (LiteRT); the default, exact tables, is what TFLite Micro runs bit for bit.
    """
    low = Lowering(graph, float_islands=float_islands)
    whole = inputs is None
    inputs = inputs or list(graph.inputs)
    for name in inputs:
        low.act(name)
    if whole:  # NOTE: the .tflite inputs carry the ONNX input names, so feeds by name keep working
        for name, (onnx_name, _) in zip(inputs, graph.onnx_inputs, strict=True):
            low.g.tensors[low.ids[name]].name = onnx_name
    for op in graph.ops:
        method = _MODULE_KINDS.get(op.kind)
        if method is None and op.kind in SUPPORTED_KINDS:
            method = getattr(Lowering, op.kind)
        if method is None:
            raise EdgekilnError(f"op {op.kind} (node {op.name!r}) is not supported by the TFLite writer; "
                                f"supported: {', '.join(SUPPORTED_KINDS)}")
        method(low, op)
        low.flush_clamp()
    # NOTE: several outputs are separate .tflite outputs in the ONNX graph's order (the C
    # library packs them into one buffer instead).
    return low.g.to_bytes(inputs=[low.ids[n] for n in inputs], outputs=[low.act(o) for o in graph.outputs],
                          description=description)


def write_tflite(graph: Any, path: str | Path, *, float_islands: bool = False) -> Path:
    """Write ``graph`` (an IntGraph) as an int8 ``.tflite`` file atomically; returns the path
    (``float_islands``: see :func:`to_tflite_bytes`)."""
    return atomic_write_bytes(path, to_tflite_bytes(graph, float_islands=float_islands))
