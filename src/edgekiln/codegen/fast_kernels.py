"""Which fast kernel of ``c/ek_kernels_dsp.h`` runs each layer, and the data it needs, prepared at export time.

A conv, fused conv -> max pool, depthwise, pointwise or fully connected layer whose shape the fast kernels
cover gets a :class:`FastKernel`: the kernel's name, the im2col scratch it needs in the arena (planned by
:mod:`edgekiln.codegen.planner`) and its arrays in the layout the SIMD loops read (weights rearranged,
input offset folded into the bias where the kernel reads raw int8, requantization packed one word per
channel). Anything else keeps the portable kernel of ``ek_kernels.c``. The choice depends only on the
layer, not on the target: the same generated C runs the DSP instructions on ARMv7E-M and their portable
C emulation elsewhere, bit-exact either way (tests/golden/test_c_kernels_dsp.py).

>>> from edgekiln.codegen.fuse import lower_for_c
>>> from edgekiln.codegen.testmodels import tiny_qdq_model
>>> graph = lower_for_c(tiny_qdq_model("tiny_int8.onnx"))
>>> [(k.name, k.scratch_bytes) if k else None for k in map(choose, graph.ops)]
[('conv_maxpool2', 64), ('conv_maxpool2', 176), None, ('fc', 0)]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekiln.codegen.ir import Op
from edgekiln.codegen.requant_fixed import FIXED_ATTR

#: most taps a depthwise kernel takes (its tap pointer array: 7x7 + the zero pad tap).
MAX_DW_TAPS = 50
#: requantization right shift (rshift - 24) range the packed fast path takes (ek_requant_b32_packed).
PACKED_SHIFT_RANGE = (1, 31)
#: Cortex-M4 ``-mthumb -Os`` code bytes of one layer's specialised function (``op{i}_run`` with the kernel
#: inlined), the largest measured with arm-none-eabi-gcc 12 on tests/golden/test_c_kernels_dsp.py's shapes
#: (conv 800-1418, conv_maxpool2 924-1076, depthwise 752-784, pointwise 596-780, fc 516-676); every layer has its
#: own copy. Layers without one share the portable kernels of ek_kernels.c. In the fixed-point requantization mode the
#: same layers measured 70-150 B smaller (DS-CNN, MNIST CNN): these stay the bound.
CODE_BYTES = {"conv": 1420, "conv_maxpool2": 1080, "depthwise": 790, "pointwise": 780, "fc": 680}


@dataclass(frozen=True)
class FastKernel:
    """``name``: conv | conv_maxpool2 | pointwise | depthwise | fc; ``kp``: im2col row length (values)."""

    name: str
    scratch_bytes: int = 0
    kp: int = 0


def im2col_length(k_h: int, k_w: int, in_c: int) -> int:
    """Values in one im2col row: each row of taps in int16 pairs, the whole a multiple of 4 (ek_im2col_pixel)."""
    words = k_h * (-(-k_w * in_c // 2))
    return 2 * (words + (words & 1))


def _conv_attrs(op: Op) -> dict[str, int]:
    return {k: v for k, v in op.attrs.items() if not k.startswith("pool_") and k != "rows"}


def choose(op: Op) -> FastKernel | None:
    """The fast kernel for ``op``, or None when the portable kernel runs it."""
    if op.kind == "fully_connected":
        return FastKernel("fc")
    if op.kind not in ("conv2d", "conv_pool"):
        return None
    a = _conv_attrs(op)
    if a["dil_h"] != 1 or a["dil_w"] != 1:
        return None
    kp = im2col_length(a["k_h"], a["k_w"], a["in_c"] // a["groups"])
    if op.kind == "conv_pool":
        p = {k[5:]: v for k, v in op.attrs.items() if k.startswith("pool_")}
        two_by_two = (p["is_avg"] == 0 and p["k_h"] == p["k_w"] == p["stride_h"] == p["stride_w"] == 2
                      and p["pad_top"] == p["pad_left"] == 0 and 2 * p["out_h"] <= a["out_h"]
                      and 2 * p["out_w"] <= a["out_w"])
        if a["groups"] != 1 or not two_by_two:
            return None
        return FastKernel("conv_maxpool2", scratch_bytes=2 * kp * 2 + 4 * a["out_c"], kp=kp)
    if a["groups"] == 1:
        if a["k_h"] == a["k_w"] == a["stride_h"] == a["stride_w"] == 1 and a["pad_top"] == a["pad_left"] == 0:
            return FastKernel("pointwise")
        return FastKernel("conv", scratch_bytes=2 * kp * 2, kp=kp)
    if a["groups"] == a["in_c"] == a["out_c"] and a["k_h"] * a["k_w"] < MAX_DW_TAPS:
        return FastKernel("depthwise")
    return None


def pack_requant(mult: np.ndarray, shift: np.ndarray) -> np.ndarray | None:
    """One word per channel, ``(mant << 8) | (rshift - 24)``, as uint32 values in an int64 array; None when
    a channel's shift is outside :data:`PACKED_SHIFT_RANGE` (the layer then calls ``ek_requant_b32``).

    >>> pack_requant(np.array([12582912]), np.array([31])).tolist()
    [3221225479]
    """
    t = np.asarray(shift, np.int64) - 24
    if np.any((t < PACKED_SHIFT_RANGE[0]) | (t > PACKED_SHIFT_RANGE[1])):
        return None
    return (np.asarray(mult, np.int64) << 8) | t


def pack_fixed(mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The fixed-point mode's words (``ek_requant_fixed_pair``): per channel TFLM's multiplier ``q`` and
    ``s = -shift - 1`` (-1: no right shift), as uint32 values in an int64 array.

    >>> pack_fixed(np.array([1 << 30, 1 << 30]), np.array([-3, 0])).tolist()
    [1073741824, 2, 1073741824, 4294967295]
    """
    words = np.stack([np.asarray(mult, np.int64), -np.asarray(shift, np.int64) - 1], axis=1).reshape(-1)
    return words % (1 << 32)


def fold_input_offset(bias: np.ndarray, weights: np.ndarray, input_zp: int) -> np.ndarray:
    """``bias - input_zp * sum(w)`` per output row, wrapped to int32 (the kernels add modulo 2^32 and the
    true accumulator fits in int32, so the result is exact)."""
    w = np.asarray(weights, np.int64).reshape(len(bias), -1)
    folded = np.asarray(bias, np.int64) - int(input_zp) * w.sum(axis=1)
    return ((folded + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)


def conv_weights(weights: np.ndarray, kp: int) -> np.ndarray:
    """OHWI int8 weights -> the im2col kernels' rows of kp values (see ``ek_kernels_dsp.h``)."""
    cout, k_h, k_w, cin = weights.shape
    if cin % 4 == 0:
        return np.asarray(weights, np.int8).reshape(cout, -1)   # natural order, kp == k_h * k_w * cin
    row = k_w * cin
    rows = np.zeros((cout, k_h, row + (row & 1)), np.int8)
    rows[:, :, :row] = np.asarray(weights, np.int8).reshape(cout, k_h, row)
    out = np.zeros((cout, kp), np.int8)
    out[:, :rows[0].size] = rows.reshape(cout, -1)
    return out.reshape(cout, kp // 4, 4)[:, :, [0, 2, 1, 3]].reshape(cout, kp)


def depthwise_weights(weights: np.ndarray) -> np.ndarray:
    """(C, kh, kw, 1) -> the depthwise kernel's layout (see ``ek_kernels_dsp.h``)."""
    ch = weights.shape[0]
    w = np.asarray(weights, np.int8).reshape(ch, -1)   # (C, taps)
    taps = w.shape[1]
    even = taps + (taps & 1)
    wt = np.zeros((ch, even), np.int8)
    wt[:, :taps] = w
    parts = []
    for c in range(0, ch & ~3, 4):
        for t in range(0, even, 2):
            parts.append([wt[c, t], wt[c + 2, t], wt[c, t + 1], wt[c + 2, t + 1],
                          wt[c + 1, t], wt[c + 3, t], wt[c + 1, t + 1], wt[c + 3, t + 1]])
    blocks = np.asarray(parts, np.int8).reshape(-1)
    return np.concatenate([blocks, w[ch & ~3:].reshape(-1)]).astype(np.int8)


def fast_arrays(op: Op, fk: FastKernel) -> dict[str, np.ndarray]:
    """The arrays ``fk`` reads: weights, bias, and ``rq`` (packed; :func:`pack_fixed` in the fixed-point
    mode) or ``mult``/``shift``; ``zp_row`` for a padded depthwise layer."""
    arr = op.arrays
    out: dict[str, np.ndarray] = {}
    zp = int(op.attrs["input_zp"])
    if fk.name in ("conv", "conv_maxpool2"):
        out["weights"] = conv_weights(arr["weights"], fk.kp).reshape(-1)
        out["bias"] = np.asarray(arr["bias"], np.int32)
    elif fk.name in ("pointwise", "fc"):
        out["weights"] = np.asarray(arr["weights"], np.int8).reshape(-1)
        out["bias"] = fold_input_offset(arr["bias"], arr["weights"], zp)
    else:  # depthwise
        out["weights"] = depthwise_weights(arr["weights"])
        out["bias"] = fold_input_offset(arr["bias"], arr["weights"], zp)
        if op.attrs["pad_top"] or op.attrs["pad_left"] or _pads_bottom_right(op):
            out["zp_row"] = np.full(op.attrs["in_c"], zp, np.int8)
    packed = pack_fixed(arr["mult"], arr["shift"]) if op.attrs.get(FIXED_ATTR) else \
        pack_requant(arr["mult"], arr["shift"])
    if packed is not None:
        out["rq"] = packed
    else:
        out["mult"], out["shift"] = np.asarray(arr["mult"], np.int32), np.asarray(arr["shift"], np.int32)
    return out


def _pads_bottom_right(op: Op) -> bool:
    a = op.attrs
    return ((a["out_h"] - 1) * a["stride_h"] + a["k_h"] > a["in_h"]) or \
        ((a["out_w"] - 1) * a["stride_w"] + a["k_w"] > a["in_w"])


#: suffix of the im2col scratch buffer of a conv layer that has no scratch tensor of its own.
COL_SUFFIX = "__col"


def scratch(op: Op, tensor_bytes: int = 0, *, fast: bool = True) -> tuple[str, int] | None:
    """``(name, bytes)`` of the arena buffer ``op`` alone uses during its step, under the kernel that runs
    it (``fast``: the fast kernels are enabled): the fast kernel's im2col rows, else the portable kernel's
    own scratch tensor (the fused conv_pool's ring of conv rows, ``tensor_bytes``); None without."""
    fk = choose(op) if fast else None
    if fk is not None:
        return (op.scratch or op.output + COL_SUFFIX, fk.scratch_bytes) if fk.scratch_bytes else None
    return (op.scratch, tensor_bytes) if op.scratch else None


def const_bytes(op: Op, *, fast: bool = True) -> int:
    """Flash bytes of the constant arrays the emitted C holds for ``op`` (the fast kernel's layout when
    ``fast`` and one is chosen, else the portable kernel's arrays)."""
    fk = choose(op) if fast else None
    if fk is None:
        return op.const_bytes
    return int(sum(np.asarray(a).size * (1 if np.asarray(a).dtype == np.int8 else 4)
                   for a in fast_arrays(op, fk).values()))
