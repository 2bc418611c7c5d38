"""TFLite lowering of the IR's data movement: ``gather`` (Reshape/Transpose/Slice/Split/channel
shuffle ... lowered by :mod:`edgekiln.codegen.lower_movement` to one index table), and ``constant``
(a quantized constant tensor, lower_binary.py), which is a constant buffer in the ``.tflite``.

The IR kernel is ``out[p * out_c + j] = in[p * in_c + index[j]]`` for ``p < pixels``; in TFLite that
is ``RESHAPE (pixels, in_c) -> GATHER(index, axis 1) -> RESHAPE`` to the output shape, moving the
same bytes as the C kernel. NOTE: a general GATHER rather than pattern-matched TRANSPOSE/SPLIT/
STRIDED_SLICE: the table is already the exact answer, and one op kind keeps the writer and its test
surface small; a channel shuffle is one per-pixel table of ``C`` int32 entries.

>>> from edgekiln.codegen.ir import IntGraph, Op, QTensor
>>> from edgekiln.codegen.tflite.schema import op_names, read_model
>>> from edgekiln.codegen.tflite.writer import to_tflite_bytes
>>> t = {"x": QTensor("x", (1, 2, 2, 4), 0.1, 0), "y": QTensor("y", (1, 2, 2, 4), 0.1, 0)}
>>> shuffle = Op("gather", "shuffle", ["x"], "y", attrs=dict(pixels=4, in_c=4, out_c=4),
...              arrays=dict(index=np.array([0, 2, 1, 3], np.int32)))
>>> g = IntGraph(t, [shuffle], "x", "y", "x", (1, 4, 2, 2), (1, 4, 2, 2))
>>> op_names(read_model(to_tflite_bytes(g)))
['RESHAPE', 'GATHER', 'RESHAPE']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgekiln.codegen.tflite.schema import options

if TYPE_CHECKING:
    from edgekiln.codegen.tflite.writer import Lowering


def gather(low: Lowering, op: Any) -> None:
    """``RESHAPE -> GATHER (axis 1, constant int32 index) -> RESHAPE`` on the input's quantization."""
    a = op.attrs
    x, y = low.ir.tensors[op.inputs[0]], low.ir.tensors[op.output]
    pixels, in_c, out_c = int(a["pixels"]), int(a["in_c"]), int(a["out_c"])
    rows = low.temp(op.name + "/rows", (pixels, in_c), x.scale, x.zero_point)
    low.reshape_to(low.act(x.name), rows, (pixels, in_c), op.name + "/in")
    index = np.asarray(op.arrays["index"], dtype=np.int32).reshape(-1)
    idx = low.g.add_tensor(op.name + "/index", index.shape, np.int32, data=index)
    moved = low.temp(op.name + "/moved", (pixels, out_c), y.scale, y.zero_point)
    low.op("GATHER", [rows, idx], [moved], options("GatherOptions", axis=1))
    low.reshape_to(moved, low.act(y.name), y.shape, op.name + "/out")


def constant(low: Lowering, op: Any) -> None:
    """A quantized constant tensor (an anchor grid, a class token): a constant int8 buffer, no operator."""
    y = low.ir.tensors[op.output]
    low.ids[y.name] = low.g.add_tensor(y.name, y.shape, np.int8, data=np.asarray(op.arrays["values"]).reshape(y.shape),
                                       scale=np.float32(y.scale), zero_point=y.zero_point)


#: IR kind -> (lowering function, the TFLite ops it writes), merged into the writer's table.
KINDS = {
    "gather": (gather, "RESHAPE + GATHER + RESHAPE (the exact index table)"),
    "constant": (constant, "a constant int8 tensor (no operator)"),
}
