"""Reading and rewriting the Quantize/DequantizeLinear parameters of a tail, for
:mod:`edgekiln.runtime.head_split`, in every form ``edgekiln quantize`` writes them.

The compacted int8 file (:func:`edgekiln.quant.compact.compact_qdq`) differs from onnxruntime's
QDQ output in four ways this module reads and writes correctly:

* a bias scale may be computed by a ``Mul`` of the input's and the weight's scales instead of
  stored (:func:`qparams_of` evaluates it; :class:`InitWriter` keeps it consistent);
* an all-zero zero point may be left out: it is then 0 of the DequantizeLinear input's type
  (int32 for a bias, int8 for a weight) and uint8 for a QuantizeLinear;
* equal initializers are shared between layers, so a rewrite never changes a shared one in
  place: :class:`InitWriter` writes a new uniquely named initializer and points only the
  tail's node inputs at it;
* names are short and generated (``t7``, ``w4``): nothing here relies on a name's spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

_INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor: ``scale`` and ``zero_point`` arrays (a scalar is
    shape ``()``; a zero point the file leaves out is read as zeros of its default type), ``axis``
    for a per-channel tensor (None per tensor), the tensor names the Q/DQ node reads them from
    (``scale_name`` may be the output of a ``Mul``, ``zero_point_name`` is "" when left out) and
    ``node_output``, the output of that Q/DQ node (it identifies the node in a rewrite)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    scale_name: str = ""
    zero_point_name: str = ""
    node_output: str = ""

    @property
    def qrange(self) -> tuple[int, int]:
        return _INT_RANGES.get(np.asarray(self.zero_point).dtype, (-128, 127))


class GraphIndex:
    """Producer/consumer lookups over one ONNX graph, and its constant values."""

    def __init__(self, proto: Any) -> None:
        from onnx import numpy_helper

        self.graph = proto.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.consts: dict[str, np.ndarray] = {}
        for n in self.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def array(self, name: str) -> np.ndarray | None:
        """The value of an initializer, a Constant, or a ``Mul`` of two of them (a compacted bias
        scale); None for anything computed from the data."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.consts:
            return self.consts[name]
        mul = self.producer.get(name)
        if mul is not None and mul.op_type == "Mul" and len(mul.input) == 2 and mul.input[0] != name:
            a, b = self.array(mul.input[0]), self.array(mul.input[1])
            if a is not None and b is not None and a.dtype == b.dtype == np.float32:
                return (a * b).astype(np.float32)   # NOTE: the float32 product onnxruntime folds
        return None

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.consts


def attr(node: Any, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default``."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def label(node: Any) -> str:
    """A node's name, or ``Op->output`` for the nameless Q/DQ nodes of a compacted file."""
    return node.name or f"{node.op_type}->{node.output[0]}"


def _default_zero_point_dtype(g: GraphIndex, node: Any) -> np.dtype:
    """The type of a zero point ``node`` leaves out: DequantizeLinear's input type, for a
    QuantizeLinear its ``output_dtype`` (opset 21) or uint8."""
    from onnx import helper

    if node.op_type == "QuantizeLinear":
        dt = int(attr(node, "output_dtype", 0))
        return np.dtype(helper.tensor_dtype_to_np_dtype(dt)) if dt else np.dtype(np.uint8)
    x = g.array(node.input[0]) if g.is_const(node.input[0]) else None
    if x is not None:
        return x.dtype
    q = g.producer.get(node.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        zp = q.input[2] if len(q.input) > 2 and q.input[2] else ""
        zp_value = g.array(zp) if zp else None
        return zp_value.dtype if zp_value is not None else _default_zero_point_dtype(g, q)
    return np.dtype(np.uint8)


def qparams_of(g: GraphIndex, node: Any, axis_default: int | None = 1) -> QParams:
    """The scale/zero point of a Quantize/DequantizeLinear ``node``."""
    scale = g.array(node.input[1])
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if zp_name:
        zp = g.array(zp_name)
    elif scale is not None:
        zp = np.zeros(scale.shape, _default_zero_point_dtype(g, node))
    else:
        zp = None
    if scale is None or zp is None:
        raise EdgekilnError(f"{label(node)}: the scale or zero point is not a constant; learning needs constant QDQ")
    axis = int(attr(node, "axis", axis_default)) if scale.ndim == 1 and scale.size > 1 else None
    return QParams(scale=scale.astype(np.float32), zero_point=zp, axis=axis, scale_name=node.input[1],
                   zero_point_name=zp_name, node_output=node.output[0])


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    """``(q - zp) * scale`` in float32, per channel along ``p.axis``."""
    scale, zp = p.scale.astype(np.float32), p.zero_point.astype(np.float32)
    if p.axis is not None and q.ndim > 1:
        shape = [1] * q.ndim
        shape[p.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


class InitWriter:
    """Writes new values into node inputs of a graph without touching what other nodes read.

    :meth:`assign` overwrites an initializer in place only when the given node inputs are all of
    its uses; otherwise (a shared scale or zero point of a compacted file, a left-out input) it
    adds a new uniquely named initializer and points just those inputs at it."""

    def __init__(self, g: GraphIndex) -> None:
        self.g = g
        self.names = {*g.inits, *(o for n in g.graph.node for o in n.output),
                      *(v.name for v in g.graph.input), *(v.name for v in g.graph.output)}
        self.added: list[str] = []

    def uses(self, name: str) -> list[tuple[Any, int]]:
        return [(n, i) for n in self.g.graph.node for i, x in enumerate(n.input) if x == name]

    def assign(self, pairs: list[tuple[Any, int]], value: np.ndarray, base: str) -> str:
        """Make every ``(node, input index)`` of ``pairs`` read ``value``; returns the name used."""
        from onnx import numpy_helper

        current = {n.input[i] if i < len(n.input) else "" for n, i in pairs}
        name = next(iter(current))
        outputs = {v.name for v in self.g.graph.output}
        if len(current) == 1 and name in self.g.inits and name not in outputs and \
                {(id(n), i) for n, i in self.uses(name)} == {(id(n), i) for n, i in pairs}:
            self.g.inits[name].CopyFrom(numpy_helper.from_array(np.array(value, order="C"), name))
            return name
        new, k = f"{base}_adapted", 0
        while new in self.names:
            k += 1
            new = f"{base}_adapted{k}"
        self.names.add(new)
        init = numpy_helper.from_array(np.array(value, order="C"), new)   # NOTE: keeps 0-d scalars 0-d
        self.g.graph.initializer.append(init)
        self.g.inits[new] = self.g.graph.initializer[-1]
        self.added.append(new)
        for n, i in pairs:
            while len(n.input) <= i:
                n.input.append("")
            n.input[i] = new
        return new

    def assign_bias_scale(self, dq: Any, value: np.ndarray, in_scale: str, w_scale: str, base: str) -> None:
        """Make bias DequantizeLinear ``dq`` read the scale ``value`` = ``in_scale * w_scale``:
        a ``Mul`` that only this bias reads gets those two tensors as inputs (the product is
        the same float32), anything else becomes a new initializer."""
        mul = self.g.producer.get(dq.input[1])
        if mul is not None and mul.op_type == "Mul" and len(self.uses(mul.output[0])) == 1 \
                and mul.output[0] not in {v.name for v in self.g.graph.output}:
            a, b = self.g.array(in_scale), self.g.array(w_scale)
            if a is not None and b is not None and np.array_equal((a * b).astype(np.float32).reshape(-1),
                                                                  np.asarray(value, np.float32).reshape(-1)):
                mul.input[:] = [in_scale, w_scale]
                return
        self.assign([(dq, 1)], value, base)

    def prune(self, used_before: set[str]) -> None:
        """Drop initializers that were read before the rewrite and no node reads any more."""
        used = {x for n in self.g.graph.node for x in n.input} | {v.name for v in self.g.graph.output}
        keep = [i for i in self.g.graph.initializer if i.name in used or i.name not in used_before]
        if len(keep) < len(self.g.graph.initializer):
            del self.g.graph.initializer[:]
            self.g.graph.initializer.extend(keep)
            self.g.inits = {i.name: i for i in self.g.graph.initializer}
