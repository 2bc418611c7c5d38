"""Per-node lowering of QDQ ONNX nodes to integer :class:`~edgekiln.codegen.ir.Op` records.

Every function here runs at export time and computes the integer constants a kernel needs
(OHWI weights, int32 biases, per-channel multipliers and shifts, lookup tables); the kernels
themselves are in :mod:`edgekiln.codegen.reference` (numpy) and ``c/ek_kernels.c`` (C).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgekiln.codegen import lower_binary, lower_movement, lower_pointwise, lower_reduce, lower_spatial
from edgekiln.codegen.binary32 import binary32_multiplier, onnx_qlinear_scale
from edgekiln.codegen.ir import IntGraph, LowerContext, Op, QTensor, activation_qparams
from edgekiln.errors import EdgekilnError
from edgekiln.quant.fixed_point import quantize_multiplier

#: left shift applied to both Add inputs before rescaling (TFLM uses the same headroom).
ADD_LEFT_SHIFT = 20
#: fixed-point bits of the softmax exp() lookup table.
SOFTMAX_LUT_BITS = 16


def node_attr(node: Any, name: str, default: Any) -> Any:
    """The value of ONNX attribute ``name`` of ``node``, or ``default``."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_label(node: Any) -> str:
    """``"OpType (node 'name')"`` for error messages."""
    return f"{node.op_type} (node {node.name or node.output[0]!r})"


def act_input(ctx: LowerContext, node: Any, i: int, *, flat_ok: bool = False) -> QTensor:
    """The int8 tensor behind input ``i`` of ``node`` (a DequantizeLinear output); an error for a float path."""
    name = node.input[i]
    if name not in ctx.act_dq:
        from edgekiln.codegen.lower_island import float_source

        raise EdgekilnError(f"input {name!r} of {node_label(node)} is not a dequantized int8 tensor "
                            f"(a float path in the QDQ model{float_source(ctx, name)})")
    t = ctx.graph.tensors[ctx.act_dq[name]]
    if t.nchw_flatten_of is not None and not flat_ok:
        t = ctx.graph.tensors[emit_nchw_transpose(ctx, t.name)]
    return t


def const_input(ctx: LowerContext, node: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(stored values, scale, zero point, axis)`` of constant input ``i`` (dequantized or float)."""
    name = node.input[i]
    if name in ctx.const_dq:
        return ctx.const_dq[name]
    if name in ctx.inits:  # a float constant left unquantized (e.g. a bias)
        a = np.asarray(ctx.inits[name])
        return a, np.ones(1), np.zeros(1, np.int32), 0
    raise EdgekilnError(f"input {name!r} of {node_label(node)} must be a constant (weight or bias)")


def act_output(ctx: LowerContext, node: Any, shape: tuple[int, ...], name_suffix: str = "") -> QTensor:
    """Register the int8 tensor the QuantizeLinear after ``node`` produces, in C layout ``shape``."""
    qs = ctx.q_of.get(node.output[0], [])
    if not qs:
        from edgekiln.codegen.lower_island import unsupported_reader

        blocker = unsupported_reader(ctx, node.output[0])
        raise EdgekilnError(f"output of {node_label(node)} is not quantized (no QuantizeLinear follows it)"
                            + (f": it feeds {blocker}, which the C backend does not support" if blocker else ""))
    scale, zp = activation_qparams(ctx, qs[0])
    name = qs[0].output[0] + name_suffix
    t = QTensor(name, tuple(int(d) for d in shape), scale, zp)
    ctx.graph.tensors[name] = t
    return t


def _new(ctx: LowerContext, name: str, shape: tuple[int, ...], scale: float, zp: int) -> QTensor:
    t = QTensor(name, tuple(int(d) for d in shape), scale, zp)
    ctx.graph.tensors[name] = t
    return t


def quantize_value(v: float, t: QTensor) -> int:
    """Quantize one float as QuantizeLinear does (round half to even, saturate to int8)."""
    return int(np.clip(np.rint(v / t.scale) + t.zero_point, -128, 127))


def _mult(real: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    pairs = [quantize_multiplier(float(r)) for r in np.atleast_1d(real)]
    return (np.array([p[0] for p in pairs], dtype=np.int32), np.array([p[1] for p in pairs], dtype=np.int32))


def weight_scales(node: Any, scale: np.ndarray, zp: np.ndarray, n: int) -> np.ndarray:
    if np.any(np.asarray(zp) != 0):
        raise EdgekilnError(f"weights of {node_label(node)} have a non-zero zero point; C export needs symmetric "
                            "int8 weights")
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    return np.broadcast_to(scale, (n,)).copy() if scale.size == 1 else scale


def int32_bias(ctx: LowerContext, node: Any, idx: int, n: int, acc_scale: np.ndarray) -> np.ndarray:
    if len(node.input) <= idx or not node.input[idx]:
        return np.zeros(n, dtype=np.int32)
    q, scale, zp, _ = const_input(ctx, node, idx)
    real = (np.asarray(q, np.float64).reshape(-1) - np.asarray(zp, np.float64).reshape(-1)) * \
        np.asarray(scale, np.float64).reshape(-1)
    # NOTE: ORT stores bias as int32 with scale s_in*s_w, so this division gives back the
    # stored integers exactly; it also covers a float bias left unquantized.
    return np.rint(real / acc_scale).astype(np.int32)


def _pool_axis(n: int, k: int, s: int, pads: list[int], axis: int, ceil: bool) -> int:
    """Output length of one pooled axis; with ``ceil_mode`` a window must start inside the input
    or its leading padding (ONNX and PyTorch drop one that would start in the trailing padding)."""
    span = n + pads[axis] + pads[axis + 2] - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + pads[axis]:
        out -= 1
    return out


def _auto_pads(node: Any, h: int, w: int, kernel: tuple[int, int], strides: list[int]) -> list[int]:
    mode = node_attr(node, "auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        return list(node_attr(node, "pads", [0, 0, 0, 0]))
    if mode == "VALID":
        return [0, 0, 0, 0]
    total = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip((h, w), kernel, strides, strict=True)]
    head = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in total]
    return [head[0], head[1], total[0] - head[0], total[1] - head[1]]


def _pool_geometry(node: Any, x: QTensor, kernel: tuple[int, int]) -> dict[str, int]:
    if any(d != 1 for d in node_attr(node, "dilations", [1, 1])):
        raise EdgekilnError(f"{node_label(node)}: pooling dilation is not supported by the C backend")
    if len(x.shape) != 4:
        raise EdgekilnError(f"{node_label(node)}: pooling needs a 4-D input, got {x.shape}")
    _, h, w, c = x.shape
    strides = list(node_attr(node, "strides", [1, 1]))
    pads = _auto_pads(node, h, w, kernel, strides)
    ceil = bool(node_attr(node, "ceil_mode", 0))
    out_h = _pool_axis(h, kernel[0], strides[0], pads, 0, ceil)
    out_w = _pool_axis(w, kernel[1], strides[1], pads, 1, ceil)
    return dict(in_h=h, in_w=w, channels=c, out_h=out_h, out_w=out_w, k_h=kernel[0], k_w=kernel[1],
                stride_h=strides[0], stride_w=strides[1], pad_top=pads[0], pad_left=pads[1],
                pad_bottom=pads[2], pad_right=pads[3])


def lower_node(ctx: LowerContext, node: Any) -> None:
    """Append the integer op(s) for one float ONNX node sitting between DQ inputs and a Q output."""
    {**dict.fromkeys(lower_movement.MOVEMENT_OPS, lower_movement.lower_movement),
     "Conv": _conv, "Gemm": _fc, "MatMul": _fc, "Add": _add, "Relu": _clamp, "Clip": _clamp,
     "MaxPool": _maxpool, "AveragePool": _avgpool, "GlobalAveragePool": _avgpool, "Flatten": _reshape,
     "Reshape": _reshape, "Concat": _concat, "Softmax": _softmax, "ReduceMean": _avgpool,
     "BatchNormalization": lower_pointwise.lower_batchnorm,
     "Pad": lower_spatial.lower_pad, "Resize": lower_spatial.lower_resize,
     "ConvTranspose": lower_spatial.lower_conv_transpose,
     "Mul": lower_binary.lower_mul, "Sub": lower_binary.lower_add_sub, "Div": _binary_data, "PRelu": _binary_data,
     **dict.fromkeys(lower_pointwise.UNARY_FUNCS, lower_pointwise.lower_unary)}[node.op_type](ctx, node)


def _binary_data(ctx: LowerContext, node: Any) -> None:
    raise EdgekilnError(f"{node_label(node)}: both operands are computed tensors; the C backend lowers "
                        f"{node.op_type} only with a constant operand (as a lookup table)")


def _conv(ctx: LowerContext, node: Any) -> None:
    x = act_input(ctx, node, 0)
    wq, ws, wz, _ = const_input(ctx, node, 1)
    if wq.dtype != np.int8 or wq.ndim != 4:
        raise EdgekilnError(f"{node_label(node)}: weights must be 2-D convolution int8 weights, got {wq.dtype} "
                            f"{wq.shape}")
    if node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise EdgekilnError(f"{node_label(node)}: auto_pad is not supported; export with explicit pads")
    cout, cin_g, kh, kw = wq.shape
    groups = int(node_attr(node, "group", 1))
    _, h, w, cin = x.shape
    if cin_g * groups != cin:
        raise EdgekilnError(f"{node_label(node)}: weight shape {wq.shape} does not match {cin} input channels")
    pads = list(node_attr(node, "pads", [0, 0, 0, 0]))
    strides = list(node_attr(node, "strides", [1, 1]))
    dil = list(node_attr(node, "dilations", [1, 1]))
    out_h = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (w + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    bn = lower_pointwise.bn_after(ctx, node)
    y = act_output(ctx, bn or node, (1, out_h, out_w, cout))
    s_w = weight_scales(node, ws, wz, cout)
    weights = np.ascontiguousarray(wq.transpose(0, 2, 3, 1))
    bias = int32_bias(ctx, node, 2, cout, x.scale * s_w)
    if bn is not None:
        weights, bias, s_w = lower_pointwise.fold_bn_into_conv(ctx, bn, weights, bias, x.scale, s_w)
    # NOTE: conv and FC requantize as binary32 arithmetic rounds (float32 scale, 24-bit
    # significand, ties to even), emulated in integers: bit-exact with onnxruntime's QLinearConv.
    # The 31-bit fixed-point multiplier rounds exactly instead and diverged on ~1e-6 of the
    # outputs per layer, which grew to ~1% of the MobileNet-style logits (see binary32.py).
    mult, shift = binary32_multiplier(onnx_qlinear_scale(x.scale, s_w, y.scale))
    ctx.graph.ops.append(Op(
        "conv2d", node.name or node.output[0], [x.name], y.name,
        attrs=dict(in_h=h, in_w=w, in_c=cin, out_h=out_h, out_w=out_w, out_c=cout, k_h=kh, k_w=kw,
                   stride_h=strides[0], stride_w=strides[1], dil_h=dil[0], dil_w=dil[1], pad_top=pads[0],
                   pad_left=pads[1], groups=groups, input_zp=x.zero_point, output_zp=y.zero_point,
                   act_min=-128, act_max=127),
        arrays=dict(weights=weights, bias=bias, mult=mult, shift=shift),
        macs=out_h * out_w * cout * kh * kw * cin_g, weight_scale=s_w.astype(np.float32)))


def _fc(ctx: LowerContext, node: Any) -> None:
    x = act_input(ctx, node, 0, flat_ok=True)
    wq, ws, wz, axis = const_input(ctx, node, 1)
    if wq.dtype != np.int8 or wq.ndim != 2 or len(x.shape) != 2:
        raise EdgekilnError(f"{node_label(node)}: needs a 2-D int8 weight and a 2-D input, got {wq.shape} and "
                            f"{x.shape}")
    if node.op_type == "Gemm":
        if node_attr(node, "transA", 0) or node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0:
            raise EdgekilnError(f"{node_label(node)}: only Gemm with transA=0, alpha=beta=1 is supported")
        w = wq if node_attr(node, "transB", 0) else wq.T
    else:
        w = wq.T
    n_out, n_in = w.shape
    if n_in != x.shape[1]:
        raise EdgekilnError(f"{node_label(node)}: weight {wq.shape} does not match input features {x.shape[1]}")
    if x.nchw_flatten_of is not None:
        c, h, wd = x.nchw_flatten_of
        # NOTE: ONNX flattened C,H,W; the C tensor is H,W,C: permute the columns once, here.
        w = w.reshape(n_out, c, h, wd).transpose(0, 2, 3, 1).reshape(n_out, n_in)
    y = act_output(ctx, node, (1, n_out))
    s_w = weight_scales(node, ws, wz, n_out)
    mult, shift = binary32_multiplier(onnx_qlinear_scale(x.scale, s_w, y.scale))
    bias_idx = 2 if node.op_type == "Gemm" else 99
    ctx.graph.ops.append(Op(
        "fully_connected", node.name or node.output[0], [x.name], y.name,
        attrs=dict(in_features=n_in, out_features=n_out, input_zp=x.zero_point, output_zp=y.zero_point,
                   act_min=-128, act_max=127),
        arrays=dict(weights=np.ascontiguousarray(w), bias=int32_bias(ctx, node, bias_idx, n_out, x.scale * s_w),
                    mult=mult, shift=shift),
        macs=n_in * n_out, weight_scale=s_w.astype(np.float32)))


def _add(ctx: LowerContext, node: Any) -> None:
    if any(i in ctx.gates or i in ctx.const_dq for i in node.input[:2]):  # a float or constant operand
        lower_binary.lower_add_sub(ctx, node)
        return
    a, b = act_input(ctx, node, 0), act_input(ctx, node, 1)
    if a.shape != b.shape:  # broadcast
        lower_binary.lower_add_sub(ctx, node)
        return
    y = act_output(ctx, node, a.shape)
    twice_max = 2.0 * max(a.scale, b.scale)
    am, ash = quantize_multiplier(a.scale / twice_max)
    bm, bsh = quantize_multiplier(b.scale / twice_max)
    om, osh = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * y.scale))
    ctx.graph.ops.append(Op(
        "add", node.name or node.output[0], [a.name, b.name], y.name,
        attrs=dict(size=a.size, a_zp=a.zero_point, b_zp=b.zero_point, output_zp=y.zero_point,
                   left_shift=ADD_LEFT_SHIFT, a_mult=am, a_shift=ash, b_mult=bm, b_shift=bsh,
                   out_mult=om, out_shift=osh, act_min=-128, act_max=127),
        macs=a.size))


def emit_requantize(ctx: LowerContext, name: str, x: QTensor, y: QTensor, lo: int = -128,
                    hi: int = 127) -> None:
    m, s = quantize_multiplier(x.scale / y.scale)
    ctx.graph.ops.append(Op(
        "requantize", name, [x.name], y.name,
        attrs=dict(size=x.size, input_zp=x.zero_point, output_zp=y.zero_point, mult=m, shift=s,
                   act_min=lo, act_max=hi), macs=x.size))


def _clamp(ctx: LowerContext, node: Any) -> None:
    x = act_input(ctx, node, 0)
    y = act_output(ctx, node, x.shape)
    if node.op_type == "Relu":
        lo_f, hi_f = 0.0, math.inf
    else:
        lo_f = node_attr(node, "min", -math.inf)
        hi_f = node_attr(node, "max", math.inf)
        for idx, which in ((1, "min"), (2, "max")):
            if len(node.input) > idx and node.input[idx]:
                name = node.input[idx]
                if name not in ctx.inits:
                    raise EdgekilnError(f"{node_label(node)}: Clip {which} must be a constant")
                val = float(np.asarray(ctx.inits[name]).reshape(()))
                lo_f, hi_f = (val, hi_f) if which == "min" else (lo_f, val)
    lo = -128 if lo_f == -math.inf else quantize_value(lo_f, y)
    hi = 127 if hi_f == math.inf else quantize_value(hi_f, y)
    emit_requantize(ctx, node.name or node.output[0], x, y, lo, hi)


def _maybe_requant_after(ctx: LowerContext, node: Any, x: QTensor, shape: tuple[int, ...]) -> tuple[QTensor, QTensor | None]:
    """Output tensor for a scale-preserving op; a second tensor if ORT gave it new qparams.

    An output with no QuantizeLinear (inside a float island's tail, lower_island.py) keeps the
    input's qparams and is registered for the next op to read."""
    if not ctx.q_of.get(node.output[0]):
        t = _new(ctx, node.output[0] + "__int8", shape, x.scale, x.zero_point)
        ctx.act_dq[node.output[0]] = t.name
        return t, None
    probe = act_output(ctx, node, shape)
    if probe.scale == x.scale and probe.zero_point == x.zero_point:
        return probe, None
    del ctx.graph.tensors[probe.name]
    pre = _new(ctx, probe.name + "_pre", shape, x.scale, x.zero_point)
    ctx.graph.tensors[probe.name] = probe
    return pre, probe


def _maxpool(ctx: LowerContext, node: Any) -> None:
    x = act_input(ctx, node, 0)
    geo = _pool_geometry(node, x, tuple(node_attr(node, "kernel_shape", [1, 1])))
    del geo["pad_bottom"], geo["pad_right"]  # only the output size depends on them
    shape = (1, geo["out_h"], geo["out_w"], geo["channels"])
    y, final = _maybe_requant_after(ctx, node, x, shape)
    ctx.graph.ops.append(Op("max_pool", node.name or node.output[0], [x.name], y.name, attrs=geo,
                            macs=y.size * geo["k_h"] * geo["k_w"]))
    if final is not None:
        emit_requantize(ctx, (node.name or node.output[0]) + "_requant", y, final)


def _avgpool(ctx: LowerContext, node: Any) -> None:
    if node.input[0] in ctx.gates:  # the mean of a float activation (an SE squeeze)
        lower_binary.lower_float_mean(ctx, node)
        return
    x = act_input(ctx, node, 0)
    if node.op_type == "ReduceMean" and lower_reduce.reduce_axes(ctx, node, len(x.shape)) != [2, 3]:
        lower_reduce.lower_reduce_mean(ctx, node, x)  # a mean over other axes (one contiguous block)
        return
    out_shape = None
    if node.op_type in ("GlobalAveragePool", "ReduceMean"):
        if len(x.shape) != 4:
            raise EdgekilnError(f"{node_label(node)}: needs a 4-D input, got {x.shape}")
        if node.op_type == "ReduceMean":
            out_shape = lower_reduce.reduce_mean_hw_shape(ctx, node, x)
        geo = dict(in_h=x.shape[1], in_w=x.shape[2], channels=x.shape[3], out_h=1, out_w=1, k_h=x.shape[1],
                   k_w=x.shape[2], stride_h=1, stride_w=1, pad_top=0, pad_left=0)
        include_pad = 1
    else:
        geo = _pool_geometry(node, x, tuple(node_attr(node, "kernel_shape", [1, 1])))
        include_pad = int(node_attr(node, "count_include_pad", 0))
        for o, k, s, p, n, e, axis in (("out_h", "k_h", "stride_h", "pad_top", "in_h", "pad_bottom", "H"),
                                       ("out_w", "k_w", "stride_w", "pad_left", "in_w", "pad_right", "W")):
            if include_pad and (geo[o] - 1) * geo[s] - geo[p] + geo[k] > geo[n] + geo[e]:
                # NOTE: ORT then divides by the window clipped to the padded extent; the kernel
                # divides by k_h*k_w. Rare (ceil_mode with count_include_pad): refused, not approximated.
                raise EdgekilnError(f"{node_label(node)}: count_include_pad=1 with a ceil_mode window past the "
                                    f"padding along {axis} is not supported by the C backend")
        del geo["pad_bottom"], geo["pad_right"]
    y = act_output(ctx, node, out_shape or (1, geo["out_h"], geo["out_w"], geo["channels"]))
    k = geo["k_h"] * geo["k_w"]
    # NOTE: avg = s_in/s_out * sum / count + zo is ONE exact rational rounding (half to even,
    # zero point included, as ORT's QLinearAveragePool rounds), not a fixed-point 1/count: with
    # equal scales the window sums hit exact .5 ties often (count 2, 4, 6), and half-up or
    # adding an odd zero point after rounding would differ from ORT on up to ~30% of them.
    m, sh = quantize_multiplier(x.scale / y.scale)
    if (31 - sh) + int(k).bit_length() > 55:  # count << t, times |zero point| <= 128, stays in int64
        raise EdgekilnError(f"{node_label(node)}: scale ratio {x.scale / y.scale:.3g} is too small for the kernel")
    ctx.graph.ops.append(Op(
        "avg_pool", node.name or node.output[0], [x.name], y.name,
        attrs=dict(geo, count_include_pad=include_pad, input_zp=x.zero_point, output_zp=y.zero_point,
                   mult=m, shift=sh),
        macs=y.size * k))


def _reshape(ctx: LowerContext, node: Any) -> None:
    try:
        _flatten_style_reshape(ctx, node)
    except EdgekilnError:
        lower_movement.lower_movement(ctx, node)  # a reshape that moves bytes in NHWC: a gather


def _flatten_style_reshape(ctx: LowerContext, node: Any) -> None:
    x = act_input(ctx, node, 0, flat_ok=True)
    onnx_in = x.shape if len(x.shape) != 4 else (1, x.shape[3], x.shape[1], x.shape[2])
    if node.op_type == "Flatten":
        axis = int(node_attr(node, "axis", 1))
        axis = axis + len(onnx_in) if axis < 0 else axis
        target = (int(np.prod(onnx_in[:axis])), int(np.prod(onnx_in[axis:])))
    else:
        spec = [int(v) for v in np.asarray(ctx.inits.get(node.input[1], [])).reshape(-1)]
        if not spec:
            raise EdgekilnError(f"{node_label(node)}: the target shape must be a constant")
        spec = [onnx_in[i] if v == 0 else v for i, v in enumerate(spec)]
        if -1 in spec:
            known = int(np.prod([v for v in spec if v != -1]))
            spec[spec.index(-1)] = int(np.prod(onnx_in)) // known
        target = tuple(spec)
    if target[0] != 1 or int(np.prod(target)) != int(np.prod(onnx_in)):
        raise EdgekilnError(f"{node_label(node)}: cannot reshape {onnx_in} to {target} in the C backend")
    nchw_src = None
    if len(x.shape) == 4 and len(target) == 2:
        _, h, w, c = x.shape
        nchw_src = (c, h, w) if (h * w > 1 and c > 1) else None
    elif len(target) == 4 or (x.nchw_flatten_of is not None) or len(target) != 2:
        if tuple(target) != tuple(onnx_in):
            raise EdgekilnError(f"{node_label(node)}: reshape {onnx_in} -> {target} changes the memory order in "
                                "NHWC; only flatten-style reshapes are supported")
    else:
        nchw_src = x.nchw_flatten_of
    shape = tuple(target) if len(target) != 4 else (1, target[2], target[3], target[1])
    y, final = _maybe_requant_after(ctx, node, x, shape)
    y.nchw_flatten_of = nchw_src
    ctx.graph.ops.append(Op("reshape", node.name or node.output[0], [x.name], y.name, attrs=dict(size=x.size)))
    if final is not None:
        final.nchw_flatten_of = nchw_src
        emit_requantize(ctx, (node.name or node.output[0]) + "_requant", y, final)


def _concat(ctx: LowerContext, node: Any) -> None:
    """Concat along any axis: in the C layout each input is ``outer`` rows of a contiguous chunk (its
    channels for a channel concat; a whole block for a concat along H, or along an axis of a 3-D
    tensor), and the kernel interleaves the chunks row by row. A quantized constant input (a ViT's class
    token) is a ``constant`` tensor (lower_binary.constant_tensor)."""
    for name in node.input:
        if name in ctx.const_dq and name not in ctx.act_dq:
            ctx.act_dq[name] = lower_binary.constant_tensor(ctx, node, name)
    xs = [act_input(ctx, node, i) for i in range(len(node.input))]
    rank = len(xs[0].shape)
    axis = int(node_attr(node, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    c_axis = lower_reduce.c_axis(axis, rank)
    if any(len(t.shape) != rank or t.shape[:c_axis] + t.shape[c_axis + 1:] !=
           xs[0].shape[:c_axis] + xs[0].shape[c_axis + 1:] for t in xs):
        raise EdgekilnError(f"{node_label(node)}: inputs of shapes {[t.shape for t in xs]} (C layout) differ "
                            f"along an axis other than the concatenated one")
    chunks = np.array([int(np.prod(t.shape[c_axis:])) for t in xs], dtype=np.int32)
    shape = list(xs[0].shape)
    shape[c_axis] = sum(t.shape[c_axis] for t in xs)
    y = act_output(ctx, node, tuple(shape))
    mult, shift = _mult(np.array([t.scale / y.scale for t in xs]))
    ctx.graph.ops.append(Op(
        "concat", node.name or node.output[0], [t.name for t in xs], y.name,
        attrs=dict(outer=int(np.prod(xs[0].shape[:c_axis])), out_c=int(chunks.sum()), n_inputs=len(xs),
                   output_zp=y.zero_point, axis=c_axis),
        arrays=dict(channels=chunks, zps=np.array([t.zero_point for t in xs], dtype=np.int32),
                    mult=mult, shift=shift)))


def _softmax(ctx: LowerContext, node: Any) -> None:
    x = act_input(ctx, node, 0)
    axis = int(node_attr(node, "axis", -1))
    rank = len(x.shape)
    axis = axis + rank if axis < 0 else axis
    if not ((rank == 2 and axis == 1) or (rank == 4 and axis == 1)):
        raise EdgekilnError(f"{node_label(node)}: only Softmax over the channels (axis 1) of a 2-D or 4-D "
                            "tensor is supported")
    y = act_output(ctx, node, x.shape)
    # NOTE: in NHWC the channels of each pixel are contiguous: a 4-D softmax over axis 1 is rows = H*W
    rows, depth = (x.shape[0], x.shape[1]) if rank == 2 else (x.shape[1] * x.shape[2], x.shape[3])
    # NOTE: integer softmax. exp(-d * s_in) for the 256 possible differences d = max - x is a
    # Q16 table built here; at run time q = zp + round(T[d] / (s_out * sum T)) with one exact
    # 64-bit integer division: no float and no exp() on the device.
    lut = np.array([round(math.exp(-d * x.scale) * (1 << SOFTMAX_LUT_BITS)) for d in range(256)], np.int32)
    # NOTE: onnxruntime fuses DQ -> Softmax -> Q into QLinearSoftmax, which multiplies by
    # floor(1 / s_out), not 1 / s_out (MTCNN R-Net: 256 instead of 256.63, so 4 of 16 outputs came
    # out 1 LSB apart). The C library reproduces what the QDQ model computes where users run it.
    inv_scale = float(math.floor(1.0 / y.scale)) if y.scale <= 1.0 else 1.0 / y.scale
    m, e = quantize_multiplier(inv_scale)
    div_shift = 31 - e
    if not 0 <= div_shift <= 38:
        raise EdgekilnError(f"{node_label(node)}: output scale {y.scale} is outside the integer softmax's range")
    ctx.graph.ops.append(Op(
        "softmax", node.name or node.output[0], [x.name], y.name,
        attrs=dict(rows=rows, depth=depth, output_zp=y.zero_point, inv_mult=m, div_shift=div_shift),
        arrays=dict(lut=lut), macs=x.size * 2))


def emit_nchw_transpose(ctx: LowerContext, name: str) -> str:
    """Make an NCHW-ordered copy of a flattened NHWC map (only when something other than FC reads it)."""
    t = ctx.graph.tensors[name]
    out_name = name + "_nchw"
    if out_name not in ctx.graph.tensors:
        c, h, w = t.nchw_flatten_of
        _new(ctx, out_name, t.shape, t.scale, t.zero_point)
        ctx.graph.ops.append(Op("transpose_nchw", name + "_to_nchw", [name], out_name,
                                attrs=dict(height=h, width=w, channels=c)))
    return out_name


def fuse_activations(graph: IntGraph) -> None:
    """Fold a clamp-only ``requantize`` (same qparams in and out) into the producing conv/fc/add."""
    for op in list(graph.ops):
        if op.kind != "requantize":
            continue
        x, y = graph.tensors[op.inputs[0]], graph.tensors[op.output]
        producer = next((p for p in graph.ops if p.output == x.name), None)
        if (producer is None or producer.kind not in ("conv2d", "fully_connected", "add")
                or x.scale != y.scale or x.zero_point != y.zero_point
                or len(graph.consumers(x.name)) != 1 or x.name in graph.outputs):
            continue
        producer.attrs["act_min"] = max(producer.attrs["act_min"], op.attrs["act_min"])
        producer.attrs["act_max"] = min(producer.attrs["act_max"], op.attrs["act_max"])
        producer.output = y.name
        graph.ops.remove(op)
        del graph.tensors[x.name]
