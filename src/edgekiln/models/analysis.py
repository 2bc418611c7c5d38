"""What a model costs: parameters, MACs, bytes, and the peak activation memory of its schedule.

Works on any ONNX model, float or QDQ int8. Shapes come from ONNX shape inference with the
inputs fixed; when that leaves a value unknown, onnxruntime runs the model once on zeros with
every intermediate value exposed as an output to read the real shapes.

Definitions (all at the analysed input shapes; batch 1 unless ``input_shapes`` says otherwise):

- **params**: elements of the initializers the nodes consume as data. Quantization parameters
  (scale/zero point of Q/DQ) and shape-like inputs (Reshape's shape, Slice's starts, ...) are not
  parameters. Weights behind a DequantizeLinear count for the node that uses the dequantized
  value, so a QDQ model has the same params as its float source. Shared initializers count in
  each layer that reads them but once in the total.
- **macs**: multiply-accumulates of Conv, ConvTranspose, Gemm, MatMul (and their integer
  variants); other ops count 0.
- **constant nodes**: nodes computable from initializers alone (weight DequantizeLinear,
  Constant, ...). Runtimes fold them; their outputs are not activations.
- **peak_activation_bytes**: see :func:`analyze`. In a QDQ graph analysed as stored, the float
  and the int8 copy of an activation are both tensors of the graph and both count; with
  ``precision="int8"`` they are the one int8 tensor the deployed model holds. The C backend's
  planner sizes its integer-only arena itself (reusing
  :func:`edgekiln.models.liveness.compute_liveness`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.execution.ort import node_subgraphs
from edgekiln.models.control_flow import body_cost, body_initializers, subgraph_value_infos
from edgekiln.models.liveness import compute_liveness
from edgekiln.models.support import unsupported_ops

__all__ = ["LayerInfo", "ModelAnalysis", "analyze"]

Shape = tuple[int, ...]

# Input positions that carry no parameters (quantization params, shapes, axes, bounds).
_NON_PARAM_INPUTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}), "DequantizeLinear": frozenset({1, 2}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}), "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "ConvInteger": frozenset({2, 3}), "MatMulInteger": frozenset({2, 3}),
    "Reshape": frozenset({1}), "Squeeze": frozenset({1}), "Unsqueeze": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}), "Pad": frozenset({1, 2, 3}), "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}), "Expand": frozenset({1}), "Tile": frozenset({1}), "Split": frozenset({1}),
    "Clip": frozenset({1, 2}), "TopK": frozenset({1}), "Gather": frozenset({1}), "OneHot": frozenset({0, 1, 2}),
    "ConstantOfShape": frozenset({0}), "Range": frozenset({0, 1, 2}),
    "If": frozenset({0}), "Loop": frozenset({0, 1}),   # the condition and trip count
    **{op: frozenset({1}) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                                     "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}
# op -> (activation input, weight input) for the MAC formulas.
_CONV_LIKE = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
# Ops that mean a model quantizes its activations itself (its stored dtypes are the deployed ones).
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                        "ConvInteger", "MatMulInteger", "MatMulNBits"})
# Bytes per activation element a float model is estimated at when deployed at a precision.
_PRECISION_BYTES = {"int8": 1, "fp16": 2, "fp32": 4}
# onnx.TensorProto element types (stable numbers; onnx is imported inside functions only).
_FLOAT_TYPES = frozenset({1, 10, 11, 16})            # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_INT_TYPES = frozenset({2, 3, 4, 5, 21, 22})          # UINT8, INT8, UINT16, INT16, UINT4, INT4
_MATMUL_LIKE = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


@dataclass(frozen=True)
class LayerInfo:
    """One node. ``activation_bytes`` is the size of its outputs (0 for constant nodes)."""

    name: str
    op: str
    output_shape: Shape | None
    params: int
    macs: int
    activation_bytes: int
    constant: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op,
                "output_shape": list(self.output_shape) if self.output_shape is not None else None,
                "params": self.params, "macs": self.macs, "activation_bytes": self.activation_bytes,
                "constant": self.constant}


@dataclass(frozen=True)
class ModelAnalysis:
    """Totals, per-layer numbers, live memory per step and the compatibility report."""

    params: int
    macs: int
    model_bytes: int
    weight_bytes: int
    io_bytes: int
    peak_activation_bytes: int
    peak_step: int
    live_bytes_per_step: tuple[int, ...]
    layers: list[LayerInfo]
    op_counts: dict[str, int]
    unsupported: dict[str, list[str]]
    inputs: dict[str, Shape] = field(default_factory=dict)
    outputs: dict[str, Shape] = field(default_factory=dict)
    shape_source: str = "onnx"
    activation_precision: str = "stored dtypes"   # how activation bytes were counted (see :func:`analyze`)
    # every value's concrete shape and ONNX element type (:func:`value_shapes`), for callers that size tensors
    value_shapes: dict[str, Shape] = field(default_factory=dict, repr=False)
    value_types: dict[str, int] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params, "macs": self.macs, "model_bytes": self.model_bytes,
            "weight_bytes": self.weight_bytes, "io_bytes": self.io_bytes,
            "peak_activation_bytes": self.peak_activation_bytes, "peak_step": self.peak_step,
            "peak_layer": self.layers[self.peak_step].name if self.layers else None,
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "outputs": {k: list(v) for k, v in self.outputs.items()},
            "shape_source": self.shape_source,
            "op_counts": dict(self.op_counts),
            "layers": [layer.to_dict() for layer in self.layers],
            "live_bytes_per_step": list(self.live_bytes_per_step),
            "unsupported": {k: list(v) for k, v in self.unsupported.items()},
        }


def analyze(model: Any, input_shapes: Mapping[str, Shape] | None = None, *,
            precision: str | None = None) -> ModelAnalysis:
    """Analyse an ONNX model (a ``ModelProto`` or a path to an .onnx file).

    ``input_shapes`` fixes input dimensions ``{input_name: shape}``; without it a dynamic first
    (batch) dimension becomes 1 and any other dynamic dimension is an error.

    ``peak_activation_bytes`` is the RAM a static arena needs to run the graph's own node
    order (a topological schedule) with no in-place reuse: at each step the tensors live
    are summed, where a tensor is live from the step producing it (graph inputs: step 0) to
    its last consumer (graph outputs: to the end); initializers and constant-node outputs are
    weights, not activations. ``live_bytes_per_step[k]`` is that sum during node ``k``.

    ``precision`` counts activations at the size the deployed model holds them in (``None``:
    the stored dtypes). ``"int8"`` on a QDQ model: each quantized activation -- the float
    tensor a QuantizeLinear reads (when only QuantizeLinears read it), its int8 copy and the
    DequantizeLinear outputs -- is one tensor of the quantized dtype, live from the first
    producer to the last reader (the Q/DQ pairs fuse into integer kernels at deployment). On a
    float model (no quantization ops) ``"int8"``/``"fp16"``/``"fp32"`` estimates every float
    activation at 1/2/4 bytes. A model with its own quantization ops keeps its other dtypes.

    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> import tempfile
    >>> a = analyze(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"))
    >>> a.macs, a.params  # conv 4*6*6*1*3*3 + gemm 144*10; 36+4+1440+10
    (2736, 1490)
    """
    import onnx

    proto, model_bytes, label = _load(model)
    if precision == "int8":
        proto = _as_integer_model(proto)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    fixed = _fixed_input_shapes(inputs, input_shapes or {}, label)
    constants = _validate_order_and_constants(graph, inits, {i.name for i in inputs}, label)
    shapes, types, source = value_shapes(proto, fixed, label)
    for name, t in inits.items():
        shapes[name], types[name] = tuple(t.dims), t.data_type
    if precision is not None and precision not in _PRECISION_BYTES:
        raise EdgekilnError(f"precision must be one of {', '.join(_PRECISION_BYTES)} (got {precision!r})")
    quantizes = any(n.op_type in _QUANT_OPS and not all(o in constants for o in n.output if o) for n in graph.node)
    alias, qtypes = _qdq_aliases(graph, constants, {o.name for o in graph.output}, types) \
        if precision == "int8" and quantizes else ({}, {})
    estimate = _PRECISION_BYTES[precision] if precision is not None and not quantizes else None
    how = "int8, quantized tensors" if alias else f"{precision}, estimated" if estimate else "stored dtypes"

    def stored_bytes(name: str) -> int:
        shape = shapes.get(name)
        return tensor_nbytes(types.get(name, onnx.TensorProto.FLOAT), math.prod(shape)) if shape is not None else 0

    def nbytes(name: str) -> int:
        """Bytes of an activation as deployed; 0 for one that is another's alias."""
        root = alias.get(name, name)
        if root != name:
            return 0
        if name in qtypes:   # the root of a quantized group: its elements at the quantized dtype
            return tensor_nbytes(qtypes[name], math.prod(shapes[name])) if shapes.get(name) is not None else 0
        if estimate is not None and types.get(name, onnx.TensorProto.FLOAT) in _FLOAT_TYPES and shapes.get(name):
            return estimate * math.prod(shapes[name])
        return stored_bytes(name)

    sources: dict[str, frozenset[str]] = {}  # constant value -> initializers it is made from
    counted: set[str] = set()
    body_params = 0
    layers: list[LayerInfo] = []
    for i, node in enumerate(graph.node):
        skip = _NON_PARAM_INPUTS.get(node.op_type, frozenset())
        used: set[str] = set()
        for pos, name in enumerate(node.input):
            if pos in skip or not name:
                continue
            if name in inits:
                used.add(name)
            elif name in sources:
                used |= sources[name]
        body = body_cost(node, shapes, inits, _macs)   # If/Loop/Scan: weights and MACs of the bodies
        if body is not None:
            used |= {n for n in _implicit_inputs(node) if n in inits}
            body_params += body.params
        is_const = all(o in constants for o in node.output if o)
        outs = [o for o in node.output if o]
        if is_const:
            for o in outs:
                sources[o] = frozenset(used)
        else:
            counted |= used
        first = shapes.get(outs[0]) if outs else None
        layers.append(LayerInfo(
            name=node.name or f"{node.op_type}_{i}", op=node.op_type, output_shape=first,
            params=sum(math.prod(inits[n].dims) for n in used) + (body.params if body else 0),
            macs=0 if is_const else _macs(node, shapes) + (body.macs if body else 0),
            activation_bytes=0 if is_const else sum(nbytes(o) for o in outs),
            constant=is_const))

    # Liveness over activations: graph inputs and the outputs of non-constant nodes.
    producers: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    input_names = {i.name for i in inputs}
    for step, node in enumerate(graph.node):
        for name in [*node.input, *_implicit_inputs(node)]:
            if name and name not in inits and name not in constants:
                consumers.setdefault(alias.get(name, name), []).append(step)
        for name in node.output:
            root = alias.get(name, name)   # NOTE: a fused Q/DQ chain is produced where its float tensor is
            if name and name not in constants and root not in producers and root not in input_names:
                producers[root] = step
    activations = [i.name for i in inputs] + list(producers)
    out_names = [o.name for o in graph.output]
    live = compute_liveness({n: nbytes(n) for n in activations}, producers, consumers, len(graph.node),
                            outputs=[alias.get(o, o) for o in out_names if o not in constants and o not in inits])

    weight_bytes = sum(tensor_nbytes(t.data_type, math.prod(t.dims)) for t in inits.values())
    weight_bytes += sum(tensor_nbytes(t.data_type, math.prod(t.dims)) for t in body_initializers(graph))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                weight_bytes += tensor_nbytes(attr.t.data_type, math.prod(attr.t.dims))
    io_names = list(dict.fromkeys([*fixed, *out_names]))
    counts = Counter(node.op_type for node in graph.node)
    return ModelAnalysis(
        params=sum(math.prod(inits[n].dims) for n in counted) + body_params,
        macs=sum(layer.macs for layer in layers),
        model_bytes=model_bytes,
        weight_bytes=weight_bytes,
        io_bytes=sum(nbytes(n) for n in dict.fromkeys(alias.get(n, n) for n in io_names)),
        peak_activation_bytes=live.peak_bytes,
        peak_step=live.peak_step,
        live_bytes_per_step=live.live_bytes_per_step,
        layers=layers,
        op_counts=dict(counts.most_common()),
        unsupported=unsupported_ops(proto, shapes),
        inputs=dict(fixed),
        outputs={n: shapes[n] for n in out_names if shapes.get(n) is not None},
        shape_source=source,
        activation_precision=how,
        value_shapes=shapes,
        value_types=types,
    )


def _qdq_aliases(graph: Any, constants: set[str], graph_outputs: set[str],
                 types: Mapping[str, int]) -> tuple[dict[str, str], dict[str, int]]:
    """``{tensor: root}`` for the tensors that are one int8 activation once Q/DQ pairs fuse: a
    non-constant QuantizeLinear's output, the DequantizeLinear outputs of it, and the float tensor
    the QuantizeLinear reads when only QuantizeLinears read it and it is no graph output (else
    that float tensor stays and the group starts at the int8 copy). Roots map to themselves;
    the second dict is each root's quantized element type."""
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    alias: dict[str, str] = {}
    qtypes: dict[str, int] = {}
    for node in graph.node:
        if not node.output or node.output[0] in constants or not node.input:
            continue
        x, out = node.input[0], node.output[0]
        if node.op_type == "QuantizeLinear" and types.get(out) in _INT_TYPES:
            fused = readers.get(x) == {"QuantizeLinear"} and x not in graph_outputs
            root = alias.get(x, x) if fused else out
            alias.setdefault(root, root)
            alias[out] = root
            qtypes.setdefault(root, types[out])
        elif node.op_type == "DequantizeLinear" and x in alias:
            alias[out] = alias[x]
    return alias, qtypes


# --- loading and input shapes ------------------------------------------------------------

def _as_integer_model(proto: Any) -> Any:
    """``proto`` with the Q/DQ pairs an int8 form left out for a runtime's sake put back
    (:mod:`edgekiln.models.qdq_pairs`): deployed as int8, those activations are int8 too."""
    from edgekiln.models.qdq_pairs import recorded_pairs, restore_qdq_pairs

    if not recorded_pairs(proto):
        return proto
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    restore_qdq_pairs(copy)
    return copy


def _load(model: Any) -> tuple[Any, int, str]:
    """(proto, serialized size in bytes, label for messages)."""
    if isinstance(model, (str, Path)):
        from edgekiln.models.intake import load_onnx

        path = Path(model)
        proto = load_onnx(path)
        size = path.stat().st_size
        # NOTE: weights stored in side files (external data) are part of the model's size.
        externals = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        size += sum((path.parent / loc).stat().st_size for loc in externals if (path.parent / loc).is_file())
        return proto, size, str(path)
    if not hasattr(model, "graph"):
        raise EdgekilnError(f"analyze: expected an ONNX ModelProto or a path, got {type(model).__name__}")
    return model, model.ByteSize(), model.graph.name or "model"


def _fixed_input_shapes(inputs: list[Any], given: Mapping[str, Shape], label: str) -> dict[str, Shape]:
    names = [i.name for i in inputs]
    for key in given:
        if key not in names:
            raise EdgekilnError(f"{label}: unknown input name '{key}'; the model's inputs are: {', '.join(names)}")
    fixed: dict[str, Shape] = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        # NOTE: Paddle declares dynamic dims as -1, some exporters as 0: dynamic like a symbol.
        shown = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in dims]
        if inp.name in given:
            shape = tuple(int(d) for d in given[inp.name])
            if len(shape) != len(dims) and dims:
                raise EdgekilnError(f"{label}: input '{inp.name}' has rank {len(dims)} {shown}, "
                                    f"the given shape {list(shape)} has rank {len(shape)}")
            for k, (want, have) in enumerate(zip(shown, shape, strict=False)):
                if isinstance(want, int) and want != have:
                    raise EdgekilnError(f"{label}: input '{inp.name}' dimension {k} is {want}, the given shape says {have}")
            fixed[inp.name] = shape
            continue
        if not inp.type.tensor_type.HasField("shape"):
            raise EdgekilnError(f"{label}: input '{inp.name}' has no shape (unknown rank); pass a shape for it "
                                f"(input_shapes={{'{inp.name}': (...)}} or --input-shape)")
        shape = []
        for k, d in enumerate(shown):
            if isinstance(d, int):
                shape.append(d)
            elif k == 0:
                shape.append(1)  # NOTE: an unknown leading dim is the batch: analyse batch 1.
            else:
                raise EdgekilnError(f"{label}: input '{inp.name}' has dynamic dimension {k} in shape {shown}; "
                                    f"pass a shape for it (input_shapes={{'{inp.name}': (...)}} or --input-shape)")
        fixed[inp.name] = tuple(shape)
    return fixed


def _validate_order_and_constants(graph: Any, inits: Mapping[str, Any], inputs: set[str], label: str) -> set[str]:
    """Check the node order is topological; return the values computable from initializers alone."""
    produced_at = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    known = set(inits) | inputs
    constants: set[str] = set()
    for i, node in enumerate(graph.node):
        reads = [n for n in [*node.input, *_implicit_inputs(node)] if n]
        for name in reads:
            if name in known:
                continue
            where = f"node '{node.name or i}' ({node.op_type})"
            if name in produced_at:
                raise EdgekilnError(f"{label}: {where} reads '{name}' before node {produced_at[name]} produces it; "
                                    "the node order is not topological")
            raise EdgekilnError(f"{label}: {where} reads '{name}', which nothing produces")
        has_subgraph = any(a.type in (5, 10) for a in node.attribute)  # GRAPH, GRAPHS
        if not has_subgraph and all(n in inits or n in constants for n in reads) and node.op_type not in _RANDOM_OPS:
            constants.update(o for o in node.output if o)
        known.update(o for o in node.output if o)
    return constants


_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})


def _implicit_inputs(node: Any) -> list[str]:
    """Outer-scope values read inside a node's subgraphs (If/Loop/Scan bodies)."""
    out: list[str] = []
    for g in node_subgraphs(node):
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for sub in g.node:
            out += [n for n in [*sub.input, *_implicit_inputs(sub)] if n and n not in defined]
            defined.update(sub.output)
    return list(dict.fromkeys(out))


# --- shapes --------------------------------------------------------------------------------

def value_shapes(proto: Any, fixed: Mapping[str, Shape], label: str) -> tuple[dict[str, Shape], dict[str, int], str]:
    """Concrete shapes and element types of every value; the source is "onnx" or "onnxruntime"."""
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(proto)
    g = work.graph
    for inp in g.input:
        if inp.name in fixed:
            tshape = inp.type.tensor_type.shape
            tshape.ClearField("dim")
            for d in fixed[inp.name]:
                tshape.dim.add().dim_value = int(d)
    # NOTE: stale symbolic dims (e.g. 'batch' on outputs) would survive inference; drop them.
    del g.value_info[:]
    for out in g.output:
        out.type.tensor_type.ClearField("shape")
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
        infos = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output,
                 *subgraph_value_infos(inferred.graph)]
    except Exception:  # noqa: BLE001 - fall back to onnxruntime below
        infos = list(work.graph.input)
    for vi in infos:
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
    needed = [o for n in g.node for o in n.output if o]
    if all(o in shapes for o in needed):
        return shapes, types, "onnx"
    ort_shapes, ort_types = _shapes_from_onnxruntime(work, fixed, needed, label)
    shapes.update(ort_shapes)
    types.update(ort_types)
    return shapes, types, "onnxruntime"


def _shapes_from_onnxruntime(work: Any, fixed: Mapping[str, Shape], names: list[str],
                             label: str) -> tuple[dict[str, Shape], dict[str, int]]:
    import numpy as np
    import onnx

    from edgekiln.execution.ort import error_line, run_with_intermediates
    from edgekiln.execution.specs import onnx_elem_dtype

    inits = {t.name for t in work.graph.initializer}
    feeds = {inp.name: np.zeros(fixed[inp.name], dtype=onnx_elem_dtype(inp.type.tensor_type.elem_type))
             for inp in work.graph.input if inp.name not in inits}
    try:
        found = run_with_intermediates(work, feeds, names)
    except Exception as exc:  # noqa: BLE001
        raise EdgekilnError(f"{label}: shape inference was incomplete and onnxruntime could not run the model "
                            f"to find the shapes: {error_line(exc, 200)}") from exc
    out_names, values = list(found), list(found.values())
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    for name, value in zip(out_names, values, strict=True):
        value = np.asarray(value)
        shapes[name] = tuple(int(d) for d in value.shape)
        if value.dtype != object:
            types[name] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    return shapes, types


def tensor_nbytes(elem_type: int, count: int) -> int:
    import onnx

    tp = onnx.TensorProto
    four_bit = {getattr(tp, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(tp, n)}
    if elem_type in four_bit:
        return (count + 1) // 2
    if elem_type in (tp.STRING, tp.UNDEFINED):
        return 0
    return count * onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize


# --- MACs ----------------------------------------------------------------------------------

def _macs(node: Any, shapes: Mapping[str, Shape]) -> int:
    """Multiply-accumulates of one node from the (concrete) shapes of its inputs and outputs."""
    def shape(pos: int) -> Shape | None:
        return shapes.get(node.input[pos]) if len(node.input) > pos and node.input[pos] else None

    out = shapes.get(node.output[0]) if node.output else None
    op = node.op_type
    if op in _CONV_LIKE:
        w = shape(_CONV_LIKE[op][1])
        # Each output element is a dot product over Cin/groups * prod(kernel) (= W.shape[1:]).
        return math.prod(out) * math.prod(w[1:]) if out is not None and w is not None else 0
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)
        # Each input element is scattered into Cout/groups * prod(kernel) (= W.shape[1:]) outputs.
        return math.prod(x) * math.prod(w[1:]) if x is not None and w is not None else 0
    if op == "Gemm":
        a = shape(0)
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        if out is None or a is None:
            return 0
        return math.prod(out) * (a[0] if trans_a else a[1])
    if op in _MATMUL_LIKE:
        a = shape(_MATMUL_LIKE[op][0])
        # The output already carries the broadcast batch dims; K is A's last dim.
        return math.prod(out) * a[-1] if out is not None and a else 0
    return 0



# --- rendering -----------------------------------------------------------------------------
