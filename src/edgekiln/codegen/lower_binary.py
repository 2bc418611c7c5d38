"""``Mul`` of two computed tensors, with channel broadcasting: SiLU's ``x * sigmoid(x)`` when both are
int8, and the squeeze-excite scale ``[1,C,H,W] * [1,C,1,1]``, also when the gate stayed float.

One ``mul`` kernel covers both: ``y = zo + M * round(Ta[a + 128] * Tb[b + 128] / 2^pre_shift)`` with
one 256-entry int32 table per operand. For an int8 operand the table is ``T[q] = q - z`` (scale ``s``).
For a float one ``g = f(DQ(q))`` (``edgekiln quantize`` keeps HardSigmoid/Sigmoid/HardSwish/SiLU float,
quant/speed.py) the table holds ``g`` in fixed point, ``T[q] = round(g(q) * 2^k)`` (scale ``2^-k``,
``|T| <= 2^22``), computed by running the float nodes themselves in onnxruntime on all 256 inputs.
``M = s_a * s_b * 2^pre_shift / s_y``; the product is int64 and ``pre_shift`` (14 for two float
operands, else 0) brings it below 2^30. ``b`` is broadcast over ``a`` when it is one value per channel
(``b_channels = C``: the channels-last index ``i % C``) or a scalar (``b_channels = 1``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgekiln.codegen.ir import LowerContext, Op, QTensor
from edgekiln.errors import EdgekilnError
from edgekiln.quant.fixed_point import quantize_multiplier


def _operand(ctx: LowerContext, node: Any, i: int) -> tuple[QTensor, np.ndarray, float, bool]:
    """(int8 tensor, 256 values per q, their real scale, float?) of input ``i`` of ``node``: ``q - z``
    (exact integers, scale ``s``) for an int8 tensor, the float values ``g(q)`` (scale 1) for a float one."""
    from edgekiln.codegen.lower import act_input, node_label
    from edgekiln.codegen.lower_island import island_table

    name = node.input[i]
    if name in ctx.const_dq and name not in ctx.act_dq:
        ctx.act_dq[name] = constant_tensor(ctx, node, name)
    if name in ctx.act_dq:
        t = act_input(ctx, node, i)
        return t, np.arange(-128, 128, dtype=np.float64) - t.zero_point, t.scale, False
    if name not in ctx.gates:
        raise EdgekilnError(f"input {name!r} of {node_label(node)} is neither an int8 tensor nor an elementwise "
                            "function of one")
    src, nodes = ctx.gates[name]
    t = ctx.graph.tensors[ctx.act_dq[src]]
    if t.nchw_flatten_of is not None:
        raise EdgekilnError(f"{node_label(node)}: a float operand on a flattened map is not supported")
    g = island_table(ctx, nodes, t, name, None, 1, len(t.shape)).reshape(-1).astype(np.float64)
    if not np.isfinite(g).all():
        raise EdgekilnError(f"{node_label(node)}: the float operand {name!r} is not finite on every int8 input")
    return t, g, 1.0, True


def constant_tensor(ctx: LowerContext, node: Any, name: str) -> str:
    """An int8 tensor holding the quantized constant ``name`` (a DequantizeLinear of an int8 initializer:
    a detector's anchor grid), written by a ``constant`` op from flash; its C-layout name.

    NOTE: a constant that varies along the channels only (or is one value) never gets here: a float
    island folds it into a lookup table (lower_island.py); this is for one that varies per element."""
    from edgekiln.codegen.ir import to_c_shape
    from edgekiln.codegen.lower import node_label

    q, scale, zp, _ = ctx.const_dq[name]
    q, scale, zp = np.asarray(q), np.asarray(scale), np.asarray(zp)
    if scale.size != 1 or zp.size != 1 or q.dtype not in (np.int8, np.uint8):
        raise EdgekilnError(f"{node_label(node)}: constant {name!r} is not a per-tensor int8 quantized value; the C "
                            "backend reads a constant tensor operand only as one")
    shift = 128 if q.dtype == np.uint8 else 0  # uint8 as int8, as activation_qparams does
    others = [len(ctx.graph.tensors[ctx.act_dq[i]].shape) for i in node.input if i in ctx.act_dq]
    onnx_shape = (1,) * (max([q.ndim, *others]) - q.ndim) + q.shape  # numpy broadcasting aligns on the right
    values = (q.astype(np.int32) - shift).astype(np.int8).reshape(onnx_shape)
    if values.ndim == 4:
        values = values.transpose(0, 2, 3, 1)
    t = QTensor(name + "__const", to_c_shape(onnx_shape), float(scale.reshape(())), int(zp.reshape(())) - shift)
    ctx.graph.tensors[t.name] = t
    ctx.graph.ops.append(Op("constant", t.name, [], t.name, attrs=dict(size=t.size),
                            arrays=dict(values=np.ascontiguousarray(values).reshape(-1))))
    return t.name


def _fixed(values: np.ndarray, scale: float, is_float: bool, limit: int) -> tuple[np.ndarray, float]:
    """(int32 table, its real scale): integers as they are, float values as round(g * 2^k), |T| <= limit.

    NOTE: the largest k that fits: the table's relative precision sets how often a result near a
    rounding boundary lands 1 LSB from onnxruntime's float arithmetic (SE Mul: Q15 tables 0.3% of
    outputs, a Q22 gate times int8 0.02%; MobileNetV3-small per op)."""
    if not is_float:
        return values.astype(np.int32), scale
    top = float(np.abs(values).max())
    k = 0 if top == 0 else math.floor(math.log2(limit / top))
    return np.rint(values * 2.0 ** k).astype(np.int32), scale * 2.0 ** -k


def lower_float_mean(ctx: LowerContext, node: Any) -> None:
    """GlobalAveragePool / ReduceMean over H,W of a float value ``g = f(DQ(q))`` (an SE block's squeeze
    of a HardSwish or SiLU output the speed rule left float) -> one ``mean_lut`` op:
    ``y[c] = zo + M * sum over pixels of T[q + 128]``, ``T`` the fixed-point table of ``g``,
    ``M = 2^-k / (pixels * s_y)``."""
    from edgekiln.codegen.lower import act_output, node_label
    from edgekiln.codegen.lower_reduce import reduce_mean_hw_shape

    x, values, scale, is_float = _operand(ctx, node, 0)
    if len(x.shape) != 4:
        raise EdgekilnError(f"{node_label(node)}: needs a 4-D input, got {x.shape}")
    shape = (1, 1, 1, x.shape[3]) if node.op_type == "GlobalAveragePool" else reduce_mean_hw_shape(ctx, node, x)
    y = act_output(ctx, node, shape)
    pixels = x.shape[1] * x.shape[2]
    table, scale = _fixed(values, scale, is_float, ((1 << 31) - 1) // pixels)  # the int32 sum cannot overflow
    mult, shift = quantize_multiplier(scale / (pixels * y.scale))
    ctx.graph.ops.append(Op(
        "mean_lut", node.name or node.output[0], [x.name], y.name,
        attrs=dict(pixels=pixels, channels=x.shape[3], output_zp=y.zero_point, mult=mult, shift=shift),
        arrays=dict(table=table.astype(np.int32)), macs=x.size))


def _broadcast(node: Any, a: QTensor, b: QTensor) -> int:
    """``b_channels`` for ``b`` broadcast over ``a``: 0 equal shapes, C one value per channel, 1 scalar."""
    from edgekiln.codegen.lower import node_label

    if b.shape == a.shape:
        return 0
    if b.size == 1:
        return 1
    if b.size == a.shape[-1] and b.shape[-1] == a.shape[-1]:
        return a.shape[-1]
    raise EdgekilnError(f"{node_label(node)}: broadcasting {a.shape} and {b.shape} (NHWC) is not supported; "
                        "only equal shapes, one value per channel or a scalar")


def lower_add_sub(ctx: LowerContext, node: Any) -> None:
    """Add/Sub the ``add`` kernel cannot take (a broadcast operand, a float operand, or Sub) -> one
    ``add_lut`` op: ``y = zo + M * (Ta[a + 128] + Tb[b + 128])``, both tables the operands' real values
    in one fixed point (``round(v * 2^k)``, ``|T| <= 2^29``; Sub negates ``Tb``), ``M = 2^-k / s_y``."""
    from edgekiln.codegen.lower import act_output

    a, va, sa, _ = _operand(ctx, node, 0)
    b, vb, sb, _ = _operand(ctx, node, 1)
    ra, rb = va * sa, vb * sb * (-1.0 if node.op_type == "Sub" else 1.0)
    if b.size > a.size:
        if node.op_type == "Sub":
            ra, rb = -ra, -rb  # a - b == -(b - a): swap the operands, negate both tables
        a, ra, b, rb = b, rb, a, ra
    b_channels = _broadcast(node, a, b)
    top = max(float(np.abs(ra).max()), float(np.abs(rb).max()))
    k = 0 if top == 0 else math.floor(math.log2((1 << 29) / top))
    y = act_output(ctx, node, a.shape)
    mult, shift = quantize_multiplier(2.0 ** -k / y.scale)
    ctx.graph.ops.append(Op(
        "add_lut", node.name or node.output[0], [a.name, b.name], y.name,
        attrs=dict(size=a.size, b_channels=b_channels, output_zp=y.zero_point, mult=mult, shift=shift,
                   act_min=-128, act_max=127),
        arrays=dict(a_table=np.rint(ra * 2.0 ** k).astype(np.int32), b_table=np.rint(rb * 2.0 ** k).astype(np.int32)),
        macs=a.size))


def lower_mul(ctx: LowerContext, node: Any) -> None:
    """Mul of two computed operands -> one ``mul`` op (the larger operand is ``a``)."""
    from edgekiln.codegen.lower import act_output

    a, va, sa, fa = _operand(ctx, node, 0)
    b, vb, sb, fb = _operand(ctx, node, 1)
    if b.size > a.size:  # b is the broadcast operand
        a, va, sa, fa, b, vb, sb, fb = b, vb, sb, fb, a, va, sa, fa
    # an int8 operand (|q - z| <= 255) times a 2^22 float table stays below 2^30; two 2^22 float tables
    # make a 2^44 int64 product, rounded down to 2^30 by pre_shift = 14 before the requantization
    ta, sa = _fixed(va, sa, fa, 1 << 22)
    tb, sb = _fixed(vb, sb, fb, 1 << 22)
    pre_shift = 14 if fa and fb else 0
    b_channels = _broadcast(node, a, b)
    y = act_output(ctx, node, a.shape)
    mult, shift = quantize_multiplier(sa * sb * 2.0 ** pre_shift / y.scale)
    ctx.graph.ops.append(Op(
        "mul", node.name or node.output[0], [a.name, b.name], y.name,
        attrs=dict(size=a.size, b_channels=b_channels, pre_shift=pre_shift, output_zp=y.zero_point, mult=mult,
                   shift=shift, act_min=-128, act_max=127),
        arrays=dict(a_table=ta.astype(np.int32), b_table=tb.astype(np.int32)), macs=a.size))
