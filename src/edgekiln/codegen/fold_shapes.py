"""Export-time constant folding of shape arithmetic: ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``.

PyTorch exports of models with a dynamic batch (ShuffleNet's channel shuffle, ``x.view(x.size(0), -1)``)
compute Reshape targets from the running tensor's shape. The C library has one fixed shape, so
every such value is a constant: the input dims are fixed (dynamic ones from ``input_shapes``,
else 1), shapes are inferred, and every node that reads only constants or the *shape* of a
tensor is evaluated once with onnx's reference evaluator and replaced by an initializer.
Integer (and bool) values are folded, and any value computed from a folded one (a detector's anchor
grid: ``Shape -> Range -> Cast -> Add 0.5 -> QuantizeLinear -> DequantizeLinear -> ...``, quantized
like an activation): float computations on the weights themselves (their DequantizeLinear, a bias
scale) stay as they are. A DequantizeLinear of a folded int8 value that a remaining node reads stays
too, on an int8 initializer, so that node reads a quantized constant as it reads a weight.

>>> from onnx import TensorProto, helper
>>> nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
>>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
>>> m = fold_shape_subgraphs(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), {"x": (1, 4)})
>>> [n.op_type for n in m.graph.node], [list(i.int64_data or []) or i.dims for i in m.graph.initializer]
(['Reshape'], [[2]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: ops evaluated at export time when every input is a constant integer (or a Shape of a known shape).
FOLDABLE = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Mul", "Add", "Sub",
                      "Div", "Constant", "ConstantOfShape", "Equal", "Where", "Expand", "Range", "Identity",
                      "ReduceProd", "Reshape", "Size", "Min", "Max", "Neg", "Floor", "Ceil", "Sqrt"})


def fix_input_shapes(model: Any, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Set every dynamic input dim in place: from ``shapes`` when given, else 1."""
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        given = (shapes or {}).get(vi.name)
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if given is not None and k < len(given):
                d.Clear()
                d.dim_value = int(given[k])
            elif d.dim_value <= 0:
                d.Clear()
                d.dim_value = 1


def _known_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - an unusual model: fold what the stored shapes allow
        inferred = model
    out: dict[str, tuple[int, ...]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    return out


def _quantize_linear(node: Any, args: list[np.ndarray]) -> np.ndarray:
    """QuantizeLinear / DequantizeLinear as ONNX defines them (numpy: the reference evaluator has no
    kernel for opsets before 19): ``saturate(rint(x / s) + z)`` and ``(q - z) * s`` in float32."""
    x, scale = args[0], np.asarray(args[1], np.float32)
    zp = np.asarray(args[2]) if len(args) > 2 else np.zeros((), np.uint8)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and x.ndim > 1:  # per-axis
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    if node.op_type == "DequantizeLinear":
        return ((x.astype(np.int32) - zp.astype(np.int32)).astype(np.float32) * scale).astype(np.float32)
    info = np.iinfo(zp.dtype)
    q = np.rint(np.asarray(x, np.float32) / scale) + zp.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _evaluate(node: Any, values: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    ins = [i for i in node.input if i]
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return [_quantize_linear(node, [values[i] for i in node.input if i])]
    graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(
        values[i].dtype), values[i].shape) for i in ins],
        [helper.make_tensor_value_info(o, 0, None) for o in node.output if o])
    ev = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    return [np.asarray(v) for v in ev.run(None, {i: values[i] for i in ins})]


def fold_shape_subgraphs(model: Any, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
    """A copy of ``model`` with fixed input dims and its shape arithmetic folded into initializers."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    fix_input_shapes(model, shapes)
    # NOTE: a folded value can make more shapes known (a Slice whose ends were computed): repeat
    # shape inference and folding until nothing changes.
    derived: set[str] = set()
    for _ in range(_MAX_ROUNDS):
        if not _fold_once(model, derived):
            break
    return model


_MAX_ROUNDS = 200


def _fold_once(model: Any, derived: set[str]) -> bool:
    """One round of :func:`fold_shape_subgraphs` in place; True when a node was removed. ``derived``
    (kept across rounds) holds the names of folded values."""
    from onnx import numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    known = _known_shapes(model)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    now = set(derived)
    folded, keep = [], []
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Shape" and ins and ins[0] in known and ins[0] not in values:
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            values[node.output[0]] = np.array(known[ins[0]][start:end], np.int64)
            folded.append(node)
            now.add(node.output[0])
            continue
        integer = node.op_type in FOLDABLE and all(i in values and values[i].dtype.kind in "iub" for i in ins)
        # NOTE: a node reading a folded value computes a constant too, whatever its type (ONNX domain only)
        from_folded = node.domain in ("", "ai.onnx") and any(i in now for i in ins) and all(i in values for i in ins)
        # NOTE: a weight's DequantizeLinear is evaluated for the folds that read it, and stays (below)
        weight_dq = node.op_type == "DequantizeLinear" and all(i in values for i in ins)
        if (integer or from_folded or weight_dq) and (ins or node.op_type == "Constant"):
            try:
                outs = _evaluate(node, values, opset)
            except Exception:  # noqa: BLE001 - leave the node to the lowering, which names it
                keep.append(node)
                continue
            if from_folded or weight_dq or all(o.dtype.kind in "iub" for o in outs):
                values.update(zip([o for o in node.output if o], outs, strict=True))
                folded.append(node)
                now.update(o for o in node.output if o and (from_folded or integer))
                continue
        keep.append(node)
    used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
    # NOTE: a dequantized constant a remaining node reads keeps its DequantizeLinear (on an int8
    # initializer): the lowering reads it as a quantized constant, with its scale and zero point
    requant = {id(n) for n in folded if n.op_type == "DequantizeLinear" and n.output[0] in used}
    folded = [n for n in folded if id(n) not in requant]
    if not folded:
        return False
    removed = {id(n) for n in folded}
    keep = [n for n in model.graph.node if id(n) not in removed]
    used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
    have = {i.name for i in model.graph.initializer}
    new_inits = [numpy_helper.from_array(np.asarray(values[o]), o) for n in folded for o in n.output
                 if o in used and o not in have]
    derived.update(o for n in folded for o in n.output if o)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(new_inits)
    return True
