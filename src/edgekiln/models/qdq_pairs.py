"""Q/DQ pairs an int8 model leaves out for a runtime's sake, recorded so the integer model comes back.

Some int8 forms the quantize pass writes (:mod:`edgekiln.quant.float_pairs`) leave activations float
where a runtime is faster with them float: OpenVINO fuses an int8 Conv with a float activation only
when no Q/DQ pair sits between them, and runs int8 only where its inputs are quantized (NNCF's
placement). Integer-only consumers -- the C backend, TFLite, the analysis of an int8 deployment --
need every activation int8: each removed pair's scale and zero point (initializer names) are kept in
the model's metadata (:data:`KEY`) and :func:`restore_qdq_pairs` puts the pairs back exactly.

A record is ``{float tensor: {"scale", "zero_point", "q", "dq", "output"[, "clip"]}}``: the pair read
the float tensor (its only reader) and wrote ``q`` then ``dq``; with ``"output"`` the ``dq`` name was a
graph output, which the producer now writes directly; with ``"clip"`` (the names of its two bounds) a
Clip from the float tensor to ``dq`` stands where the pair was (the pair's saturation, which was an
activation the quantizer had folded into it).
"""

from __future__ import annotations

import json
from typing import Any

KEY = "edgekiln.float_conv_outputs"   # NOTE: the name the first such form (Conv outputs) used; files carry it


def recorded_pairs(model: Any) -> dict[str, Any]:
    """The Q/DQ pairs removed from ``model``: ``{float tensor: {"scale", "zero_point", "q", "dq"[, "output"]}}``."""
    return next((json.loads(p.value) for p in model.metadata_props if p.key == KEY), {})


def record_pairs(model: Any, record: dict[str, Any]) -> None:
    """Store ``record`` (merged with what ``model`` already records) in ``model``'s metadata."""
    _set_meta(model, {**recorded_pairs(model), **record})


def restore_qdq_pairs(model: Any) -> list[str]:
    """Put back (in place) every Q/DQ pair recorded in ``model``; returns the float tensors they read.

    >>> import numpy as np
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "z")]
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    ...                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits)
    >>> m = helper.make_model(g)
    >>> record_pairs(m, {"r": {"scale": "s", "zero_point": "z", "q": "rq", "dq": "y", "output": True}})
    >>> restore_qdq_pairs(m), [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]
    (['r'], [('Relu', ['x'], ['r']), ('QuantizeLinear', ['r', 's', 'z'], ['rq']), ('DequantizeLinear', ['rq', 's', 'z'], ['y'])])
    >>> recorded_pairs(m)
    {}
    """
    from onnx import helper

    record = recorded_pairs(model)
    if not record:
        return []
    g = model.graph
    clipped = {r["dq"]: x for x, r in record.items() if r.get("clip")}
    as_output = {r["dq"]: x for x, r in record.items() if r.get("output") and not r.get("clip")}
    read_by_pair = {x: r["dq"] for x, r in record.items() if not r.get("output") and not r.get("clip")}
    nodes = []
    for n in g.node:
        if n.op_type == "Clip" and len(n.output) == 1 and clipped.get(n.output[0]) == n.input[0]:
            nodes.extend(_pair(helper, n.input[0], record[n.input[0]]))
            continue
        n.input[:] = [read_by_pair.get(i, i) for i in n.input]
        n.output[:] = [as_output.get(o, o) for o in n.output]
        nodes.append(n)
        for out in n.output:
            r = record.get(out)
            if r is not None and not r.get("clip"):
                nodes.extend(_pair(helper, out, r))
    del g.node[:]
    g.node.extend(nodes)
    bounds = {b for r in record.values() for b in r.get("clip", ())}
    keep = [i for i in g.initializer if i.name not in bounds]
    del g.initializer[:]
    g.initializer.extend(keep)
    _set_meta(model, {})
    return list(record)


def _pair(helper: Any, tensor: str, r: dict[str, Any]) -> list[Any]:
    zp = [r["zero_point"]] if r["zero_point"] else []
    return [helper.make_node("QuantizeLinear", [tensor, r["scale"], *zp], [r["q"]]),
            helper.make_node("DequantizeLinear", [r["q"], r["scale"], *zp], [r["dq"]])]


def _set_meta(model: Any, record: dict[str, Any]) -> None:
    keep = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if record:
        entry = model.metadata_props.add()
        entry.key, entry.value = KEY, json.dumps(record, sort_keys=True)
