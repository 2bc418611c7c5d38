"""Spatial ops of detectors and decoders: Pad, Resize (nearest and linear) and ConvTranspose.

* ``pad``: copies the input map into a larger one filled with a constant, input pixel ``(y, x)``
  landing at ``(pad_top + y * stride_h, pad_left + x * stride_w)``. ONNX ``Pad`` (constant mode,
  H/W only) is stride 1; ``ConvTranspose`` is a ``pad`` with its stride (zeros between the pixels,
  i.e. the input zero point) and ``k - 1 - pads`` around, followed by an ordinary ``conv2d`` of the
  flipped kernel: the zeros add exactly nothing, so the conv kernel and its float32-exact
  requantization apply unchanged.
* ``resize``: ``out = zo + round(((S - wy)((S - wx) p00 + wx p01) + wy((S - wx) p10 + wx p11)) / S^2)``
  over ``p - zi``, ``S = 2^15``, with per-row and per-column source indices and weights. The
  tables come from running the model's own Resize node in onnxruntime on a ramp (the value of
  each pixel is its column, or row, index): whatever coordinate mode and rounding the node asks
  for, the output IS the source coordinate, ``floor`` and fraction of it give index and weight.
  Nearest mode has weights 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekiln.codegen.ir import LowerContext, Op, QTensor
from edgekiln.errors import EdgekilnError

#: fixed-point one of the resize weights.
RESIZE_ONE = 1 << 15


def _pad_op(ctx: LowerContext, name: str, x: QTensor, out_hw: tuple[int, int], top_left: tuple[int, int],
            stride: tuple[int, int], value: int, out_name: str) -> QTensor:
    _, h, w, c = x.shape
    y = QTensor(out_name, (1, out_hw[0], out_hw[1], c), x.scale, x.zero_point)
    ctx.graph.tensors[y.name] = y
    ctx.graph.ops.append(Op("pad", name, [x.name], y.name,
                            attrs=dict(in_h=h, in_w=w, channels=c, out_h=out_hw[0], out_w=out_hw[1],
                                       pad_top=top_left[0], pad_left=top_left[1], stride_h=stride[0],
                                       stride_w=stride[1], value=value)))
    return y


def _finish(ctx: LowerContext, node: Any, pre: QTensor) -> None:
    """Rename ``pre`` to the node's quantized output, or requantize into it when ORT chose other qparams."""
    from edgekiln.codegen.lower import act_output, emit_requantize

    y = act_output(ctx, node, pre.shape)
    if (y.scale, y.zero_point) == (pre.scale, pre.zero_point):
        del ctx.graph.tensors[pre.name]
        ctx.graph.ops[-1].output = y.name
    else:
        emit_requantize(ctx, (node.name or node.output[0]) + "_requant", pre, y)


def lower_pad(ctx: LowerContext, node: Any) -> None:
    from edgekiln.codegen.lower import act_input, node_attr, node_label, quantize_value

    x = act_input(ctx, node, 0)
    mode = node_attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = [int(v) for v in np.asarray(ctx.inits.get(node.input[1], [])).reshape(-1)] if len(node.input) > 1 \
        else list(node_attr(node, "pads", []))
    if mode != "constant" or len(x.shape) != 4 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) \
            or min(pads) < 0 or (len(node.input) > 3 and node.input[3]):
        raise EdgekilnError(f"{node_label(node)}: only constant, non-negative Pad of H and W is supported "
                            f"(mode {mode}, pads {pads})")
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in ctx.inits:
            raise EdgekilnError(f"{node_label(node)}: the pad value must be a constant")
        value = float(np.asarray(ctx.inits[node.input[2]]).reshape(()))
    _, h, w, _ = x.shape
    out_hw = (h + pads[2] + pads[6], w + pads[3] + pads[7])
    pre = _pad_op(ctx, node.name or node.output[0], x, out_hw, (pads[2], pads[3]), (1, 1),
                  quantize_value(value, x), (node.name or node.output[0]) + "__padded")
    _finish(ctx, node, pre)


def lower_conv_transpose(ctx: LowerContext, node: Any) -> None:
    """ConvTranspose -> ``pad`` (stride zeros and ``k-1-p`` borders) + ``conv2d`` of the flipped kernel."""
    from edgekiln.codegen.binary32 import binary32_multiplier, onnx_qlinear_scale
    from edgekiln.codegen.lower import (
        act_input,
        act_output,
        const_input,
        int32_bias,
        node_attr,
        node_label,
        weight_scales,
    )

    x = act_input(ctx, node, 0)
    wq, ws, wz, axis = const_input(ctx, node, 1)
    group = int(node_attr(node, "group", 1))
    if wq.dtype != np.int8 or wq.ndim != 4 or group != 1 or len(x.shape) != 4:
        raise EdgekilnError(f"{node_label(node)}: only 2-D ConvTranspose with int8 weights and group 1 is supported")
    if np.asarray(ws).size > 1 and axis != 1:
        raise EdgekilnError(f"{node_label(node)}: per-channel weight scales must be along the output channels")
    if node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or node_attr(node, "output_shape", None):
        raise EdgekilnError(f"{node_label(node)}: auto_pad / output_shape are not supported; export with pads")
    cin, cout, kh, kw = wq.shape
    strides = list(node_attr(node, "strides", [1, 1]))
    dil = list(node_attr(node, "dilations", [1, 1]))
    pads = list(node_attr(node, "pads", [0, 0, 0, 0]))
    extra = list(node_attr(node, "output_padding", [0, 0]))
    _, h, w, _ = x.shape
    head = [dil[0] * (kh - 1) - pads[0], dil[1] * (kw - 1) - pads[1]]
    tail = [dil[0] * (kh - 1) - pads[2] + extra[0], dil[1] * (kw - 1) - pads[3] + extra[1]]
    if min(head + tail) < 0:
        raise EdgekilnError(f"{node_label(node)}: pads larger than the kernel extent are not supported")
    ph, pw = (h - 1) * strides[0] + 1 + head[0] + tail[0], (w - 1) * strides[1] + 1 + head[1] + tail[1]
    padded = _pad_op(ctx, (node.name or node.output[0]) + "_zeros", x, (ph, pw), (head[0], head[1]),
                     (strides[0], strides[1]), x.zero_point, (node.name or node.output[0]) + "__zeros")
    out_h, out_w = ph - dil[0] * (kh - 1), pw - dil[1] * (kw - 1)
    y = act_output(ctx, node, (1, out_h, out_w, cout))
    s_w = weight_scales(node, ws, wz, cout)
    # OHWI weights of the equivalent convolution: W'[o, i, j, c] = W[c, o, kh-1-i, kw-1-j]
    weights = np.ascontiguousarray(wq[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))
    mult, shift = binary32_multiplier(onnx_qlinear_scale(x.scale, s_w, y.scale))
    ctx.graph.ops.append(Op(
        "conv2d", node.name or node.output[0], [padded.name], y.name,
        attrs=dict(in_h=ph, in_w=pw, in_c=cin, out_h=out_h, out_w=out_w, out_c=cout, k_h=kh, k_w=kw, stride_h=1,
                   stride_w=1, dil_h=dil[0], dil_w=dil[1], pad_top=0, pad_left=0, groups=1,
                   input_zp=x.zero_point, output_zp=y.zero_point, act_min=-128, act_max=127),
        arrays=dict(weights=weights, bias=int32_bias(ctx, node, 2, cout, x.scale * s_w), mult=mult, shift=shift),
        macs=out_h * out_w * cout * kh * kw * cin, weight_scale=s_w.astype(np.float32)))


def _resize_coords(node: Any, ctx: LowerContext, x: QTensor, out_hw: tuple[int, int]) -> list[np.ndarray]:
    """Source coordinate (float) of every output row and column, as onnxruntime's Resize computes them."""
    from onnx import TensorProto, helper, numpy_helper

    from edgekiln.execution.ort import ort_session

    _, h, w, c = x.shape
    inits = [numpy_helper.from_array(np.asarray(ctx.inits[i]), i) for i in node.input[1:] if i]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ramp = helper.make_node("Resize", ["ramp", *node.input[1:]], ["out"], **attrs)
    graph = helper.make_graph([ramp], "probe", [helper.make_tensor_value_info("ramp", TensorProto.FLOAT,
                                                                              [1, c, h, w])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rows = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (1, c, h, w))
    cols = np.broadcast_to(np.arange(w, dtype=np.float32)[None, :], (1, c, h, w))
    try:
        sess = ort_session(model)
        out_r, out_c = (np.asarray(sess.run(None, {"ramp": np.ascontiguousarray(r)})[0]) for r in (rows, cols))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
        first = (str(exc).strip().splitlines() or ["?"])[0][:200]
        raise EdgekilnError(f"Resize (node {node.name!r}): onnxruntime could not evaluate it ({first})") from None
    if out_r.shape[2:] != tuple(out_hw):
        raise EdgekilnError(f"Resize (node {node.name!r}): probe gave {out_r.shape[2:]}, expected {out_hw}")
    return [out_r[0, 0, :, 0].astype(np.float64), out_c[0, 0, 0, :].astype(np.float64)]


def _axis_table(coord: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.clip(np.floor(coord), 0, n - 1).astype(np.int32)
    hi = np.minimum(lo + 1, n - 1).astype(np.int32)
    wt = np.rint((coord - lo) * RESIZE_ONE).astype(np.int32)
    return lo, hi, np.where(hi == lo, 0, wt).astype(np.int32)


def lower_resize(ctx: LowerContext, node: Any) -> None:
    from edgekiln.codegen.lower import act_input, node_attr, node_label

    x = act_input(ctx, node, 0)
    mode = node_attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("nearest", "linear") or len(x.shape) != 4:
        raise EdgekilnError(f"{node_label(node)}: only nearest and (bi)linear Resize of a 4-D map is supported")
    if any(i and i not in ctx.inits for i in node.input[1:]):
        raise EdgekilnError(f"{node_label(node)}: roi, scales and sizes must be constants")
    sizes = np.asarray(ctx.inits[node.input[3]]).reshape(-1) if len(node.input) > 3 and node.input[3] else None
    _, h, w, c = x.shape
    if sizes is not None and sizes.size:
        out_hw = (int(sizes[-2]), int(sizes[-1]))
        if sizes.size == 4 and (int(sizes[0]), int(sizes[1])) != (1, c):
            raise EdgekilnError(f"{node_label(node)}: only H and W may be resized")
    else:
        if len(node.input) < 3 or not node.input[2]:
            raise EdgekilnError(f"{node_label(node)}: needs constant scales or sizes")
        scales = np.asarray(ctx.inits[node.input[2]], np.float32).reshape(-1)
        if scales.size == 4 and (scales[0] != 1 or scales[1] != 1):
            raise EdgekilnError(f"{node_label(node)}: only H and W may be resized")
        out_hw = (int(np.floor(h * scales[-2])), int(np.floor(w * scales[-1])))
    ys, xs = _resize_coords(node, ctx, x, out_hw)
    y0, y1, wy = _axis_table(ys, h)
    x0, x1, wx = _axis_table(xs, w)
    if mode == "nearest" and (wy.any() or wx.any()):
        raise EdgekilnError(f"{node_label(node)}: nearest Resize gave fractional source coordinates")
    pre = QTensor((node.name or node.output[0]) + "__resized", (1, *out_hw, c), x.scale, x.zero_point)
    ctx.graph.tensors[pre.name] = pre
    ctx.graph.ops.append(Op(
        "resize", node.name or node.output[0], [x.name], pre.name,
        attrs=dict(in_h=h, in_w=w, channels=c, out_h=out_hw[0], out_w=out_hw[1], zero_point=x.zero_point),
        arrays=dict(y0=y0, y1=y1, wy=wy, x0=x0, x1=x1, wx=wx), macs=pre.size * 4))
    _finish(ctx, node, pre)
