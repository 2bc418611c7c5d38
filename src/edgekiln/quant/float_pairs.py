"""Int8 forms with activations left float where OpenVINO runs faster (and rounds less) without a Q/DQ pair.

onnxruntime's quantizer rounds every activation to int8 and back: a Q/DQ pair after each Conv, Add,
Concat, pool and activation. onnxruntime fuses those pairs into integer kernels; OpenVINO instead
turns each pair into a FakeQuantize it can fold only where an int8 kernel reads it, and runs the
rest as float kernels with layout reorders between them. Two forms the quantize pass times
(:mod:`edgekiln.passes.quantize_forms`):

- **fused** (:func:`drop_activation_pairs`): the pair between a Conv/Gemm and float activations
  that are its only readers goes, so OpenVINO runs the activation as the int8 Conv's post-op.
  MTCNN P-Net on OpenVINO 2026.4 (CPU time per call, 1 thread): 0.605 -> 0.437 ms (FP32 0.517).
- **inputs** (:func:`keep_weighted_inputs`): only the inputs of Conv/ConvTranspose/MatMul/Gemm stay
  quantized and graph outputs are float (NNCF's placement for OpenVINO). O-Net: 0.427 -> 0.256 ms
  (FP32 0.413, NNCF 0.272 in the same loop); its box output 11.0 -> 32.8 dB SQNR (no int8 rounding
  of the last Gemm's output).

onnxruntime gets slower with either (it needs a quantized output to run QLinearConv), so neither is
a default: the pass keeps the form measured fastest where its accuracy holds. The integer backends
get every pair back (:mod:`edgekiln.models.qdq_pairs`), exactly.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgekiln.models.qdq_pairs import record_pairs, restore_qdq_pairs

ACTIVATIONS = frozenset({"PRelu", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "Mul", "Elu", "Tanh"})
WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: ops whose output is never negative: a pair after them saturating at zero is no folded activation
NON_NEGATIVE = frozenset({"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Clip"})


def drop_activation_pairs(model: Any) -> list[str]:
    """The "fused" form: remove (in place) each Q/DQ pair between a Conv/Gemm and float activations
    that are its only readers. Returns the Conv/Gemm outputs left float (recorded for restoring).

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
    >>> drop_activation_pairs(m), [n.op_type for n in m.graph.node]
    (['c'], ['Conv', 'PRelu'])
    >>> restore_qdq_pairs(m), [n.op_type for n in m.graph.node]
    (['c'], ['Conv', 'QuantizeLinear', 'DequantizeLinear', 'PRelu'])
    """
    def fused(q: Any, producer: Any, readers: list[Any]) -> bool:
        return producer.op_type in ("Conv", "Gemm") and all(r.op_type in ACTIVATIONS for r in readers)

    return _drop_pairs(model, fused, outputs=False)


def keep_weighted_inputs(model: Any) -> list[str]:
    """The "inputs" form: remove (in place) every activation Q/DQ pair that no Conv, ConvTranspose,
    MatMul, Gemm (or Gather) reads, graph outputs included. Returns the tensors left float (recorded).

    >>> import numpy as np
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "z"),
    ...          numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")]
    >>> def qdq(x, y):
    ...     return [helper.make_node("QuantizeLinear", [x, "s", "z"], [x + "q"]), helper.make_node("DequantizeLinear", [x + "q", "s", "z"], [y])]
    >>> nodes = [*qdq("x", "xd"), helper.make_node("Conv", ["xd", "w"], ["c"]), *qdq("c", "cd"),
    ...          helper.make_node("Relu", ["cd"], ["r"]), *qdq("r", "y")]
    >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], inits)
    >>> m = helper.make_model(g)
    >>> sorted(keep_weighted_inputs(m)), [n.op_type for n in m.graph.node]
    (['c', 'r'], ['QuantizeLinear', 'DequantizeLinear', 'Conv', 'Relu'])
    >>> [n.output[0] for n in m.graph.node][-1]
    'y'
    >>> _ = restore_qdq_pairs(m); [n.op_type for n in m.graph.node]
    ['QuantizeLinear', 'DequantizeLinear', 'Conv', 'QuantizeLinear', 'DequantizeLinear', 'Relu', 'QuantizeLinear', 'DequantizeLinear']
    """
    def unweighted(q: Any, producer: Any, readers: list[Any]) -> bool:
        # NOTE: a pair a Gather reads stays: OpenVINO 2026.4 fails to compile DeiT-tiny's class-token
        # Gather reading the float LayerNorm output ("[GatherTransformation] END"); with the pair 13.2 ms
        return not any(r.op_type in WEIGHTED or r.op_type == "Gather" for r in readers)

    return _drop_pairs(model, unweighted, outputs=True)


def _drop_pairs(model: Any, wanted: Any, *, outputs: bool) -> list[str]:
    """Remove each activation pair ``float -> Q -> DQ -> readers`` where the pair is the float
    tensor's only reader, the DQ output has readers (or, with ``outputs``, is a graph output) and
    ``wanted(q, producer, readers)``; record every removed pair."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    inits = {i.name: i for i in g.initializer}
    uses = Counter(i for n in g.node for i in n.input)
    uses.update(graph_outputs)
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    replaced: dict[int, Any] = {}   # id(Q) -> its Clip (or None), id(DQ) -> None
    rename_input, rename_output, record = {}, {}, {}
    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        layer = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if layer is None or uses[q.output[0]] != 1 or uses[q.input[0]] != 1:
            continue
        is_output = dq.output[0] in graph_outputs
        dq_readers = readers.get(dq.output[0], [])
        if (is_output and not outputs) or not (dq_readers or is_output) or not wanted(q, layer, dq_readers):
            continue
        entry = {"scale": q.input[1], "zero_point": q.input[2] if len(q.input) > 2 else "",
                 "q": q.output[0], "dq": dq.output[0], "output": is_output}
        clip = None if layer.op_type in NON_NEGATIVE else _saturation_clip(q, dq, g, inits, entry)
        replaced[id(q)], replaced[id(dq)] = clip, None
        if clip is None and is_output:
            rename_output[q.input[0]] = dq.output[0]
        elif clip is None:
            rename_input[dq.output[0]] = q.input[0]
        record[q.input[0]] = entry
    if not record:
        return []
    nodes = []
    for n in g.node:
        if id(n) in replaced:
            if replaced[id(n)] is not None:
                nodes.append(replaced[id(n)])
            continue
        n.input[:] = [rename_input.get(i, i) for i in n.input]
        n.output[:] = [rename_output.get(o, o) for o in n.output]
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    record_pairs(model, record)
    return list(record)


def _saturation_clip(q: Any, dq: Any, g: Any, inits: dict[str, Any], entry: dict[str, Any]) -> Any | None:
    """A Clip doing what the removed pair did besides rounding, where that matters: onnxruntime's
    quantizer drops a Relu/Clip whose range the producer's output Q saturates to anyway (zero point at
    the type's minimum), so the pair *is* the activation. Removed without a Clip, ResNet-18's SQNR
    fell 22.5 -> 10.1 dB, SqueezeNet-1.1's 37.8 -> 0.8. The Clip reads the pair's input and writes
    its output; ``entry["clip"]`` records its bounds so restoring replaces it. None where the pair's
    range does not start at zero."""
    import numpy as np
    from onnx import helper, numpy_helper

    if len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
        return None
    zp = numpy_helper.to_array(inits[q.input[2]])
    scale = numpy_helper.to_array(inits[q.input[1]])
    if zp.size != 1 or scale.size != 1 or not np.issubdtype(zp.dtype, np.integer):
        return None
    info = np.iinfo(zp.dtype)
    if int(zp.reshape(-1)[0]) != info.min:
        return None
    bounds = [f"{q.output[0]}_clip_lo", f"{q.output[0]}_clip_hi"]
    values = (0.0, float((int(info.max) - int(info.min)) * float(scale.reshape(-1)[0])))
    for name, value in zip(bounds, values, strict=True):
        inits[name] = numpy_helper.from_array(np.array(value, np.float32), name)
        g.initializer.append(inits[name])
    entry["clip"] = bounds
    return helper.make_node("Clip", [q.input[0], *bounds], [dq.output[0]], name=f"{q.output[0]}_saturation")


def integer_session(model_path: Any, **options: Any) -> Any:
    """An onnxruntime session on ``model_path`` as the integer backends implement it (every recorded
    Q/DQ pair put back): the reference for C and TFLite checks."""
    from pathlib import Path

    import onnx

    from edgekiln.execution.ort import ort_session

    proto = onnx.load(str(model_path))
    return ort_session(proto if restore_qdq_pairs(proto) else Path(model_path), **options)
