"""Numpy integer reference kernels: the source of truth the generated C must match bit for bit.

Each kernel takes int8 arrays in C layout (NHWC, batch 1) plus the ``attrs``/``arrays`` of its
:class:`~edgekiln.codegen.ir.Op` and returns int8. Accumulation is in int64 here and int32 in C;
the export-time checks keep every accumulator within int32, so the results are identical.
Requantization of conv/FC accumulators is :func:`edgekiln.codegen.binary32.requant_binary32`
(float32 rounding emulated in integers, as ONNX QLinearConv computes it); every other rescale is
:func:`edgekiln.quant.fixed_point.multiply_by_quantized_multiplier`. An op marked for the fixed-point
mode (attribute ``requant_fixed``: conv, FC, Add, average pooling) computes as TFLite Micro does instead,
with its two-rounding :func:`edgekiln.codegen.requant_fixed.requant_fixed`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgekiln.codegen.binary32 import requant_binary32
from edgekiln.codegen.ir import IntGraph, Op
from edgekiln.codegen.requant_fixed import FIXED_ATTR, requant_fixed
from edgekiln.quant.fixed_point import multiply_by_quantized_multiplier as mbqm


def _requant_acc(acc: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """A conv/FC accumulator requantized in the op's mode (float32-exact, or fixed-point when marked)."""
    return (requant_fixed if a.get(FIXED_ATTR) else requant_binary32)(acc, arr["mult"], arr["shift"])


def _sat(x: np.ndarray, lo: int = -128, hi: int = 127) -> np.ndarray:
    return np.clip(x, lo, hi).astype(np.int8)


def _windows(x: np.ndarray, a: dict[str, int], pad_value: int, dil: tuple[int, int] = (1, 1)) -> np.ndarray:
    """``(out_h, out_w, k_h, k_w, C)`` windows of an ``(H, W, C)`` map padded with ``pad_value``."""
    h, w, c = x.shape
    kh, kw, sh, sw = a["k_h"], a["k_w"], a["stride_h"], a["stride_w"]
    oh, ow = a["out_h"], a["out_w"]
    need_h = (oh - 1) * sh + dil[0] * (kh - 1) + 1
    need_w = (ow - 1) * sw + dil[1] * (kw - 1) + 1
    padded = np.full((max(need_h, a["pad_top"] + h), max(need_w, a["pad_left"] + w), c), pad_value, np.int64)
    padded[a["pad_top"]:a["pad_top"] + h, a["pad_left"]:a["pad_left"] + w] = x
    iy = (np.arange(oh) * sh)[:, None] + np.arange(kh)[None, :] * dil[0]
    ix = (np.arange(ow) * sw)[:, None] + np.arange(kw)[None, :] * dil[1]
    return padded[iy[:, None, :, None], ix[None, :, None, :]]  # (oh, ow, kh, kw, c)


def conv2d(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """Grouped 2-D convolution (groups=1 regular, groups=C depthwise), OHWI int8 weights.

    acc[c] = bias[c] + sum over in-bounds taps of (x - input_zp) * w; padded taps add 0.
    """
    zx = a["input_zp"]
    win = _windows(x[0].astype(np.int64) - zx, a, 0, (a["dil_h"], a["dil_w"]))  # padding == zero point
    g, cout = a["groups"], a["out_c"]
    cin_g, cout_g = a["in_c"] // g, cout // g
    w = arr["weights"].astype(np.int64)  # (cout, kh, kw, cin_g)
    acc = np.empty((a["out_h"], a["out_w"], cout), np.int64)
    for gi in range(g):
        xs = win[..., gi * cin_g:(gi + 1) * cin_g]
        ws = w[gi * cout_g:(gi + 1) * cout_g]
        acc[..., gi * cout_g:(gi + 1) * cout_g] = np.einsum("hwijc,oijc->hwo", xs, ws)
    acc += arr["bias"].astype(np.int64)
    y = _requant_acc(acc, a, arr) + a["output_zp"]
    return _sat(y, a["act_min"], a["act_max"])[None]


def fully_connected(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    acc = (x.astype(np.int64) - a["input_zp"]) @ arr["weights"].astype(np.int64).T + arr["bias"]
    y = _requant_acc(acc, a, arr) + a["output_zp"]
    return _sat(y, a["act_min"], a["act_max"])


def add(xa: np.ndarray, xb: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """out = zo + M_o * (M_a * ((qa - za) << 20) + M_b * ((qb - zb) << 20)), each M a rounded step
    (one rounding each; two, as TFLite Micro's Add, in the fixed-point mode)."""
    rq = requant_fixed if a.get(FIXED_ATTR) else mbqm
    sa = rq((xa.astype(np.int64) - a["a_zp"]) << a["left_shift"], a["a_mult"], a["a_shift"])
    sb = rq((xb.astype(np.int64) - a["b_zp"]) << a["left_shift"], a["b_mult"], a["b_shift"])
    y = rq(sa + sb, a["out_mult"], a["out_shift"]) + a["output_zp"]
    return _sat(y, a["act_min"], a["act_max"])


def requantize(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    y = mbqm(x.astype(np.int64) - a["input_zp"], a["mult"], a["shift"]) + a["output_zp"]
    return _sat(y, a["act_min"], a["act_max"])


def max_pool(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    win = _windows(x[0], a, -(1 << 20))  # padding never wins
    return win.max(axis=(2, 3)).astype(np.int8)[None]


def avg_pool(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """round_half_even(sum(x - zi) * mult / (count << (31 - shift)) + zo): one exact rounding.

    NOTE: the zero point is added *before* rounding, as onnxruntime's QLinearAveragePool does
    (``nearbyintf(avg / y_scale + y_zero_point)``): with an odd zero point an exact .5 tie
    goes to the other neighbour than ``rint(avg / y_scale) + zo`` would. The input is read as the map
    ``(in_h, in_w, channels)`` of the attrs, as the C kernel reads it (a ReduceMean over one axis is a
    ``1 x R`` window over ``(outer, R, inner)``, lower_reduce.py). In the fixed-point mode TFLite Micro's:
    MEAN over whole axes ``requant_fixed(sum(x - zi), mult, shift) + zo``; with ``mult == 0`` AVERAGE_POOL_2D,
    the raw values' mean over the in-bounds window, ties away from zero.
    """
    x = x.reshape(1, a["in_h"], a["in_w"], a["channels"])
    win = _windows(x[0].astype(np.int64) - a["input_zp"], a, 0)
    total = win.sum(axis=(2, 3))
    if a.get(FIXED_ATTR) and a["mult"]:  # TFLite Micro's MEAN: mult/shift divide by the (whole-axes) count too
        return _sat(requant_fixed(total, a["mult"], a["shift"]) + a["output_zp"])[None]
    if a["count_include_pad"]:
        count = np.full(total.shape[:2], a["k_h"] * a["k_w"], np.int64)
    else:
        ones = _windows(np.ones(x.shape[1:3] + (1,), np.int64), a, 0)
        count = ones.sum(axis=(2, 3))[..., 0]
    if a.get(FIXED_ATTR):  # TFLite Micro's AVERAGE_POOL_2D (one grid): the raw mean, ties away from zero
        raw, c = total + a["input_zp"] * count[..., None], count[..., None]
        return _sat(np.where(raw > 0, (raw + c // 2) // c, -((c // 2 - raw) // c)))[None]
    den = count[..., None] << (31 - a["shift"])
    y = div_round_half_even(total * a["mult"] + a["output_zp"] * den, den)
    return _sat(y)[None]


def conv_pool(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """The fused conv -> max/avg pool: by definition the unfused conv kernel followed by the pool kernel."""
    from edgekiln.codegen.fuse import split_attrs

    conv_a, pool_a = split_attrs(a)
    y = conv2d(x, conv_a, arr)
    return (avg_pool if pool_a.pop("is_avg") else max_pool)(y, pool_a, {})


def div_round_half_even(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` rounded to nearest, ties to even (``den > 0``), exact on int64."""
    num, den = np.asarray(num, np.int64), np.asarray(den, np.int64)
    q = num // den
    r2 = 2 * (num - q * den)
    return q + ((r2 > den) | ((r2 == den) & (q % 2 == 1)))


def reshape(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    return x.reshape(-1).copy()  # a view in C; the caller reshapes to the output shape


def concat(*args: object) -> np.ndarray:
    *xs, a, arr = args
    outs = []
    for i, x in enumerate(xs):  # each input: ``outer`` rows of its chunk (its channels, or a whole block)
        y = mbqm(np.asarray(x, np.int64).reshape(a["outer"], -1) - arr["zps"][i], arr["mult"][i], arr["shift"][i])
        outs.append(_sat(y + a["output_zp"]))
    return np.concatenate(outs, axis=-1)


def softmax(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """q = zp + floor((2*T[d]*m + D) / (2*D)), D = sum(T) << div_shift, d = row max - x."""
    xi = x.astype(np.int64)
    t = arr["lut"].astype(np.int64)[xi.max(axis=-1, keepdims=True) - xi]
    denom = t.sum(axis=-1, keepdims=True) << a["div_shift"]
    q = (2 * t * a["inv_mult"] + denom) // (2 * denom)
    return _sat(q + a["output_zp"])


def transpose_nchw(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    h, w, c = a["height"], a["width"], a["channels"]
    return x.reshape(h, w, c).transpose(2, 0, 1).reshape(x.shape).copy()


def lut(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """Elementwise unary op as a 256-entry table: out = table[x + 128]."""
    return arr["table"][x.astype(np.int64) + 128].astype(np.int8)


def lut_channel(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """Per-channel table (channels last): out[i] = table[(i % C) * 256 + x[i] + 128]."""
    c = a["channels"]
    flat = x.reshape(-1, c).astype(np.int64) + 128 + (np.arange(c, dtype=np.int64) * 256)[None, :]
    return arr["table"][flat].astype(np.int8).reshape(x.shape)


def mul(xa: np.ndarray, xb: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """out = zo + M * round(Ta[qa + 128] * Tb[qb + 128] / 2^pre_shift); qb broadcast per channel
    (i % b_channels) or scalar."""
    qa = xa.reshape(-1).astype(np.int64)
    qb = xb.reshape(-1).astype(np.int64)
    if a["b_channels"]:
        qb = qb[np.arange(qa.size) % a["b_channels"]]
    prod = arr["a_table"].astype(np.int64)[qa + 128] * arr["b_table"].astype(np.int64)[qb + 128]
    if a["pre_shift"]:  # round half up, as the C shifts
        prod = (prod + (1 << (a["pre_shift"] - 1))) >> a["pre_shift"]
    y = mbqm(prod, a["mult"], a["shift"]) + a["output_zp"]
    return _sat(y, a["act_min"], a["act_max"]).reshape(xa.shape)


def add_lut(xa: np.ndarray, xb: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """out = zo + M * (Ta[qa + 128] + Tb[qb + 128]); qb broadcast per channel (i % b_channels) or scalar."""
    qa = xa.reshape(-1).astype(np.int64)
    qb = xb.reshape(-1).astype(np.int64)
    if a["b_channels"]:
        qb = qb[np.arange(qa.size) % a["b_channels"]]
    total = arr["a_table"].astype(np.int64)[qa + 128] + arr["b_table"].astype(np.int64)[qb + 128]
    y = mbqm(total, a["mult"], a["shift"]) + a["output_zp"]
    return _sat(y, a["act_min"], a["act_max"]).reshape(xa.shape)


def mean_lut(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """Per-channel mean of a table of x: y[c] = zo + M * sum_p table[x[p, c] + 128] (channels last)."""
    t = arr["table"].astype(np.int64)[x.reshape(a["pixels"], a["channels"]).astype(np.int64) + 128]
    return _sat(mbqm(t.sum(axis=0), a["mult"], a["shift"]) + a["output_zp"])


def gather(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """Data movement by an index table: out[p * out_c + j] = in[p * in_c + index[j]], p < pixels."""
    rows = x.reshape(a["pixels"], a["in_c"])
    return rows[:, arr["index"].astype(np.int64)].reshape(-1).copy()


def pad(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """A ``value``-filled map with input pixel (y, x) at (pad_top + y*stride_h, pad_left + x*stride_w)."""
    out = np.full((a["out_h"], a["out_w"], a["channels"]), a["value"], np.int8)
    top, left = a["pad_top"], a["pad_left"]
    out[top:top + (a["in_h"] - 1) * a["stride_h"] + 1:a["stride_h"],
        left:left + (a["in_w"] - 1) * a["stride_w"] + 1:a["stride_w"]] = x.reshape(a["in_h"], a["in_w"], -1)
    return out[None]


def resize(x: np.ndarray, a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """Bilinear (or nearest: weights 0) resize with Q15 weights, one exact rounding (half to even)."""
    one = np.int64(1 << 15)
    p = x.reshape(a["in_h"], a["in_w"], -1).astype(np.int64) - a["zero_point"]
    y0, y1, x0, x1 = (arr[k].astype(np.int64) for k in ("y0", "y1", "x0", "x1"))
    wy, wx = arr["wy"].astype(np.int64)[:, None, None], arr["wx"].astype(np.int64)[None, :, None]
    top = (one - wx) * p[y0][:, x0] + wx * p[y0][:, x1]
    bottom = (one - wx) * p[y1][:, x0] + wx * p[y1][:, x1]
    acc = (one - wy) * top + wy * bottom
    return _sat(div_round_half_even(acc, np.int64(1 << 30)) + a["zero_point"])[None]


def constant(a: dict[str, int], arr: dict[str, np.ndarray]) -> np.ndarray:
    """A quantized constant tensor (no input): its int8 values, in C layout."""
    return arr["values"].astype(np.int8).copy()


KERNELS: dict[str, Callable[..., np.ndarray]] = {
    "conv2d": conv2d, "fully_connected": fully_connected, "add": add, "requantize": requantize,
    "max_pool": max_pool, "avg_pool": avg_pool, "conv_pool": conv_pool, "reshape": reshape, "concat": concat,
    "softmax": softmax, "transpose_nchw": transpose_nchw, "lut": lut, "lut_channel": lut_channel,
    "gather": gather, "mul": mul, "pad": pad, "resize": resize, "mean_lut": mean_lut, "add_lut": add_lut,
    "constant": constant,
}


def run_op(op: Op, inputs: list[np.ndarray]) -> np.ndarray:
    """Run one op's reference kernel."""
    return KERNELS[op.kind](*inputs, op.attrs, op.arrays)


def run_graph(graph: IntGraph, x: np.ndarray) -> np.ndarray:
    """Run the whole integer graph on one int8 input in C layout; return the int8 output
    (with several inputs or outputs: all of them flattened and packed in order, as the C buffers hold them).

    >>> from edgekiln.codegen.ir import load_qdq
    >>> from edgekiln.codegen.testmodels import tiny_qdq_model
    >>> graph = load_qdq(tiny_qdq_model("tiny_int8.onnx"))
    >>> y = run_graph(graph, np.zeros(graph.tensors[graph.input].shape, np.int8))
    >>> y.shape, y.dtype
    ((1, 10), dtype('int8'))
    """
    if graph.extra_inputs:  # several inputs: x holds them all, flat and packed as the C buffer
        flat = np.asarray(x, np.int8).reshape(-1)
        values = {i: flat[off:off + graph.tensors[i].size].reshape(graph.tensors[i].shape)
                  for i, off in zip(graph.inputs, graph.input_offsets, strict=True)}
    else:
        values = {graph.input: np.asarray(x, np.int8).reshape(graph.tensors[graph.input].shape)}
    for op in graph.ops:
        y = run_op(op, [values[n] for n in op.inputs])
        values[op.output] = y.reshape(graph.tensors[op.output].shape)
    if graph.extra_outputs:
        return np.concatenate([values[o].reshape(-1) for o in graph.outputs])
    return values[graph.output]
