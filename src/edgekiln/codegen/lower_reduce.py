"""``ReduceMean`` over axes other than H and W together (a text recognizer's mean over the height
``axes=[2]``, a mean over the last axis of a sequence) as one ``avg_pool`` op.

The reduced axes, mapped to the C layout (NHWC for 4-D, ONNX order otherwise), must be one
contiguous run: the tensor is then ``(outer, R, inner)`` in memory and the mean is an average
pool with a ``1 x R`` window over the map ``H = outer, W = R, C = inner`` (stride 1, no
padding): the ``avg_pool`` kernel's one exact rounding, so the integers equal onnxruntime's
``rint(mean / s_y) + z_y`` wherever its float32 sum is not within rounding noise of a .5 tie. The
result is ``(outer, inner)`` in memory; where ONNX's output order differs (a 4-D input with
``keepdims=0``: the NHWC channels-last rows must become ONNX's ``(N, C, W)``), a
``transpose_nchw`` op follows.

>>> c_axis(2, 4), c_axis(1, 4), c_axis(2, 3)   # ONNX H, C of a 4-D map (NHWC); a 3-D axis is itself
(1, 3, 2)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekiln.codegen.ir import LowerContext, Op, QTensor, to_c_shape
from edgekiln.errors import EdgekilnError
from edgekiln.quant.fixed_point import quantize_multiplier

#: ONNX axis -> C-layout axis of a 4-D (NCHW -> NHWC) tensor.
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


def reduce_axes(ctx: LowerContext, node: Any, rank: int) -> list[int]:
    """The sorted, non-negative ONNX axes a ReduceMean reduces (all of them when none are given)."""
    from edgekiln.codegen.lower import node_attr, node_label

    axes = node_attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in ctx.inits:
            raise EdgekilnError(f"{node_label(node)}: the axes must be a constant")
        axes = np.asarray(ctx.inits[node.input[1]]).reshape(-1).tolist()
    if axes is None or len(axes) == 0:
        if node_attr(node, "noop_with_empty_axes", 0):
            raise EdgekilnError(f"{node_label(node)}: a ReduceMean with no axes (an identity) is not supported")
        axes = list(range(rank))
    return sorted({int(a) % rank for a in axes})


def reduce_mean_hw_shape(ctx: LowerContext, node: Any, x: QTensor) -> tuple[int, ...]:
    """C shape of a ReduceMean over H and W of a 4-D map (a global average pool); an error for other axes."""
    from edgekiln.codegen.lower import node_attr, node_label

    axes = reduce_axes(ctx, node, len(x.shape))
    if len(x.shape) != 4 or axes != [2, 3]:
        raise EdgekilnError(f"{node_label(node)}: only ReduceMean over H and W (axes [2, 3]) of a 4-D map is "
                            f"supported here, got axes {axes} of a {len(x.shape)}-D tensor")
    c = x.shape[3]
    return (1, 1, 1, c) if node_attr(node, "keepdims", 1) else (1, c)


def c_axis(axis: int, rank: int) -> int:
    """The C-layout axis of ONNX axis ``axis`` (non-negative) of a rank-``rank`` tensor."""
    return _NHWC_AXIS[axis] if rank == 4 else axis


def _c_axes(axes: list[int], rank: int) -> list[int]:
    return sorted(c_axis(a, rank) for a in axes)


def lower_reduce_mean(ctx: LowerContext, node: Any, x: QTensor) -> None:
    """Append the ``avg_pool`` (and, for a 4-D ``keepdims=0`` output, the ``transpose_nchw``) of a
    ReduceMean whose C-layout axes are contiguous; an error naming the node otherwise."""
    from edgekiln.codegen.lower import act_output, node_attr, node_label

    rank = len(x.shape)
    onnx_shape = x.shape if rank != 4 else (x.shape[0], x.shape[3], x.shape[1], x.shape[2])
    axes = reduce_axes(ctx, node, rank)
    c_axes = _c_axes(axes, rank)
    if c_axes != list(range(c_axes[0], c_axes[-1] + 1)):
        raise EdgekilnError(f"{node_label(node)}: ReduceMean over axes {axes} of a {rank}-D tensor is not one "
                            "contiguous block in the C layout (NHWC); not supported by the C backend")
    first, last = c_axes[0], c_axes[-1]
    outer = int(np.prod(x.shape[:first]))
    span = int(np.prod(x.shape[first:last + 1]))
    inner = int(np.prod(x.shape[last + 1:]))
    keep = bool(node_attr(node, "keepdims", 1))
    onnx_out = tuple(1 if i in axes else d for i, d in enumerate(onnx_shape)) if keep else \
        tuple(d for i, d in enumerate(onnx_shape) if i not in axes)
    y = act_output(ctx, node, to_c_shape(onnx_out))
    # NOTE: the mean leaves the kept axes in the input's C-layout order; a 4-D input with keepdims=0
    # gives a 3-D or 2-D ONNX output, whose C layout is ONNX order: channels before H and W
    kept = {i: d for i, d in enumerate(x.shape) if i not in c_axes}
    hw = (kept.get(1, 1), kept.get(2, 1))
    needs_transpose = rank == 4 and not keep and kept.get(3, 1) > 1 and hw[0] * hw[1] > 1
    pooled = y
    if needs_transpose:
        pooled = QTensor(y.name + "_nhwc", (1, *hw, kept[3]), y.scale, y.zero_point)
        ctx.graph.tensors[pooled.name] = pooled
    m, sh = quantize_multiplier(x.scale / y.scale)
    if (31 - sh) + int(span).bit_length() > 55:  # as lower._avgpool: the kernel's int64 stays in range
        raise EdgekilnError(f"{node_label(node)}: scale ratio {x.scale / y.scale:.3g} is too small for the kernel")
    name = node.name or node.output[0]
    ctx.graph.ops.append(Op(
        "avg_pool", name, [x.name], pooled.name,
        attrs=dict(in_h=outer, in_w=span, channels=inner, out_h=outer, out_w=1, k_h=1, k_w=span, stride_h=1,
                   stride_w=1, pad_top=0, pad_left=0, count_include_pad=1, input_zp=x.zero_point,
                   output_zp=y.zero_point, mult=m, shift=sh),
        macs=x.size))
    if needs_transpose:
        ctx.graph.ops.append(Op("transpose_nchw", name + "_to_nchw", [pooled.name], y.name,
                                attrs=dict(height=hw[0], width=hw[1], channels=kept[3])))
