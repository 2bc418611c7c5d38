"""Export-time constant folding of shape arithmetic: ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``.

PyTorch exports of models with a dynamic batch (ShuffleNet's channel shuffle, ``x.view(x.size(0), -1)``)
compute Reshape targets from the running tensor's shape. The C library has one fixed shape, so
every such value is a constant: the input dims are fixed (dynamic ones from ``input_shapes``,
else 1), shapes are inferred, and every node that reads only constants or the *shape* of a
tensor is evaluated once with onnx's reference evaluator and replaced by an initializer.
Only integer (and bool) values are folded: float computations on weights stay as they are.

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


def _evaluate(node: Any, values: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    ins = [i for i in node.input if i]
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
    for _ in range(_MAX_ROUNDS):
        if not _fold_once(model):
            break
    return model


_MAX_ROUNDS = 200


def _fold_once(model: Any) -> bool:
    """One round of :func:`fold_shape_subgraphs` in place; True when something was folded."""
    from onnx import numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    known = _known_shapes(model)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    folded, keep = [], []
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Shape" and ins and ins[0] in known and ins[0] not in values:
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            values[node.output[0]] = np.array(known[ins[0]][start:end], np.int64)
            folded.append(node)
            continue
        if node.op_type in FOLDABLE and all(i in values and values[i].dtype.kind in "iub" for i in ins) \
                and (ins or node.op_type == "Constant"):
            try:
                outs = _evaluate(node, values, opset)
            except Exception:  # noqa: BLE001 - leave the node to the lowering, which names it
                keep.append(node)
                continue
            if all(o.dtype.kind in "iub" for o in outs):
                values.update(zip([o for o in node.output if o], outs, strict=True))
                folded.append(node)
                continue
        keep.append(node)
    if not folded:
        return False
    used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
    new_inits = [numpy_helper.from_array(np.asarray(values[o]), o) for n in folded for o in n.output if o in used]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(new_inits)
    return True
