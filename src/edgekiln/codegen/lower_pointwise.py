"""Lowering of per-element and per-channel ONNX ops: BatchNormalization and unary activations.

* **BatchNormalization** is the per-channel affine map ``y = A*x + B`` with
  ``A = gamma / sqrt(var + eps)`` and ``B = beta - mean*A``. Right after a Conv whose output is
  not quantized (a float Conv -> BN pair in the QDQ graph) it is folded into that Conv: the
  per-channel weight scale absorbs ``|A|``, negative ``A`` flips the int8 weights, and ``B``
  joins the int32 bias. Otherwise (ORT quantizes the Conv output before the BN) it becomes a
  depthwise 1x1 ``conv2d`` whose weights are exactly ``sign(A) * 127`` with scale ``|A|/127``
  (a per-channel symmetric int8 quantization of one value is exact), so the existing conv
  kernel, its float32-exact requantization and the TFLite writer all apply unchanged.
* **Unary activations** (Sigmoid, HardSigmoid, HardSwish, Tanh, LeakyRelu, Elu) become one
  generic ``lut`` op: an int8 input has 256 possible values, so the 256-entry int8 table
  ``T[q + 128] = Q_out(f(DQ_in(q)))`` is computed here, in float32 as onnxruntime's
  DequantizeLinear -> op -> QuantizeLinear chain computes it, and the kernel is one lookup per
  element (TFLM's LOGISTIC/HARD_SWISH int8 kernels use the same idea).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgekiln.codegen.binary32 import binary32_multiplier, onnx_qlinear_scale
from edgekiln.codegen.ir import LowerContext, Op, QTensor
from edgekiln.errors import EdgekilnError

#: largest |bias| a folded BatchNormalization may need (keeps conv accumulators inside int32).
_MAX_BIAS = 1 << 30


def _f32(node: Any, name: str, default: float) -> np.float32:
    from edgekiln.codegen.lower import node_attr

    return np.float32(node_attr(node, name, default))


def _sigmoid(x: np.ndarray, node: Any) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def _hard_sigmoid(x: np.ndarray, node: Any) -> np.ndarray:
    return np.clip(_f32(node, "alpha", 0.2) * x + _f32(node, "beta", 0.5), np.float32(0), np.float32(1))


def _hard_swish(x: np.ndarray, node: Any) -> np.ndarray:
    return x * np.clip(np.float32(1 / 6) * x + np.float32(0.5), np.float32(0), np.float32(1))


def _leaky_relu(x: np.ndarray, node: Any) -> np.ndarray:
    return np.where(x >= 0, x, _f32(node, "alpha", 0.01) * x)


def _elu(x: np.ndarray, node: Any) -> np.ndarray:
    return np.where(x > 0, x, _f32(node, "alpha", 1.0) * (np.exp(x) - np.float32(1)))


#: ONNX unary op -> its float32 function (input array, node for attributes).
UNARY_FUNCS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "Sigmoid": _sigmoid, "HardSigmoid": _hard_sigmoid, "HardSwish": _hard_swish,
    "Tanh": lambda x, node: np.tanh(x), "LeakyRelu": _leaky_relu, "Elu": _elu,
}


def unary_table(fn: Callable[[np.ndarray], np.ndarray], x: QTensor, y: QTensor) -> np.ndarray:
    """The 256-entry int8 table of ``fn`` for input ``x`` and output ``y`` qparams, index ``q + 128``.

    >>> t = unary_table(lambda v: v, QTensor("x", (1,), 0.5, 0), QTensor("y", (1,), 0.25, 3))
    >>> int(t[128 + 1]), int(t[0]), int(t[255])
    (5, -128, 127)
    """
    q = np.arange(-128, 128, dtype=np.int32)
    with np.errstate(over="ignore"):  # exp() of large inputs saturates to inf, then to the int8 ends
        xf = (q - np.int32(x.zero_point)).astype(np.float32) * np.float32(x.scale)
        yf = np.asarray(fn(xf), np.float32)
        qy = np.rint(yf / np.float32(y.scale)) + np.float32(y.zero_point)
    return np.clip(qy, -128, 127).astype(np.int8)


def lower_unary(ctx: LowerContext, node: Any) -> None:
    """Sigmoid, HardSigmoid, HardSwish, Tanh, LeakyRelu, Elu -> one ``lut`` op."""
    from edgekiln.codegen.lower import act_input, act_output

    x = act_input(ctx, node, 0)
    y = act_output(ctx, node, x.shape)
    fn = UNARY_FUNCS[node.op_type]
    table = unary_table(lambda v: fn(v, node), x, y)
    ctx.graph.ops.append(Op("lut", node.name or node.output[0], [x.name], y.name, attrs=dict(size=x.size),
                            arrays=dict(table=table), macs=x.size))


def bn_affine(ctx: LowerContext, node: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` per channel (float64) of a BatchNormalization in inference mode."""
    from edgekiln.codegen.lower import const_input, node_attr, node_label

    if node_attr(node, "training_mode", 0) or len([o for o in node.output if o]) != 1:
        raise EdgekilnError(f"{node_label(node)}: only inference-mode BatchNormalization (one output) is supported")
    vals = []
    for i in range(1, 5):
        q, scale, zp, _ = const_input(ctx, node, i)
        real = (np.asarray(q, np.float64) - np.asarray(zp, np.float64)) * np.asarray(scale, np.float64) \
            if np.asarray(q).dtype.kind in "iu" else np.asarray(q, np.float64)
        vals.append(np.broadcast_to(real.reshape(-1), (channels,)))
    gamma, beta, mean, var = vals
    a = gamma / np.sqrt(var + float(node_attr(node, "epsilon", 1e-5)))
    return a, beta - mean * a


def bn_after(ctx: LowerContext, conv: Any) -> Any | None:
    """The BatchNormalization node to fold into ``conv``: its only reader, with no Q between."""
    out = conv.output[0]
    readers = ctx.float_consumers.get(out, [])
    if ctx.q_of.get(out) or len(readers) != 1 or readers[0].op_type != "BatchNormalization" \
            or readers[0].input[0] != out:
        return None
    return readers[0]


def fold_bn_into_conv(ctx: LowerContext, bn: Any, weights: np.ndarray, bias: np.ndarray, s_in: float,
                      s_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conv ``(OHWI weights, int32 bias, weight scales)`` with ``bn`` applied to its output.

    out = A*(s_in*s_w*acc) + B = s_in*(s_w*|A|) * (sign(A)*acc + B/(s_in*s_w*|A|)).
    """
    from edgekiln.codegen.lower import node_label

    a, b = bn_affine(ctx, bn, weights.shape[0])
    sign = np.where(a > 0, 1, np.where(a < 0, -1, 0)).astype(np.int64)
    if np.any((sign < 0) & np.any(weights.reshape(len(a), -1) == -128, axis=1)):
        raise EdgekilnError(f"{node_label(bn)}: a negative BatchNormalization scale would negate the int8 weight -128")
    new_sw = np.where(a == 0, s_w, s_w * np.abs(a))
    new_w = (weights.astype(np.int64) * sign.reshape(-1, *([1] * (weights.ndim - 1)))).astype(np.int8)
    new_bias = bias.astype(np.int64) * sign + np.rint(b / (s_in * new_sw)).astype(np.int64)
    if np.abs(new_bias).max(initial=0) > _MAX_BIAS:
        raise EdgekilnError(f"{node_label(bn)}: folded bias exceeds the int32 accumulator range")
    ctx.folded.add(bn.name or bn.output[0])
    return new_w, new_bias.astype(np.int32), new_sw


def lower_batchnorm(ctx: LowerContext, node: Any) -> None:
    """A BatchNormalization on a quantized tensor -> a depthwise 1x1 ``conv2d`` with weights +-127."""
    from edgekiln.codegen.lower import act_input, act_output, node_label

    x = act_input(ctx, node, 0)
    c = x.shape[-1]
    if len(x.shape) not in (2, 4):
        raise EdgekilnError(f"{node_label(node)}: BatchNormalization needs a 2-D or 4-D input, got {x.shape}")
    y = act_output(ctx, node, x.shape)
    a, b = bn_affine(ctx, node, c)
    s_w = np.where(a == 0, 1.0, np.abs(a)) / 127.0
    w = (np.sign(a) * 127).astype(np.int8).reshape(c, 1, 1, 1)
    bias = np.rint(b / (x.scale * s_w))
    if np.abs(bias).max(initial=0) > _MAX_BIAS:
        raise EdgekilnError(f"{node_label(node)}: BatchNormalization shift is too large for the int32 accumulator")
    mult, shift = binary32_multiplier(onnx_qlinear_scale(x.scale, s_w, y.scale))
    h, wd = (x.shape[1], x.shape[2]) if len(x.shape) == 4 else (1, 1)
    ctx.graph.ops.append(Op(
        "conv2d", node.name or node.output[0], [x.name], y.name,
        attrs=dict(in_h=h, in_w=wd, in_c=c, out_h=h, out_w=wd, out_c=c, k_h=1, k_w=1, stride_h=1, stride_w=1,
                   dil_h=1, dil_w=1, pad_top=0, pad_left=0, groups=c, input_zp=x.zero_point,
                   output_zp=y.zero_point, act_min=-128, act_max=127),
        arrays=dict(weights=w, bias=bias.astype(np.int32), mult=mult, shift=shift),
        macs=x.size, weight_scale=s_w.astype(np.float32)))
