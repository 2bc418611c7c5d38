"""Where the bytes of a quantized ONNX file go: weights, biases, per-channel scales, activation
quantization parameters, float tensors left, and the graph itself.

Used to tell waste (float weights left behind, duplicated tensors, long generated names) from
what per-channel int8 needs: for every output channel a Conv/Gemm stores an int32 bias, a
weight scale and a bias scale (12 bytes) next to its int8 weights. A depthwise 3x3 channel has
only 9 weight bytes, so on small depthwise-separable networks the per-channel parameters can
outweigh the weights.

>>> import onnx, tempfile
>>> from onnx import helper, numpy_helper, TensorProto
>>> import numpy as np
>>> g = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0)], "g", [],
...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
...     [numpy_helper.from_array(np.zeros((4, 8), np.int8), "w"), numpy_helper.from_array(np.ones(4, np.float32), "s")])
>>> p = tempfile.mkdtemp() + "/m.onnx"; onnx.save(helper.make_model(g), p)
>>> byte_breakdown(p)["int8 weights"] > 32
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CATEGORIES = ("int8 weights", "int32 biases", "per-channel scales", "activation qparams", "float tensors",
              "other tensors", "graph (nodes, names, metadata)")


def byte_breakdown(path: str | Path) -> dict[str, int]:
    """Bytes of the file by category (:data:`CATEGORIES`); the values sum to the file size."""
    import onnx

    p = Path(path)
    model = onnx.load(str(p))
    dq_scale = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 1}
    out = dict.fromkeys(CATEGORIES, 0)
    for init in model.graph.initializer:
        out[_category(init, dq_scale)] += init.ByteSize()
    out["graph (nodes, names, metadata)"] = p.stat().st_size - sum(v for k, v in out.items() if k != CATEGORIES[-1])
    return out


def _category(init: Any, dq_scale: set[str]) -> str:
    from onnx import TensorProto

    scalar = len(init.dims) == 0 or (len(init.dims) == 1 and init.dims[0] == 1)
    if init.data_type in (TensorProto.INT8, TensorProto.UINT8):
        return "activation qparams" if scalar else "int8 weights"
    if init.data_type == TensorProto.INT32:
        return "int32 biases"
    if init.data_type == TensorProto.FLOAT:
        if scalar:
            return "activation qparams"
        return "per-channel scales" if init.name in dq_scale else "float tensors"
    return "other tensors"


def weight_of(node: Any, inits: dict[str, Any], producer: dict[str, Any]) -> tuple[Any, Any] | None:
    """The weight initializer of a Conv/Gemm/MatMul ``node`` and the DequantizeLinear it passes
    through (None for a float weight); None when the weight is not an initializer."""
    if len(node.input) < 2:
        return None
    name = node.input[1]
    if name in inits:
        return inits[name], None
    dq = producer.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
        return inits[dq.input[0]], dq
    return None


def per_channel_overhead(path: str | Path) -> list[dict[str, Any]]:
    """For each Conv/Gemm of a QDQ model: its int8 weight bytes and the bytes of its per-channel
    parameters (weight scales, int32 bias, bias scales), and whether it is depthwise."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        found = weight_of(node, inits, producer)
        if found is None or found[1] is None:
            continue
        weight, w_dq = found
        meta = inits[w_dq.input[1]].ByteSize() if w_dq.input[1] in inits else 0
        b_dq = producer.get(node.input[2]) if len(node.input) > 2 else None
        if b_dq is not None and b_dq.op_type == "DequantizeLinear":
            meta += sum(inits[i].ByteSize() for i in b_dq.input[:2] if i in inits)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        rows.append({"layer": node.name or node.output[0], "channels": int(weight.dims[0]),
                     "depthwise": group > 1 and group == int(weight.dims[0]),
                     "weight_bytes": weight.ByteSize(), "per_channel_bytes": meta})
    return rows
