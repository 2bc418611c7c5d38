"""The fixed-point requantization mode: TFLite Micro's reference int8 arithmetic, bit for bit.

``export --to c --requant fixed-point`` builds a library whose conv, depthwise, fully connected and
Add layers requantize as TFLite Micro's reference kernels and CMSIS-NN's ``arm_nn_requantize`` do, so
its int8 outputs are identical to TFLM running the ``.tflite`` of ``export --to tflite`` of the same
QDQ model. The default mode, ``float32-exact`` (:mod:`edgekiln.codegen.binary32`), is bit-exact with
onnxruntime instead; the two differ by 1 LSB on a few outputs per layer, which compounds.

The arithmetic (gemmlowp's, two roundings)::

    real  = double(s_in) * double(s_w[c]) / double(s_out)     # TFLM's Prepare, in double
    m, e  = frexp(real); q = round_half_away(m * 2**31)       # int32 multiplier q, exponent e
    x     = acc * 2**max(e, 0)
    x     = floor((x * q + 2**30) / 2**31)                    # saturating rounding doubling high multiply
    y     = round_half_away(x / 2**max(-e, 0))                # rounding divide by a power of two
    out   = clamp(y + zp_out, act_min, act_max)

TFLM's Add uses the same multiply on both inputs, shifted left by 20, and on their sum, with
multipliers computed as in its ``Prepare`` (:func:`add_multipliers`). An average over whole axes (a
global pool, which the TFLite writer writes as MEAN) is TFLM's integer MEAN: the window sum of
``x - zp_in`` times one multiplier that also divides by the element count (:func:`mean_multiplier`).
A windowed average on one grid (AVERAGE_POOL_2D) is TFLM's: the raw values' sum over the in-bounds
window divided by their count, ties away from zero (``mult == 0`` marks it). A concat input on another
grid than the output, which the TFLite writer requantizes through float32 (DEQUANTIZE + QUANTIZE), gets a
256-entry table computed with TFLM's float32 arithmetic (:func:`tflm_requant_table`) in front of the
concat, and a requantization onto another grid (after a max pool or a reshape) becomes that table. Max pooling, reshapes, clamps, data movement and nearest resizing have no rounding, and the
lookup tables (activations, PRelu) and the integer softmax are written into the ``.tflite`` as the very
computation the C runs: all the same in both modes. Other ops (Mul, the float-operand Add/mean of
squeeze-excite blocks, bilinear resize, ...) are refused in this mode with the op named
(:func:`to_fixed_point`), rather than exported with a silent difference.

>>> m, e = tflm_multiplier(np.array([0.75]))
>>> m.tolist(), e.tolist()
([1610612736], [0])
>>> requant_fixed(np.array([2, -2, 6, -6]), *tflm_multiplier(np.array([0.25]))).tolist()  # shift: ties away from 0
[1, -1, 2, -2]
>>> requant_fixed(np.array([3, -3]), *tflm_multiplier(np.array([0.5]))).tolist()  # no shift: the multiply rounds up
[2, -1]
"""

from __future__ import annotations

import numpy as np

from edgekiln.codegen.ir import IntGraph, Op, QTensor
from edgekiln.errors import EdgekilnError

FLOAT32_EXACT = "float32-exact"
FIXED_POINT = "fixed-point"
#: the requantization modes of ``export --to c --requant``; the first is the default.
REQUANT_MODES = (FLOAT32_EXACT, FIXED_POINT)
#: op attribute marking a conv/fc/add op that requantizes in the fixed-point mode (read by reference.py).
FIXED_ATTR = "requant_fixed"
#: left shift of both Add inputs in TFLM's int8 Add (``left_shift = 20``).
ADD_LEFT_SHIFT = 20
#: IR kinds computed the same way in both modes: no rounding, or a table the TFLite writer writes as the very
#: table (``lut``/``lut_channel`` as GATHER) or, for softmax, the reference's integer steps in exact float32.
SAME_IN_BOTH = ("max_pool", "reshape", "gather", "pad", "transpose_nchw", "constant", "lut", "lut_channel", "softmax")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`REQUANT_MODES`, else a one-line error."""
    if mode not in REQUANT_MODES:
        raise EdgekilnError(f"--requant {mode!r} is not a requantization mode; choose one of: "
                            f"{', '.join(REQUANT_MODES)}")
    return mode


def tflm_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's ``QuantizeMultiplier`` per element: ``real ~= q * 2**(e - 31)``, ``q`` in ``[2**30, 2**31)``.

    ``round`` is half away from zero (``TfLiteRound``); a multiplier below ``2**-31`` (``e < -31``)
    becomes ``(0, 0)``, as in TFLite.
    """
    r = np.atleast_1d(np.asarray(real, dtype=np.float64))
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise EdgekilnError(f"requantization multiplier {r[~np.isfinite(r) | (r < 0)][0]!r} must be finite and >= 0")
    frac, exp = np.frexp(r)
    q = np.floor(frac * float(1 << 31) + 0.5).astype(np.int64)  # frac >= 0: half away from zero
    up = q == (1 << 31)
    q = np.where(up, q // 2, q)
    exp = np.where(up, exp + 1, exp).astype(np.int64)
    tiny = (exp < -31) | (r == 0)
    if np.any(~tiny & (exp > 30)):
        raise EdgekilnError(f"requantization multiplier {float(r.max())!r} is too large (>= 2**30) for int32 fixed point")
    return np.where(tiny, 0, q).astype(np.int32), np.where(tiny, 0, exp).astype(np.int32)


def conv_multipliers(x_scale: float, w_scale: np.ndarray, y_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(q, e)`` of a conv/depthwise/FC layer as TFLM's Prepare computes them: the float32
    scales of the ``.tflite`` promoted to double, ``s_in * s_w / s_out``."""
    f = np.float32
    w = np.asarray(w_scale, dtype=f).astype(np.float64).reshape(-1)
    real = np.float64(f(x_scale)) * w / np.float64(f(y_scale))
    return tflm_multiplier(real)


def _srdhm(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul: ``floor((x * q + 2**30) / 2**31)``, on int64."""
    prod = x * q
    sat = (x == -(1 << 31)) & (q == -(1 << 31))
    return np.where(sat, (1 << 31) - 1, (prod + (1 << 30)) >> 31)


def _rounding_divide_by_pot(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: ``x / 2**e`` rounded to nearest, ties away from zero."""
    mask = (np.int64(1) << e) - 1
    rem = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (rem > threshold)


def requant_fixed(acc: np.ndarray | int, q: np.ndarray | int, e: np.ndarray | int) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier(acc, q, e)`` (two roundings), exactly, on int64.

    ``acc`` int32-ranged; ``q``/``e`` broadcast (per channel on the last axis). A multiplier >= 1 (``e > 0``,
    a left shift first) is computed exactly here; the C kernels take ``e <= 0`` only, and the export refuses
    such layers (:func:`to_fixed_point`).
    """
    acc = np.asarray(acc, dtype=np.int64)
    q = np.asarray(q, dtype=np.int64)
    e = np.asarray(e, dtype=np.int64)
    left = np.maximum(e, 0)
    x = _srdhm(acc << left, q)
    return _rounding_divide_by_pot(x, np.maximum(-e, 0)).astype(np.int64)


def add_multipliers(a_scale: float, b_scale: float, y_scale: float) -> dict[str, int]:
    """The int8 Add's multipliers as TFLM's Prepare computes them (double arithmetic on float32 scales)."""
    f = np.float32
    sa, sb, sy = (float(f(s)) for s in (a_scale, b_scale, y_scale))
    twice_max = 2.0 * max(sa, sb)
    (am,), (ash,) = tflm_multiplier(np.array([sa / twice_max]))
    (bm,), (bsh,) = tflm_multiplier(np.array([sb / twice_max]))
    (om,), (osh,) = tflm_multiplier(np.array([twice_max / ((1 << ADD_LEFT_SHIFT) * sy)]))
    return dict(a_mult=int(am), a_shift=int(ash), b_mult=int(bm), b_shift=int(bsh), out_mult=int(om),
                out_shift=int(osh), left_shift=ADD_LEFT_SHIFT)


def mean_multiplier(x_scale: float, y_scale: float, count: int) -> tuple[int, int]:
    """``(q, e)`` of TFLM's integer MEAN over ``count`` elements: the ``s_in / s_out`` multiplier with the
    division by ``count`` folded in (``q * 2**shift // count``, ``shift`` the largest power of two in
    ``count``, at most 32 and ``31 + e``), applied with :func:`requant_fixed` to the sum of ``x - zp_in``."""
    f = np.float32
    (q,), (e,) = tflm_multiplier(np.array([np.float64(f(x_scale)) / np.float64(f(y_scale))]))
    shift = min(int(count).bit_length() - 1, 32, 31 + int(e))
    return (int(q) << shift) // int(count), int(e) - shift


def whole_axes_mean(pool: dict[str, int]) -> bool:
    """Whether pooling attrs ``pool`` average whole axes and keep the others (the TFLite writer's MEAN)."""
    if pool["pad_top"] or pool["pad_left"]:
        return False
    axes = (("out_h", "in_h", "k_h", "stride_h"), ("out_w", "in_w", "k_w", "stride_w"))
    whole = [pool[o] == 1 and pool[k] == pool[i] for o, i, k, _ in axes]
    kept = [pool[k] == 1 and pool[st] == 1 and pool[o] == pool[i] for o, i, k, st in axes]
    return any(whole) and all(w or k for w, k in zip(whole, kept, strict=True))


def _refuse(op: Op, why: str) -> EdgekilnError:
    return EdgekilnError(f"--requant fixed-point: op {op.kind} (node {op.name!r}) {why}; export it with "
                         f"--requant {FLOAT32_EXACT}")


def tflm_requant_table(x_scale: float, x_zp: int, y_scale: float, y_zp: int) -> np.ndarray:
    """int8 -> int8 table of TFLM's DEQUANTIZE then QUANTIZE: ``float32(s_x) * (q - zp_x)`` in float32, divided
    by ``float32(s_y)`` in float32, rounded half away from zero, plus ``zp_y``, saturated."""
    f = np.float32
    q = np.arange(-128, 128, dtype=np.int64)
    real = (f(x_scale) * (q - x_zp).astype(f)).astype(f)
    v = (real / f(y_scale)).astype(np.float64)
    r = np.where(v >= 0, np.floor(v + 0.5), np.ceil(v - 0.5))
    return np.clip(r + y_zp, -128, 127).astype(np.int8)


def _same_or_valid(pool: dict[str, int]) -> bool:
    """Whether the window's pads are TFLite's SAME or VALID (what AVERAGE_POOL_2D can express)."""
    ok = []
    for o, i, k, st, pad in (("out_h", "in_h", "k_h", "stride_h", "pad_top"), ("out_w", "in_w", "k_w", "stride_w",
                                                                                "pad_left")):
        n, s = pool[i], pool[st]
        total = max((-(-n // s) - 1) * s + pool[k] - n, 0)
        same = pool[o] == -(-n // s) and pool[pad] == total // 2
        ok.append(same or (pool[pad] == 0 and pool[o] == (n - pool[k]) // s + 1))
    return all(ok)


def _mean(op: Op, pool: dict[str, int], x: QTensor, y: QTensor) -> tuple[int, int]:
    """TFLM's (q, e) of a whole-axes mean; (0, 0) marks a windowed average (AVERAGE_POOL_2D) on one grid."""
    if not whole_axes_mean(pool):
        if pool["count_include_pad"] or (x.scale, x.zero_point) != (y.scale, y.zero_point) or \
                not _same_or_valid(pool):
            raise _refuse(op, "averages windows counting the padding, with pads neither SAME nor VALID, or onto "
                          "another grid (TFLite Micro's AVERAGE_POOL_2D cannot)")
        return 0, 0
    q, e = mean_multiplier(x.scale, y.scale, pool["k_h"] * pool["k_w"])
    if e > 0 or q == 0:
        raise _refuse(op, f"has a mean multiplier outside TFLite Micro's integer range (q {q}, exponent {e})")
    return q, e


def _requant_concat_inputs(graph: IntGraph, op: Op) -> list[Op]:
    """Table ops moving each concat input on another grid onto the output's (as the .tflite does), the
    concat then copying: its per-input multipliers become the identity."""
    from edgekiln.quant.fixed_point import quantize_multiplier

    y = graph.tensors[op.output]
    tables, inputs = [], []
    for name in op.inputs:
        x = graph.tensors[name]
        if (x.scale, x.zero_point) != (y.scale, y.zero_point):
            t = QTensor(f"{name}__to_{op.name}", x.shape, y.scale, y.zero_point)
            graph.tensors[t.name] = t
            tables.append(Op("lut", f"{op.name}/requantize_{len(tables)}", [name], t.name,
                             attrs={"size": x.size, FIXED_ATTR: 1},
                             arrays={"table": tflm_requant_table(x.scale, x.zero_point, y.scale, y.zero_point)}))
            name = t.name
        inputs.append(name)
    one, one_shift = quantize_multiplier(1.0)
    op.inputs = inputs
    op.arrays = dict(op.arrays, zps=np.full(len(inputs), y.zero_point, np.int32),
                     mult=np.full(len(inputs), one, np.int32), shift=np.full(len(inputs), one_shift, np.int32))
    op.attrs = dict(op.attrs, **{FIXED_ATTR: 1})
    return tables


def _convert(graph: IntGraph, op: Op) -> None:
    if op.kind in SAME_IN_BOTH:  # (a constant has no input)
        return
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.output]
    if op.kind == "conv_pool":  # the conv writes the scratch rows' grid; the pool reads it
        mid = graph.tensors[op.scratch]
        if op.attrs["pool_is_avg"]:
            pool = {k[len("pool_"):]: v for k, v in op.attrs.items() if k.startswith("pool_")}
            q, e = _mean(op, pool, mid, y)
            op.attrs = dict(op.attrs, pool_mult=q, pool_shift=e, **{"pool_" + FIXED_ATTR: 1})
        y = mid
    if op.kind == "avg_pool":
        q, e = _mean(op, op.attrs, x, y)
        op.attrs = dict(op.attrs, mult=q, shift=e)
    elif op.kind in ("conv2d", "conv_pool", "fully_connected"):
        if op.weight_scale is None:
            raise _refuse(op, "carries no weight scales (not lowered from a QDQ model)")
        q, e = conv_multipliers(x.scale, op.weight_scale, y.scale)
        if np.any(e > 0):
            raise _refuse(op, f"has a requantization multiplier >= 1 (exponent {int(e.max())})")
        op.arrays = dict(op.arrays, mult=q, shift=e)
    elif op.kind == "add":
        b = graph.tensors[op.inputs[1]]
        op.attrs = dict(op.attrs, **add_multipliers(x.scale, b.scale, y.scale))
    elif op.kind == "requantize":
        if (x.scale, x.zero_point) == (y.scale, y.zero_point):
            return  # a clamp: no rounding
        if (op.attrs["act_min"], op.attrs["act_max"]) != (-128, 127):
            raise _refuse(op, "changes the scale and clamps (the .tflite computes that as RELU/RELU6 or float32 "
                          "steps edgekiln does not reproduce)")
        # NOTE: the .tflite moves the values through float32 (DEQUANTIZE + QUANTIZE): as a table, exactly
        op.kind, op.attrs = "lut", {"size": x.size}
        op.arrays = {"table": tflm_requant_table(x.scale, x.zero_point, y.scale, y.zero_point)}
    elif op.kind == "resize" and not (np.any(op.arrays["wy"]) or np.any(op.arrays["wx"])):
        return  # nearest: a copy of source pixels (the .tflite gathers the same ones)
    else:
        raise _refuse(op, "has no TFLite Micro-identical integer kernel in edgekiln")
    op.attrs = dict(op.attrs, **{FIXED_ATTR: 1})


def to_fixed_point(graph: IntGraph) -> IntGraph:
    """Switch ``graph`` (from :func:`~edgekiln.codegen.fuse.lower_for_c`) to the fixed-point mode, in place.

    Conv/FC ops get TFLM's per-channel ``(q, e)`` in ``arrays['mult'/'shift']``, Add ops TFLM's
    multipliers, global average pools TFLM's MEAN multiplier, and each the attribute :data:`FIXED_ATTR`;
    an op whose TFLM arithmetic edgekiln does not implement raises a one-line :class:`EdgekilnError`
    naming it.

    >>> from edgekiln.codegen.fuse import lower_for_c
    >>> from edgekiln.codegen.testmodels import tiny_qdq_model
    >>> g = to_fixed_point(lower_for_c(tiny_qdq_model("tiny_int8.onnx")))
    >>> [op.attrs.get(FIXED_ATTR, 0) for op in g.ops]
    [1, 1, 0, 1]
    """
    ops: list[Op] = []
    for op in graph.ops:
        if op.kind == "concat":
            ops += _requant_concat_inputs(graph, op)
        else:
            _convert(graph, op)
        ops.append(op)
    graph.ops = ops
    return graph


def apply_mode(graph: IntGraph, mode: str) -> IntGraph:
    """``graph`` in requantization ``mode`` (:data:`REQUANT_MODES`): unchanged for float32-exact."""
    return to_fixed_point(graph) if check_mode(mode) == FIXED_POINT else graph
