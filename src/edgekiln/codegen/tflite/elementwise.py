"""TFLite lowering of the IR's per-element kinds: lookup tables (``lut``, ``lut_channel``) and
``mul``. Each function takes the writer's lowering state and one IR op, and adds TFLite tensors
and operators (see :mod:`edgekiln.codegen.tflite.writer`).

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


def lut(low: Lowering, op: Any) -> None:
    """``y = table[x + 128]`` as CAST, ADD and GATHER; the table is a constant int8 tensor on y's grid."""
    table = np.asarray(op.arrays["table"], dtype=np.int8).reshape(-1)
    _table_lookup(low, op, table, np.array([TABLE_OFFSET], np.int32))


def lut_channel(low: Lowering, op: Any) -> None:
    """Per-channel tables (channels last): ``y[..., c] = table[c * 256 + x[..., c] + 128]``, as CAST,
    ADD of the per-channel row offsets (broadcast over the last axis) and GATHER from the flat table."""
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


def mul(low: Lowering, op: Any) -> None:
    """``y = zo + M * ((a - za) * T[b + 128])`` as TFLite MUL (broadcasting ``b`` per channel or scalar).

    For an int8 ``b`` the table is ``q - zb`` and MUL is the same product. For a float gate kept by
    the speed rule (``T`` = the gate in fixed point, ``M = s_a * 2^-k / s_y``) the gate goes through
    an exact table first, onto a symmetric int8 grid of step ``max|g| / 127``, then MUL. NOTE: the
    one approximation in this writer: the gate rounded to 8 bits (15 in the C kernel), an error of
    at most half a gate step times ``|a|``, about half an output LSB where ``a * max|g|`` spans the
    output range (measured on an SE block: 95% of outputs identical, none off by more than 1 LSB).
    """
    a, b, y = (low.ir.tensors[n] for n in (*op.inputs, op.output))
    table = np.asarray(op.arrays["b_table"], dtype=np.int64).reshape(-1)
    src_b = low.act(b.name)
    if not np.array_equal(table, np.arange(-128, 128) - b.zero_point):
        m, shift = int(op.attrs["mult"]), int(op.attrs["shift"])
        gate = table * (m * 2.0 ** (shift - 31)) * y.scale / a.scale  # the gate's real values, T * 2^-k
        step = float(np.abs(gate).max()) / 127 or 1.0
        gq = np.clip(np.rint(gate / step), -127, 127).astype(np.int8)
        g_t = low.temp(op.name + "/gate", b.shape, step, 0)
        _lookup_into(low, op.name + "/gate", src_b, g_t, b.shape, gq, np.array([TABLE_OFFSET], np.int32))
        src_b = g_t
    src_b = _broadcast_operand(low, op, src_b, b.shape, a.shape)
    dst, act = low.out(op)
    low.op("MUL", [low.act(a.name), src_b], [dst], options("MulOptions", fusedActivationFunction=act))


#: IR kind -> (lowering function, the TFLite ops it writes), merged into the writer's table.
KINDS = {
    "lut": (lut, "CAST + ADD + GATHER (the exact 256-entry table)"),
    "lut_channel": (lut_channel, "CAST + ADD (per-channel row offsets) + GATHER (the exact C x 256 table)"),
    "mul": (mul, "MUL (a float gate first through a table onto int8)"),
}
