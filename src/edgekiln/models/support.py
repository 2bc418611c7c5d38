"""Pre-flight compatibility: which ops of a model each later consumer cannot handle.

The tables are data: one frozenset of ONNX op types per consumer. ``None`` means "every op in
the standard ONNX schema registry (plus onnxruntime's ``com.microsoft`` contrib ops)".

- ``onnxruntime``: runs everything standard.
- ``int8-qdq``: the ops onnxruntime's static quantizer (QDQ format) puts Q/DQ around by default
  (``op_types_to_quantize=None`` takes the union of its QDQ and QLinear registries; checked on
  onnxruntime 1.31). Any other op stays float between a DequantizeLinear and a QuantizeLinear.
- ``c``: the integer C backend's kernels. Transpose only where it moves no data (the dims it
  permutes are all of size 1, so it is a reshape); that needs shapes, see :func:`unsupported_ops`.
- ``tflite``: the same set as ``c`` for now.

``Constant`` nodes are data, never reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Ops Q/DQ nodes, graph plumbing and no-ops: never "unsupported" for quantization.
_PASSTHROUGH = frozenset({"QuantizeLinear", "DequantizeLinear", "Identity", "Constant"})

_ORT_QDQ_DEFAULT = frozenset({
    # QDQRegistry
    "Conv", "ConvTranspose", "Gemm", "Clip", "Relu", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
    "Flatten", "Resize", "MaxPool", "AveragePool", "Slice", "Pad", "MatMul", "Split", "Gather",
    "GatherElements", "Where", "InstanceNormalization", "LayerNormalization", "BatchNormalization",
    "TopK", "CumSum",
    # QLinearOpsRegistry (also in the default op list of quantize_static)
    "ArgMax", "Add", "Mul", "LeakyRelu", "Sigmoid", "GlobalAveragePool", "Concat", "Softmax",
})

_TFLITE_BACKEND = frozenset({
    "Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
    "Flatten", "Reshape", "Concat", "Softmax", "QuantizeLinear", "DequantizeLinear", "Identity",
    "Squeeze", "Unsqueeze", "Transpose", "BatchNormalization", "ReduceMean", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "LeakyRelu", "Elu",
    # the IR kinds lut_channel, gather and mul (codegen/tflite/elementwise.py, movement.py)
    "PRelu", "Mul", "Sub", "Div", "Neg", "Abs", "Exp", "Softplus", "Slice", "Split", "Gather", "Shape", "Cast",
    "ConstantOfShape", "Range", "Expand",
})
# Both lower the integer IR of codegen/ir.py; ops only in _C_BACKEND are IR kinds the TFLite writer
# (codegen/tflite/writer.py) does not write yet.
_C_BACKEND = _TFLITE_BACKEND | {"BatchNormalization", "ReduceMean", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                                "LeakyRelu", "Elu",
                                # issue 20, helper A: per-channel tables (codegen/lower_island.py), data
                                # movement (lower_movement.py), Mul (lower_binary.py), shape arithmetic
                                # folded at export (fold_shapes.py)
                                "PRelu", "Mul", "Sub", "Div", "Neg", "Abs", "Exp", "Softplus", "Slice",
                                "Split", "Gather", "Shape", "Cast", "ConstantOfShape", "Range", "Expand", "Pad", "Resize",
                                "ConvTranspose"}

SUPPORTED_OPS: dict[str, frozenset[str] | None] = {
    "onnxruntime": None,
    "int8-qdq": _ORT_QDQ_DEFAULT | _PASSTHROUGH,
    "c": _C_BACKEND,
    "tflite": _TFLITE_BACKEND,
}
CONSUMERS = tuple(SUPPORTED_OPS)


def unsupported_ops(model: Any, shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[str]]:
    """``{consumer: ["OpType (node name)", ...]}`` for the nodes each consumer cannot handle.

    ``shapes`` (value name -> concrete shape, as :func:`edgekiln.models.analysis.analyze`
    infers them) lets a Transpose that moves no data count as supported by ``c``/``tflite``;
    without them only identity permutations do. For ``int8-qdq`` the list holds the nodes
    that will stay float.

    >>> from onnx import helper, TensorProto
    >>> g = helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="e")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    >>> unsupported_ops(helper.make_model(g))["c"]
    ['Erf (e)']
    """
    out: dict[str, list[str]] = {c: [] for c in CONSUMERS}
    constants = {i.name for i in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constants.update(node.output)
            continue  # NOTE: data stored as a node, folded by every consumer; not an op to implement.
        if is_constant_mul(node, constants):
            constants.update(node.output)
            continue  # a shared bias scale: every consumer folds it at load time
        label = f"{node.op_type} ({node.name or f'#{i}'})"
        for consumer, table in SUPPORTED_OPS.items():
            if table is None:
                ok = _known_to_ort(node, model)
            elif node.domain not in ("", "ai.onnx"):
                ok = False
            elif node.op_type == "Transpose" and consumer == "tflite":  # C: any permutation is a gather
                ok = _trivial_transpose(node, shapes)
            else:
                ok = node.op_type in table
            if not ok:
                out[consumer].append(label)
    return out


def is_constant_mul(node: Any, constants: set[str] | Mapping[str, Any]) -> bool:
    """Whether ``node`` is a ``Mul`` of two constants: folded by every consumer at load time, not
    an op a backend has to implement. :func:`edgekiln.quant.bias_scale.share_bias_scales` writes
    such a ``Mul`` for each bias scale it computes from the input and weight scales.

    >>> from onnx import helper
    >>> is_constant_mul(helper.make_node("Mul", ["a", "b"], ["c"]), {"a", "b"})
    True
    >>> is_constant_mul(helper.make_node("Mul", ["a", "x"], ["c"]), {"a", "b"})
    False
    """
    return node.op_type == "Mul" and node.domain in ("", "ai.onnx") and len(node.input) == 2 and \
        all(i in constants for i in node.input)


def _known_to_ort(node: Any, model: Any) -> bool:
    import onnx

    if node.domain in ("com.microsoft", "com.microsoft.nchwc", "ai.onnx.ml"):
        return True
    if any(f.name == node.op_type and f.domain == node.domain for f in model.functions):
        return True
    version = next((o.version for o in model.opset_import if o.domain == node.domain), None)
    try:
        onnx.defs.get_schema(node.op_type, version or onnx.defs.onnx_opset_version(), node.domain)
    except Exception:  # noqa: BLE001 - onnx raises SchemaError
        return False
    return True


def _trivial_transpose(node: Any, shapes: Mapping[str, Sequence[int]] | None) -> bool:
    """True when the permutation keeps the order of every dim of size > 1 (a pure reshape)."""
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    if perm is not None and perm == sorted(perm):
        return True
    shape = (shapes or {}).get(node.input[0])
    if shape is None or any(not isinstance(d, int) for d in shape):
        return False
    if perm is None:
        perm = list(reversed(range(len(shape))))
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)
