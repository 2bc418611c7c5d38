"""Error correction for int8: cross-layer equalization (CLE) and bias correction.

CLE (Nagel et al. 2019, "Data-Free Quantization"): for a Conv -> ReLU -> Conv pair, scaling
output channel i of the first layer by 1/s_i and input channel i of the second by s_i leaves
the float function unchanged (ReLU is positively homogeneous) while the per-channel weight
ranges become balanced; s_i = sqrt(r1_i / r2_i) with r the per-channel max |w|. This rescues
per-tensor int8 on depthwise-separable networks, whose depthwise channels have wildly different
ranges. ReLU6/Clip is *not* scale-equivariant (its upper bound would move), so only Relu pairs
(or no activation) are equalized.

Bias correction: quantization shifts each layer's mean output; on calibration data we measure
E[y_int8 - y_float] per output channel and subtract it from the bias.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def consumers(model: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def equalize_cross_layer(model: Any, *, iterations: int = 4) -> tuple[Any, dict[str, Any]]:
    """Return an equalized copy of a float ONNX model and a report of the range spread before/after."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    cons = consumers(m)
    pairs = []
    for a in m.graph.node:
        if a.op_type != "Conv" or a.input[1] not in inits:
            continue
        nxt = cons.get(a.output[0], [])
        if len(nxt) != 1:
            continue
        mid = nxt[0]
        if mid.op_type == "Relu":
            after = cons.get(mid.output[0], [])
            if len(after) != 1:
                continue
            mid = after[0]
        if mid.op_type == "Conv" and mid.input[1] in inits and _group(mid) in (1, _out(inits, mid)):
            pairs.append((a, mid))
    report = {"pairs": [], "spread_before": [], "spread_after": []}
    for a, b in pairs:
        w1 = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64)
        w2 = numpy_helper.to_array(inits[b.input[1]]).astype(np.float64)
        b1 = numpy_helper.to_array(inits[a.input[2]]).astype(np.float64) if len(a.input) > 2 and a.input[2] else None
        depthwise2 = _group(b) > 1
        if (w2.shape[0] if depthwise2 else w2.shape[1]) != w1.shape[0]:
            continue
        report["spread_before"].append(_spread(w1))
        for _ in range(iterations):
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
            r2 = np.abs(w2).reshape(w2.shape[0], -1).max(1) if depthwise2 else \
                np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(1)
            s = np.sqrt(np.maximum(r1, 1e-12) / np.maximum(r2, 1e-12))
            s = np.where((r1 > 0) & (r2 > 0), s, 1.0)
            w1 = w1 / s.reshape(-1, 1, 1, 1)
            if b1 is not None:
                b1 = b1 / s
            # a depthwise layer's input channel i is its output channel i: its bias is unaffected
            w2 = w2 * (s.reshape(-1, 1, 1, 1) if depthwise2 else s.reshape(1, -1, 1, 1))
        report["spread_after"].append(_spread(w1))
        report["pairs"].append([a.name, b.name])
        inits[a.input[1]].CopyFrom(numpy_helper.from_array(w1.astype(np.float32), a.input[1]))
        inits[b.input[1]].CopyFrom(numpy_helper.from_array(w2.astype(np.float32), b.input[1]))
        if b1 is not None:
            inits[a.input[2]].CopyFrom(numpy_helper.from_array(b1.astype(np.float32), a.input[2]))
    return m, report


def _group(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _out(inits: dict[str, Any], node: Any) -> int:
    return int(inits[node.input[1]].dims[0])


def _spread(w: np.ndarray) -> float:
    r = np.abs(w).reshape(w.shape[0], -1).max(1)
    return float(r.max() / max(r.min(), 1e-12))


def correct_bias(float_model: Any, qdq_model: Any, feeds: list[dict[str, np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    """Subtract the mean per-channel output error of every Conv/Gemm (measured on ``feeds``) from
    its bias in the QDQ model. Layers whose bias is int32 behind DequantizeLinear get the
    correction in bias units (input_scale * weight_scale); float biases directly."""
    import onnx
    from onnx import numpy_helper

    q = onnx.ModelProto()
    q.CopyFrom(qdq_model)
    float_out = {n.name: n.output[0] for n in float_model.graph.node if n.name}
    # NOTE: layers are matched by node name: the quantizer may rename a layer's output tensor
    # (e.g. when it is a graph output) but keeps the node's name.
    layers = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2]
              and n.name in float_out]
    names = [n.output[0] for n in layers]
    ref_by_float = tensor_values(float_model, feeds, [float_out[n.name] for n in layers])
    ref = {n.output[0]: ref_by_float[float_out[n.name]] for n in layers if float_out[n.name] in ref_by_float}
    got = tensor_values(q, feeds, names)
    inits = {i.name: i for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    report = {}
    for node in layers:
        name = node.output[0]
        if name not in ref or name not in got:
            continue
        axes = (0, 2, 3) if ref[name].ndim == 4 else (0,)
        err = (got[name] - ref[name]).mean(axis=axes)
        src = producers.get(node.input[2])
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            b = numpy_helper.to_array(inits[src.input[0]]).astype(np.int64)
            scale = numpy_helper.to_array(inits[src.input[1]]).astype(np.float64)
            new = np.clip(b - np.round(err / scale), -2**31, 2**31 - 1).astype(np.int32)
            inits[src.input[0]].CopyFrom(numpy_helper.from_array(new, src.input[0]))
        elif node.input[2] in inits:
            b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            inits[node.input[2]].CopyFrom(numpy_helper.from_array((b - err).astype(np.float32), node.input[2]))
        else:
            continue
        report[node.name or name] = {"mean_error_before": float(np.abs(err).mean())}
    after = tensor_values(q, feeds, names)
    for node in layers:
        key = node.name or node.output[0]
        if key in report:
            axes = (0, 2, 3) if ref[node.output[0]].ndim == 4 else (0,)
            report[key]["mean_error_after"] = float(np.abs((after[node.output[0]] - ref[node.output[0]]).mean(axis=axes)).mean())
    return q, report


def tensor_values(model: Any, feeds: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """The values of the tensors `names` over `feeds` (concatenated along the batch axis), run unoptimized."""
    from edgekiln.execution.ort import run_with_intermediates

    return run_with_intermediates(model, feeds, names)
