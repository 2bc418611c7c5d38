"""What onnxruntime's static quantizer is given, and what it gives back, checked.

:func:`preprocess` runs onnxruntime's ``quant_pre_process`` in a scratch folder.
``onnxruntime.quantization.quantize_static`` has two failure modes on models from other
exporters that we work around before calling it (:func:`prepare_for_quantizer`):

* a float bias initializer shared by several Conv/Gemm nodes is copied by the quantizer under
  the name ``<bias><n>`` without checking that the name is free. tf2onnx names a Conv's output
  ``<bias>2`` (basic-pitch's ``.../conv1d_25;.../conv1d_25`` bias and its ``...conv1d_252``
  output), so the copy silently replaced a 4-D activation by a 36-element vector and the int8
  model did not load. Each bias consumer gets its own copy under a name nobody uses, first.
* a Gemm bias stored as ``[1, N]`` (onnxruntime's own MatMul+Add fusion in ``quant_pre_process``
  writes that) made the per-channel int32-bias check index rows as channels ("the truth value of
  an array ... is ambiguous", magika). Gemm broadcasts ``C``, so ``[1, N]`` and a scalar bias
  are written as the equivalent ``[N]``.

:func:`float_statistics` names the nodes that compute a normalization's statistics (a mean and
variance spelled out as ReduceSum/Mul/Sub/Sqrt/Reciprocal, as jax2tf and tf2onnx export a
LayerNorm, or a softmax's sum) and apply them; they stay float. Quantized, ``E[x^2] - E[x]^2``
cancels to int8 noise and a variance rounded to 0 becomes ``1/sqrt(0) = inf``: magika's int8
output had SQNR -2.8 dB, with an infinite reciprocal inside.

:func:`check_quantized` then opens the quantized model the way a user would (full ONNX check,
onnxruntime load, one run) and compares its output shapes with the float model's, so an invalid
model is an error naming the broken node, never a result. Other runtimes are not a gate here: a
runtime that cannot run a valid quantized model (OpenVINO on crepe-tiny's int8 Pad) gets an error
row with the reason in the quantize report instead of latency numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")


def preprocess(src: Path, work: Path) -> Path:
    """onnxruntime's quant_pre_process (shape inference + graph optimization) when it works;
    transformer exports need its symbolic shape inference skipped; else the model as is."""
    import contextlib

    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(src).resolve(), (work / "preprocessed.onnx").resolve()
    for skip_symbolic in (False, True):
        # NOTE: quant_pre_process writes '<uuid>.data' and 'sym_shape_infer_temp.onnx' into the
        # current directory (also when it fails): run it inside the scratch folder.
        try:
            with contextlib.chdir(work):
                quant_pre_process(str(src), str(out), skip_symbolic_shape=skip_symbolic)
            return out
        except Exception:  # noqa: BLE001, S112 - try the next, more conservative setting
            continue
    return src


def prepare_for_quantizer(model: Any) -> dict[str, list[str]]:
    """Rewrite ``model`` in place so onnxruntime's quantizer handles its biases (see the module
    docstring); returns what changed: ``{"bias_copies": [...], "gemm_bias_1d": [...]}`` (node names).

    >>> import numpy as np
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    >>> b = numpy_helper.from_array(np.zeros((1, 3), np.float32), "b")
    >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc1"),
    ...                        helper.make_node("Gemm", ["y2", "w", "b"], ["z"], name="fc2"),
    ...                        helper.make_node("Relu", ["y"], ["y2"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
    ...     [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])], [w, b])
    >>> m = helper.make_model(g)
    >>> prepare_for_quantizer(m)
    {'bias_copies': ['fc2'], 'gemm_bias_1d': ['fc1', 'fc2']}
    >>> [(n.input[2], [i.dims for i in m.graph.initializer if i.name == n.input[2]][0]) for n in m.graph.node[:2]]
    [('b_bias1', [3]), ('b_bias2', [3])]
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    taken = _tensor_names(g)
    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    changed: dict[str, list[str]] = {"bias_copies": [], "gemm_bias_1d": []}
    seen: set[str] = set()
    for node in g.node:
        if node.op_type not in BIAS_OPS or len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias = inits[node.input[2]]
        if bias.data_type not in (1, 10):   # NOTE: float/float16 only: the quantizer skips others
            continue
        arr = numpy_helper.to_array(bias)
        flat = _gemm_bias_1d(node, arr, inits) if node.op_type == "Gemm" else None
        first_use = bias.name not in seen
        seen.add(bias.name)
        if first_use and flat is None:
            continue
        if first_use and consumers[bias.name] == 1:
            bias.CopyFrom(numpy_helper.from_array(flat, bias.name))
        else:   # NOTE: a later bias consumer, or a reshaped bias something else reads too: a copy
            name = _free_name(f"{bias.name}_bias", taken)
            g.initializer.append(numpy_helper.from_array(flat if flat is not None else arr, name))
            node.input[2] = name
            if not first_use:
                changed["bias_copies"].append(node.name)
        if flat is not None:
            changed["gemm_bias_1d"].append(node.name)
    return changed


def _gemm_bias_1d(node: Any, bias: np.ndarray, inits: Mapping[str, Any]) -> np.ndarray | None:
    """The ``[N]`` equivalent of a Gemm's ``[1, N]``/``[1]``/scalar bias; None when it is ``[N]``
    already or cannot be told (no constant weight, a ``[M, N]`` bias)."""
    if bias.ndim == 1 and bias.size > 1:
        return None
    w = inits.get(node.input[1])
    if w is None or len(w.dims) != 2:
        return None
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    n = int(w.dims[0] if trans_b else w.dims[1])
    if bias.size == n and (bias.ndim == 1 or bias.shape[0] == 1):
        return None if bias.ndim == 1 else bias.reshape(n)
    if bias.size == 1:
        return np.full((n,), bias.reshape(()), dtype=bias.dtype)
    return None


def _tensor_names(g: Any) -> set[str]:
    names = {i.name for i in (*g.input, *g.output, *g.value_info, *g.initializer)}
    for node in g.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _free_name(base: str, taken: set[str]) -> str:
    k = 1
    while f"{base}{k}" in taken or any(f"{base}{k}{s}" in taken for s in ("_quantized", "_scale", "_zero_point")):
        k += 1
    taken.add(f"{base}{k}")
    return f"{base}{k}"


ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Max", "Min", "Abs", "Neg",
                         "Exp", "Log", "Clip", "Cast", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Flatten",
                         "Transpose", "Identity", "Tile"})
REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceMin"})


def float_statistics(model: Any) -> list[str]:
    """Names of the nodes to keep float because they compute or apply a divisor: walking back
    from each ``Sqrt``/``Reciprocal`` input, ``Div`` denominator and fractional/negative ``Pow``
    through elementwise and shape ops up to (and including) the ``Reduce*`` nodes, then forward
    to the nodes that consume those statistics. Unnamed nodes among them get a name.

    >>> import numpy as np
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> nodes = [helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[1]),
    ...          helper.make_node("Sub", ["x", "m"], ["d"], name="center"),
    ...          helper.make_node("Mul", ["d", "d"], ["d2"], name="square"),
    ...          helper.make_node("ReduceMean", ["d2"], ["v"], name="var", axes=[1]),
    ...          helper.make_node("Sqrt", ["v"], ["s"], name="std"),
    ...          helper.make_node("Div", ["d", "s"], ["y"], name="normalize"),
    ...          helper.make_node("Relu", ["y"], ["z"], name="act")]
    >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
    ...     [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])])
    >>> float_statistics(helper.make_model(g))
    ['normalize', 'square', 'std', 'var']
    """
    from onnx import numpy_helper

    g = model.graph
    for i, node in enumerate(g.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}_edgekiln"
    producer = {o: n for n in g.node for o in n.output}
    consts = {i.name: i for i in g.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    starts = []
    for node in g.node:
        if node.op_type in ("Sqrt", "Reciprocal"):
            starts.append(node.input[0])
        elif node.op_type == "Div" and len(node.input) > 1:
            starts.append(node.input[1])
        elif node.op_type == "Pow" and len(node.input) > 1 and node.input[1] in consts:
            e = numpy_helper.to_array(consts[node.input[1]])
            if e.size == 1 and (float(e.reshape(())) < 0 or float(e.reshape(())) % 1):
                starts.append(node.input[0])
    stats: set[str] = set()   # node names
    todo = list(starts)
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in stats or node.op_type not in ELEMENTWISE | REDUCE:
            continue
        stats.add(node.name)
        if node.op_type not in REDUCE:
            todo.extend(node.input)
            continue
        # NOTE: what a mean is taken of is an ordinary activation, unless it is a square: int8
        # squares lose every small value (x = 0.1 -> 0.01 on a 0.003 grid), and the variance with them.
        square = producer.get(node.input[0])
        if square is not None and _is_square(square, consts):
            stats.add(square.name)
    stats |= {n.name for n in g.node if n.op_type in ("Sqrt", "Reciprocal") and n.input[0] in producer
              and producer[n.input[0]].name in stats}
    derived = {o for n in g.node if n.name in stats for o in n.output}
    for node in g.node:   # topological order: statistics flow forward until they meet an activation
        if node.name in stats or not any(i in derived for i in node.input):
            continue
        if node.op_type not in ELEMENTWISE:
            continue
        stats.add(node.name)
        if all(i in derived or i in consts or not i for i in node.input):
            derived.update(node.output)
    return sorted(stats)


def _is_square(node: Any, consts: Mapping[str, Any]) -> bool:
    from onnx import numpy_helper

    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    if node.op_type == "Pow" and len(node.input) > 1 and node.input[1] in consts:
        e = numpy_helper.to_array(consts[node.input[1]])
        return e.size == 1 and float(e.reshape(())) == 2.0
    return False


def sort_nodes(model: Any) -> None:
    """Order ``model``'s nodes topologically, in place (onnxruntime's float16 converter appends
    the Casts it adds for ``keep_io_types`` at the end, which ``onnx.checker`` refuses); nodes
    already in order keep it.

    >>> from onnx import helper, TensorProto
    >>> g = helper.make_graph([helper.make_node("Relu", ["t"], ["y"], name="b"),
    ...                        helper.make_node("Neg", ["x"], ["t"], name="a")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    >>> m = helper.make_model(g); sort_nodes(m); [n.name for n in m.graph.node]
    ['a', 'b']
    """
    g = model.graph
    ready = {i.name for i in (*g.input, *g.initializer)} | {""}
    pending, ordered = list(g.node), []
    while pending:
        left = []
        for node in pending:   # NOTE: subgraph inputs from the outer scope are not checked here
            (ordered if all(i in ready for i in node.input) else left).append(node)
            if ordered and ordered[-1] is node:
                ready.update(node.output)
        if len(left) == len(pending):   # a cycle or an undefined input: leave the rest as it was
            ordered += left
            break
        pending = left
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def check_quantized(src: str | Path, dst: str | Path, feeds: Sequence[Mapping[str, np.ndarray]] | None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Raise a one-line :class:`EdgekilnError` unless the quantized model ``dst`` passes the full
    ONNX check, loads and runs in onnxruntime and gives outputs of the float model's shapes (on
    the first calibration feed; without one, on zeros of the float model's input shapes, dynamic
    dimensions fixed by ``input_shapes`` as the intake resolved them, else 1)."""
    from edgekiln.execution.feeds import specs_from_session
    from edgekiln.execution.ort import error_line, ort_session
    from edgekiln.models.intake import load_onnx

    dst = Path(dst)
    try:
        load_onnx(dst)
        quantized = ort_session(dst)
    except EdgekilnError as exc:
        raise EdgekilnError(f"quantization produced an invalid model ({_reason(str(exc))}); keep the node named "
                            "there float with --keep-float NAME") from exc
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise EdgekilnError(f"quantization produced a model onnxruntime cannot load ({error_line(exc, 240)})") from exc
    reference = ort_session(Path(src))
    if feeds:
        feed = dict(feeds[0])
    else:
        specs = specs_from_session(reference, input_shapes)
        feed = {s.name: np.zeros([d if d > 0 else 1 for d in s.shape], s.dtype) for s in specs}
    try:
        got = [tuple(o.shape) for o in quantized.run(None, feed)]
    except Exception as exc:  # noqa: BLE001
        raise EdgekilnError(f"quantization produced a model that does not run ({error_line(exc, 240)})") from exc
    want = [tuple(o.shape) for o in reference.run(None, feed)]
    if got != want:
        raise EdgekilnError(f"quantization changed the model's output shapes {want} -> {got}")


def _reason(text: str) -> str:
    return text.split("invalid ONNX model: ", 1)[-1][:240]
