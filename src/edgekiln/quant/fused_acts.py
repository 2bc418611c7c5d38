"""Conv/Gemm outputs left float where a float activation reads them (NNCF's pattern for OpenVINO).

With the speed rule an activation such as PRelu, or SiLU's Sigmoid and Mul, stays float, but
onnxruntime's quantizer still rounds the Conv's output to int8 and back before it: a Q/DQ pair that
OpenVINO cannot fuse, so the Conv and its activation run as two kernels with layout reorders
between them. Without that pair OpenVINO runs the int8 Conv with the activation as a post-op and
rounds once, after it. Measured on OpenVINO 2026.4 (CPU time per call, 1 thread): MTCNN P-Net
0.605 -> 0.437 ms (FP32 0.517), SQNR 19.6 -> 22.2 dB; O-Net 0.505 -> 0.415 ms (FP32 0.518);
onnxruntime gets slower (O-Net 0.66 -> 1.41 ms), so it is one more form the quantize pass times.

The integer backends (C, TFLite) need every Conv output int8: the dropped pairs' scale and zero
point are kept in the model's metadata (:data:`KEY`) and :func:`restore_output_qdq` puts the pairs
back exactly before lowering.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

KEY = "edgekiln.float_conv_outputs"
ACTIVATIONS = frozenset({"PRelu", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "Mul", "Elu", "Tanh"})


def drop_output_qdq(model: Any) -> list[str]:
    """Remove (in place) each Q/DQ pair between a Conv/Gemm and float activations that are its only
    readers; record the pairs under :data:`KEY`. Returns the Conv/Gemm outputs left float.

    >>> import numpy as np
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "z"),
    ...          numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"), numpy_helper.from_array(np.ones(2, np.float32), "a")]
    >>> nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
    ...          helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
    ...          helper.make_node("PRelu", ["d", "a"], ["y"], name="act")]
    >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], inits)
    >>> m = helper.make_model(g)
    >>> drop_output_qdq(m), [n.op_type for n in m.graph.node]
    (['c'], ['Conv', 'PRelu'])
    >>> restore_output_qdq(m), [n.op_type for n in m.graph.node]
    (['c'], ['Conv', 'QuantizeLinear', 'DequantizeLinear', 'PRelu'])
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    uses = Counter(i for n in g.node for i in n.input)
    uses.update(o.name for o in g.output)
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    dropped, rename, record = set(), {}, {}
    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        layer = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if layer is None or layer.op_type not in ("Conv", "Gemm") or uses[q.output[0]] != 1 or uses[q.input[0]] != 1:
            continue
        if not readers.get(dq.output[0]) or not all(r.op_type in ACTIVATIONS for r in readers[dq.output[0]]):
            continue
        if dq.output[0] in {o.name for o in g.output}:
            continue
        dropped.update((id(q), id(dq)))
        rename[dq.output[0]] = q.input[0]
        record[q.input[0]] = {"scale": q.input[1], "zero_point": q.input[2] if len(q.input) > 2 else "",
                              "q": q.output[0], "dq": dq.output[0]}
    if not record:
        return []
    keep = [n for n in g.node if id(n) not in dropped]
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del g.node[:]
    g.node.extend(keep)
    _set_meta(model, {**recorded_pairs(model), **record})
    return list(record)


def restore_output_qdq(model: Any) -> list[str]:
    """Put back (in place) the Q/DQ pairs :func:`drop_output_qdq` removed; returns their tensors."""
    from onnx import helper

    record = recorded_pairs(model)
    if not record:
        return []
    g = model.graph
    nodes = []
    for n in g.node:
        n.input[:] = [record[i]["dq"] if i in record and n.op_type in ACTIVATIONS else i for i in n.input]
        nodes.append(n)
        for out in n.output:
            r = record.get(out)
            if r is None:
                continue
            zp = [r["zero_point"]] if r["zero_point"] else []
            nodes.append(helper.make_node("QuantizeLinear", [out, r["scale"], *zp], [r["q"]]))
            nodes.append(helper.make_node("DequantizeLinear", [r["q"], r["scale"], *zp], [r["dq"]]))
    del g.node[:]
    g.node.extend(nodes)
    _set_meta(model, {})
    return list(record)


def recorded_pairs(model: Any) -> dict[str, Any]:
    """The Q/DQ pairs :func:`drop_output_qdq` removed: ``{Conv output: {"scale", "zero_point", "q", "dq"}}``."""
    return next((json.loads(p.value) for p in model.metadata_props if p.key == KEY), {})


def _set_meta(model: Any, record: dict[str, Any]) -> None:
    keep = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if record:
        entry = model.metadata_props.add()
        entry.key, entry.value = KEY, json.dumps(record, sort_keys=True)


def integer_session(model_path: Any, **options: Any) -> Any:
    """An onnxruntime session on ``model_path`` as the integer backends implement it (the Q/DQ pairs
    :func:`drop_output_qdq` removed put back): the reference for C and TFLite checks."""
    from pathlib import Path

    import onnx

    from edgekiln.execution.ort import ort_session

    proto = onnx.load(str(model_path))
    return ort_session(proto if restore_output_qdq(proto) else Path(model_path), **options)
