"""TFLite lowering of the IR's per-element kinds: lookup tables (``lut``, ``lut_channel``), ``mul``,
``add_lut``, ``mean_lut`` and ``softmax``. Each function takes the writer's lowering state and one IR
op, and adds TFLite tensors and operators (see :mod:`edgekiln.codegen.tflite.writer`).

**lut** (Sigmoid, HardSigmoid, HardSwish, Tanh, LeakyRelu, Elu, and the float islands of
``codegen/lower_island.py`` such as SiLU, as one 256-entry int8 table): written as ``CAST int8 ->
int32``, ``ADD 128`` (int32), ``GATHER`` from the table. NOTE: TFLite has no int8 table op, and
the native LOGISTIC/TANH kernels force a fixed output grid (1/256, 1/128) that needs a second
rounding step; the gather reproduces the table, so LiteRT and TFLM give the integer reference's
(and onnxruntime's) output bit for bit, for any function. The price is two int32 tensors (the cast
and the index) in the arena during the op, so large maps go through in row bands
(:meth:`~edgekiln.codegen.tflite.writer.Lowering.in_bands`); measured alternatives: TFLM has no
``CAST`` to uint8 and LiteRT no ``QUANTIZE`` to int32.

**lut_channel** (PRelu, a per-channel constant Mul/Add, ...: one table per channel) is the same
with a per-channel row offset ``c * 256 + 128`` added by a broadcasting int32 ADD.

**For CPU runtimes** (``float_islands``: the ``.tflite`` quantize offers LiteRT) a table whose island
is one float op (PRelu, Sigmoid, Tanh, HardSwish, LeakyRelu, SiLU; ``Op.float_form``) is written as
DEQUANTIZE, the float32 op, QUANTIZE instead: LiteRT's XNNPACK delegate runs those three but not
CAST/GATHER, so a GATHER splits the model into delegated partitions with reference kernels between
(MTCNN R-Net, 4 PRelus: 0.166 ms with tables, 0.063 ms with float islands, FP32 onnxruntime 0.132).

**Float operands** (``mul``, ``add_lut``, ``mean_lut`` reading a value the speed rule left float, such as
MobileNetV3's HardSwish read by its squeeze-excite mean and scale) are computed in float32 as
onnxruntime computes the QDQ model: the operand's real values gathered from a float32 table, the
arithmetic, QUANTIZE. NOTE: the IR's kernels hold those tables in 22-bit fixed point, so the two
round apart only where a result lies within ~1e-6 LSB of a .5 boundary (EfficientNet-B0, each op
alone: 4 of 10^6 outputs, 1 LSB).

>>> from edgekiln.codegen.ir import IntGraph, Op, QTensor
>>> from edgekiln.codegen.tflite.schema import op_names, read_model
>>> from edgekiln.codegen.tflite.writer import to_tflite_bytes
>>> t = {"x": QTensor("x", (1, 4), 0.1, 0), "y": QTensor("y", (1, 4), 0.1, 0)}
>>> negate = Op("lut", "neg", ["x"], "y", attrs=dict(size=4),
...             arrays=dict(table=np.clip(-np.arange(-128, 128), -128, 127).astype(np.int8)))
>>> op_names(read_model(to_tflite_bytes(IntGraph(t, [negate], "x", "y", "x", (1, 4), (1, 4)))))
['CAST', 'ADD', 'GATHER']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgekiln.codegen.tflite.schema import options

if TYPE_CHECKING:
    from edgekiln.codegen.tflite.writer import Lowering

#: offset from an int8 value to its table row (the IR's tables are indexed ``q + 128``).
TABLE_OFFSET = 128


def _lookup_into(low: Lowering, name: str, src: int, dst: int, shape: tuple[int, ...], table: np.ndarray,
                 row_offsets: np.ndarray) -> None:
    """``dst = table[src + row_offsets]`` (offsets broadcast over the last axis), band by band."""
    tab = low.g.add_tensor(name + "/table", table.shape, np.int8, data=table, scale=low.g.tensors[dst].scale,
                           zero_point=low.g.tensors[dst].zero_point)
    offset = low.g.add_tensor(name + "/offsets", row_offsets.shape, np.int32, data=row_offsets)

    def body(a: int, b: int, band: tuple[int, ...]) -> None:
        band_name = low.g.tensors[b].name
        wide = low.g.add_tensor(band_name + "/as_int32", band, np.int32)
        low.op("CAST", [a], [wide], options("CastOptions"))
        index = low.g.add_tensor(band_name + "/index", band, np.int32)
        low.op("ADD", [wide, offset], [index], options("AddOptions"))
        low.op("GATHER", [tab, index], [b], options("GatherOptions", axis=0))

    low.in_bands(src, dst, shape, name, body)


def _table_lookup(low: Lowering, op: Any, table: np.ndarray, row_offsets: np.ndarray) -> None:
    x, y = low.ir.tensors[op.inputs[0]], low.ir.tensors[op.output]
    _lookup_into(low, op.name, low.act(x.name), low.act(y.name), x.shape, table, row_offsets)


#: a float island's ONNX op -> the TFLite builtin computing it in float32 (and its options).
_FLOAT_OPS = {"PRelu": "PRELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH", "HardSwish": "HARD_SWISH",
              "LeakyRelu": "LEAKY_RELU"}


def _float_island(low: Lowering, op: Any) -> bool:
    """With ``low.float_islands``: the island as DEQUANTIZE, its float32 op, QUANTIZE (what
    onnxruntime computes for the QDQ model; LiteRT's XNNPACK runs all three in one delegated
    partition, where a GATHER would leave it). False when the op has no float form."""
    if not low.float_islands or op.float_form is None:
        return False
    kind, operand, attrs = op.float_form
    x, y = low.ir.tensors[op.inputs[0]], low.ir.tensors[op.output]
    xf = low.g.add_tensor(op.name + "/float_in", x.shape, np.float32)
    yf = low.g.add_tensor(op.name + "/float_out", x.shape, np.float32)
    low.op("DEQUANTIZE", [low.act(x.name)], [xf])
    if kind == "PRelu":
        slope = low.g.add_tensor(op.name + "/slope", operand.shape, np.float32, data=operand)
        low.op("PRELU", [xf, slope], [yf])
    elif kind == "SiLU":
        gate = low.g.add_tensor(op.name + "/sigmoid", x.shape, np.float32)
        low.op("LOGISTIC", [xf], [gate])
        low.op("MUL", [xf, gate], [yf], options("MulOptions"))
    elif kind == "LeakyRelu":
        low.op("LEAKY_RELU", [xf], [yf], options("LeakyReluOptions", alpha=float(attrs["alpha"])))
    else:
        low.op(_FLOAT_OPS[kind], [xf], [yf])
    low.op("QUANTIZE", [yf], [low.act(y.name)])
    return True


def lut(low: Lowering, op: Any) -> None:
    """``y = table[x + 128]`` as CAST, ADD and GATHER; the table is a constant int8 tensor on y's grid."""
    if _float_island(low, op):
        return
    table = np.asarray(op.arrays["table"], dtype=np.int8).reshape(-1)
    _table_lookup(low, op, table, np.array([TABLE_OFFSET], np.int32))


def lut_channel(low: Lowering, op: Any) -> None:
    """Per-channel tables (channels last): ``y[..., c] = table[c * 256 + x[..., c] + 128]``, as CAST,
    ADD of the per-channel row offsets (broadcast over the last axis) and GATHER from the flat table."""
    if _float_island(low, op):
        return
    table = np.asarray(op.arrays["table"], dtype=np.int8).reshape(-1)
    c = int(op.attrs["channels"])
    _table_lookup(low, op, table, np.arange(c, dtype=np.int32) * 256 + TABLE_OFFSET)


def _broadcast_operand(low: Lowering, op: Any, src: int, b_shape: tuple[int, ...], a_shape: tuple[int, ...]) -> int:
    """``b`` (one value per channel, or a scalar) reshaped to broadcast over ``a`` in TFLite's MUL."""
    n = int(op.attrs["b_channels"])
    want = tuple(a_shape) if n == 0 else (1,) * (len(a_shape) - 1) + (n,)
    if tuple(b_shape) == want:
        return src
    t = low.g.tensors[src]
    dst = low.g.add_tensor(op.name + "/b_broadcast", want, np.int8, scale=t.scale, zero_point=t.zero_point)
    low.reshape_to(src, dst, want, op.name + "/b")
    return dst


def _is_int8_table(table: np.ndarray, zero_point: int) -> bool:
    """Whether a ``mul``/``mean_lut`` operand table is the int8 tensor itself (``T[q] = q - z``)."""
    return bool(np.array_equal(np.asarray(table, np.int64).reshape(-1), np.arange(-128, 128) - zero_point))


def _real_values(low: Lowering, name: str, src: int, shape: tuple[int, ...], table: np.ndarray,
                 unit: float | None) -> int:
    """A float32 tensor of the real values an int8 operand stands for: DEQUANTIZE when ``unit`` is None
    (the operand is the int8 tensor itself), else ``table[q + 128] * unit`` gathered from a float32 table."""
    dst = low.g.add_tensor(name + "/real", shape, np.float32)
    if unit is None:
        low.op("DEQUANTIZE", [src], [dst])
        return dst
    values = (np.asarray(table, np.float64).reshape(-1) * unit).astype(np.float32)
    tab = low.g.add_tensor(name + "/real_table", values.shape, np.float32, data=values)
    offset = low.g.add_tensor(name + "/offsets", (1,), np.int32, data=np.array([TABLE_OFFSET], np.int32))
    wide = low.g.add_tensor(name + "/as_int32", shape, np.int32)
    low.op("CAST", [src], [wide], options("CastOptions"))
    index = low.g.add_tensor(name + "/index", shape, np.int32)
    low.op("ADD", [wide, offset], [index], options("AddOptions"))
    low.op("GATHER", [tab, index], [dst], options("GatherOptions", axis=0))
    return dst


def mul(low: Lowering, op: Any) -> None:
    """``y = zo + M * (Ta[a + 128] * Tb[b + 128])`` as TFLite MUL (broadcasting ``b`` per channel or scalar).

    Two int8 operands (``T[q] = q - z``) are one int8 MUL. An operand that is a float value the speed
    rule kept (a gate ``g = f(DQ(q))``, ``T`` its fixed point) is multiplied in float32, as onnxruntime
    runs the QDQ model: each operand's real values (DEQUANTIZE, or the table's values gathered as
    float32), MUL, QUANTIZE; in bands of rows of ``a``. NOTE: the table's real values are ``T * c``
    with ``c_a * c_b = M * s_y / 2^pre_shift`` (the only product the op records); an int8 operand's
    ``c`` is its scale. The IR kernel keeps 22 bits of each float table where float32 keeps 24, so
    the two may round apart where a product lands within ~1e-6 LSB of a .5 boundary.
    """
    a, b, y = (low.ir.tensors[n] for n in (*op.inputs, op.output))
    ta, tb = (np.asarray(op.arrays[k], np.int64).reshape(-1) for k in ("a_table", "b_table"))
    plain_a, plain_b = _is_int8_table(ta, a.zero_point), _is_int8_table(tb, b.zero_point)
    src_b = _broadcast_operand(low, op, low.act(b.name), b.shape, a.shape)
    dst, act = low.out(op)
    opts = options("MulOptions", fusedActivationFunction=act)
    if plain_a and plain_b:
        low.op("MUL", [low.act(a.name), src_b], [dst], opts)
        return
    product = int(op.attrs["mult"]) * 2.0 ** (int(op.attrs["shift"]) - 31) * y.scale / 2.0 ** int(op.attrs["pre_shift"])
    if plain_a:
        unit_a, unit_b = None, product / a.scale
    elif plain_b:
        unit_a, unit_b = product / b.scale, None
    else:
        unit_a = 1.0 / float(np.abs(ta).max() or 1)
        unit_b = product / unit_a
    b_shape = tuple(low.g.tensors[src_b].shape)
    real_b = _real_values(low, op.name + "/b", src_b, b_shape, tb, unit_b)
    # NOTE: the fused activation acts on the float product: Q is monotone with Q(0) = zo, so
    # RELU/RELU6 there equal the IR's clamp on the int8 grid.

    def body(part: int, out: int, band: tuple[int, ...]) -> None:
        prefix = low.g.tensors[out].name
        prod = low.g.add_tensor(prefix + "/product", band, np.float32)
        low.op("MUL", [_real_values(low, prefix + "/a", part, band, ta, unit_a), real_b], [prod], opts)
        low.op("QUANTIZE", [prod], [out])

    _banded(low, op, a, dst, body)


def _banded(low: Lowering, op: Any, a: Any, dst: int, body: Any) -> None:
    """``body`` over ``a`` in bands of rows (``low.in_bands``), or once when ``b`` has ``a``'s shape (not split)."""
    if op.attrs["b_channels"] == 0:
        body(low.act(a.name), dst, a.shape)
    else:
        low.in_bands(low.act(a.name), dst, a.shape, op.name, body)


def add_lut(low: Lowering, op: Any) -> None:
    """``y = zo + M * (Ta[a + 128] + Tb[b + 128])`` (Add with a broadcast or float operand, Sub: the IR's
    tables hold each operand's real values in one fixed point ``2^-k = M * s_y``, Sub's ``b`` negated) in
    float32, as onnxruntime runs it: both operands' real values gathered as float32, ADD (``b``
    broadcast per channel or scalar), QUANTIZE; in bands of rows of ``a``."""
    a, b = (low.ir.tensors[n] for n in op.inputs)
    y = low.ir.tensors[op.output]
    unit = int(op.attrs["mult"]) * 2.0 ** (int(op.attrs["shift"]) - 31) * y.scale
    ta, tb = (np.asarray(op.arrays[k], np.int64).reshape(-1) for k in ("a_table", "b_table"))
    src_b = _broadcast_operand(low, op, low.act(b.name), b.shape, a.shape)
    real_b = _real_values(low, op.name + "/b", src_b, tuple(low.g.tensors[src_b].shape), tb, unit)
    dst, act = low.out(op)

    def body(part: int, out: int, band: tuple[int, ...]) -> None:
        prefix = low.g.tensors[out].name
        total = low.g.add_tensor(prefix + "/sum", band, np.float32)
        low.op("ADD", [_real_values(low, prefix + "/a", part, band, ta, unit), real_b], [total],
               options("AddOptions", fusedActivationFunction=act))
        low.op("QUANTIZE", [total], [out])

    _banded(low, op, a, dst, body)


def mean_lut(low: Lowering, op: Any) -> None:
    """``y[c] = zo + M * sum over pixels of T[x + 128]`` (the mean of a float value the speed rule kept,
    an SE squeeze) in float32, as onnxruntime runs it: per band of rows the table's real values
    (``T * 2^-k``, gathered as float32) summed over H and W (SUM), the band sums added (CONCATENATION,
    SUM), times ``1 / pixels`` (MUL), QUANTIZE onto y's grid."""
    a = op.attrs
    x, y = low.ir.tensors[op.inputs[0]], low.ir.tensors[op.output]
    table = np.asarray(op.arrays["table"], np.int64).reshape(-1)
    unit = int(a["mult"]) * 2.0 ** (int(a["shift"]) - 31) * int(a["pixels"]) * y.scale
    c = int(a["channels"])
    axes = low.g.add_tensor(op.name + "/hw_axes", (2,), np.int32, data=np.array([1, 2], np.int32))
    sums = []
    for i, part in enumerate(low.split_rows(low.act(x.name), x.shape, op.name)):
        band = tuple(low.g.tensors[part].shape)
        sums.append(low.g.add_tensor(f"{op.name}/sum{i}", (1, 1, 1, c), np.float32))
        low.op("SUM", [_real_values(low, f"{op.name}/band{i}", part, band, table, unit), axes], [sums[-1]],
               options("ReducerOptions", keepDims=True))
    total = sums[0]
    if len(sums) > 1:
        stacked = low.g.add_tensor(op.name + "/band_sums", (1, len(sums), 1, c), np.float32)
        low.op("CONCATENATION", sums, [stacked], options("ConcatenationOptions", axis=1))
        total = low.g.add_tensor(op.name + "/sum", (1, 1, 1, c), np.float32)
        low.op("SUM", [stacked, axes], [total], options("ReducerOptions", keepDims=True))
    inv = low.g.add_tensor(op.name + "/inv_pixels", (), np.float32, data=np.array(1.0 / int(a["pixels"]), np.float32))
    mean = low.g.add_tensor(op.name + "/mean", (1, 1, 1, c), np.float32)
    low.op("MUL", [total, inv], [mean], options("MulOptions"))
    if len(y.shape) != 4:  # a ReduceMean with keepdims=0
        flat = low.g.add_tensor(op.name + "/mean_flat", y.shape, np.float32)
        low.reshape_to(mean, flat, y.shape, op.name + "/mean")
        mean = flat
    low.op("QUANTIZE", [mean], [low.act(y.name)])


def softmax(low: Lowering, op: Any) -> None:
    """The IR's integer softmax ``q = zo + floor(T[max - x] * inv / sum(T) + 1/2)`` (``T`` its Q16 exp table,
    ``inv = floor(1 / s_y)`` as onnxruntime's QLinearSoftmax) in float32 ops whose values are exact
    integers: CAST to float32, REDUCE_MAX, SUB, ADD and CAST to the int32 index, GATHER from ``T``
    (reversed), SUM, MUL by ``inv``, DIV, ADD 1/2, FLOOR, QUANTIZE (scale 1, the output zero point),
    RESHAPE onto y's grid; in bands of rows.

    NOTE: not TFLite's int8 SOFTMAX: its exp table and fixed 1/256 output grid put it 1 LSB from the
    reference on ~20% of the outputs (YOLOv8's box-distribution softmax, whose 16 bins a convolution then
    weights: up to 12 LSB on a box; MTCNN P-Net's score map: 85-97% of outputs identical, now 100%, for
    1.050 -> 1.114 ms p50 in LiteRT, 1 thread, CPU time round-robin). The values before the division are
    integers float32 holds exactly while ``T * inv`` and the row sum stay below ``2^24`` (``T <= 2^16``:
    an output scale of at least 1/256, up to 256 classes); past that, and at the division, float32
    rounds, so the result can leave the reference only where the quotient is within ~1e-7 of a .5 tie.
    """
    x, y = low.ir.tensors[op.inputs[0]], low.ir.tensors[op.output]
    a = op.attrs
    inv = int(a["inv_mult"]) * 2.0 ** -int(a["div_shift"])
    table = np.asarray(op.arrays["lut"], np.float32)[::-1].copy()  # index 255 + (x - max) reads T[max - x]
    tab = low.g.add_tensor(op.name + "/exp_table", table.shape, np.float32, data=table)
    last = low.g.add_tensor(op.name + "/last_axis", (1,), np.int32, data=np.array([len(x.shape) - 1], np.int32))
    consts = {k: low.g.add_tensor(f"{op.name}/{k}", (), np.float32, data=np.array(v, np.float32))
              for k, v in (("offset", 255.0), ("inv", inv), ("half", 0.5))}
    dst = low.act(y.name)

    def body(part: int, out: int, band: tuple[int, ...]) -> None:
        prefix = low.g.tensors[out].name
        rows = (*band[:-1], 1)
        f = {k: low.g.add_tensor(f"{prefix}/{k}", rows if k in ("max", "sum") else band, np.float32)
             for k in ("x", "max", "diff", "at", "exp", "sum", "scaled", "ratio", "rounded", "q")}
        index = low.g.add_tensor(prefix + "/index", band, np.int32)
        low.op("CAST", [part], [f["x"]], options("CastOptions"))
        low.op("REDUCE_MAX", [f["x"], last], [f["max"]], options("ReducerOptions", keepDims=True))
        low.op("SUB", [f["x"], f["max"]], [f["diff"]], options("SubOptions"))
        low.op("ADD", [f["diff"], consts["offset"]], [f["at"]], options("AddOptions"))
        low.op("CAST", [f["at"]], [index], options("CastOptions"))
        low.op("GATHER", [tab, index], [f["exp"]], options("GatherOptions", axis=0))
        low.op("SUM", [f["exp"], last], [f["sum"]], options("ReducerOptions", keepDims=True))
        low.op("MUL", [f["exp"], consts["inv"]], [f["scaled"]], options("MulOptions"))
        low.op("DIV", [f["scaled"], f["sum"]], [f["ratio"]], options("DivOptions"))
        low.op("ADD", [f["ratio"], consts["half"]], [f["rounded"]], options("AddOptions"))
        low.op("FLOOR", [f["rounded"]], [f["q"]])
        ints = low.temp(prefix + "/levels", band, 1.0, y.zero_point)  # q - zo, counted in output steps
        low.op("QUANTIZE", [f["q"]], [ints])
        low.reshape_to(ints, out, band, prefix + "/on_output_grid")

    low.in_bands(low.act(x.name), dst, x.shape, op.name, body)


#: IR kind -> (lowering function, the TFLite ops it writes), merged into the writer's table.
KINDS = {
    "lut": (lut, "CAST + ADD + GATHER (the exact 256-entry table)"),
    "lut_channel": (lut_channel, "CAST + ADD (per-channel row offsets) + GATHER (the exact C x 256 table)"),
    "mul": (mul, "MUL (int8; with a float operand: its float32 values, MUL, QUANTIZE)"),
    "softmax": (softmax, "the reference's integer softmax in exact float32 steps (GATHER of its exp table, SUM, DIV, "
                         "FLOOR), QUANTIZE"),
    "add_lut": (add_lut, "ADD in float32 of both operands' values (CAST + ADD + GATHER), QUANTIZE"),
    "mean_lut": (mean_lut, "CAST + ADD + GATHER (float32 values) + SUM per band, SUM, MUL, QUANTIZE"),
}
