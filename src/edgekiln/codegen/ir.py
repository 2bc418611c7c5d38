"""Integer graph IR: an int8 QDQ ONNX model lowered to a schedule of integer kernels.

Reading a QDQ model (onnxruntime ``quantize_static`` in QDQ format: per-channel int8 weights,
int8 activations, int32 bias) works on the Q/DQ pairs: every ``QuantizeLinear`` output is an
int8 tensor with one scale and zero point; every float compute node between DequantizeLinear
inputs and a QuantizeLinear output becomes one integer op (see :mod:`edgekiln.codegen.lower`).
All multipliers, shifts, folded biases and lookup tables are computed here, once, at export
time ("prepare once"); the C code only runs the integer loops.

Layout: the C tensors are **NHWC** (channels last), batch 1. NOTE: channels-last keeps the
innermost loops of conv, depthwise conv, pooling, per-channel requantization and channel
concat on contiguous memory, and it is the layout TFLM and CMSIS-NN kernels use, so the
generated code can later swap in those kernels. ONNX is NCHW: weights are permuted at export
time, and a Flatten of an ``H*W > 1`` feature map feeding a fully connected layer is handled by
permuting the FC weight columns (no run-time transpose). For a 1-channel input (MNIST) NCHW and
NHWC bytes are identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

#: ONNX ops the C backend lowers (besides QuantizeLinear/DequantizeLinear).
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Concat", "Softmax",
                 "BatchNormalization", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu",
                 "PRelu", "Mul", "Sub", "Div", "Transpose", "Slice", "Split", "Squeeze", "Unsqueeze", "Gather",
                 "Identity", "Pad", "Resize", "ConvTranspose")


@dataclass
class QTensor:
    """An int8 tensor in C layout (NHWC for 4-D, batch 1) with its affine quantization."""

    name: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    #: (C, H, W) when this 2-D tensor is an NHWC feature map flattened in ONNX's NCHW order.
    nchw_flatten_of: tuple[int, int, int] | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass(eq=False)  # NOTE: identity equality: ops hold numpy arrays
class Op:
    """One integer kernel call: ``kind`` names the kernel in ``reference.py`` and ``ek_kernels.c``."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    macs: int = 0
    #: name of a scratch tensor this op alone uses during its step ('' for none), e.g. conv_pool's rows.
    scratch: str = ""
    #: float32 per-channel weight scales of conv/fc ops: export-time metadata for the TFLite
    #: writer, never emitted to C and not counted in :attr:`const_bytes`.
    weight_scale: np.ndarray | None = None
    #: a float island's float op for runtimes that run it in float32 between DEQUANTIZE and QUANTIZE
    #: (LiteRT's XNNPACK runs PRELU/LOGISTIC/... in float, not the GATHER of a table): ``(ONNX op
    #: type, its constant operand per channel or None, its float attributes)``; export-time metadata
    #: for the TFLite writer, never emitted to C.
    float_form: tuple[str, np.ndarray | None, dict[str, float]] | None = None

    @property
    def const_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


@dataclass
class IntGraph:
    """The lowered model: tensors by name, ops in schedule order, one or more inputs and outputs.

    ``output`` is the first graph output; ``extra_outputs`` the others, in ONNX graph order.
    The C library writes all of them into one caller buffer, packed one after the other
    (:attr:`output_offsets`).
    """

    tensors: dict[str, QTensor]
    ops: list[Op]
    input: str
    output: str
    onnx_input_name: str
    onnx_input_shape: tuple[int, ...]
    onnx_output_shape: tuple[int, ...]
    extra_outputs: list[str] = field(default_factory=list)
    #: the int8 tensors of the second, third, ... graph input, and their ONNX (name, shape); the C
    #: library reads all inputs from one caller buffer, packed in graph order (:attr:`input_offsets`).
    extra_inputs: list[str] = field(default_factory=list)
    extra_onnx_inputs: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    @property
    def inputs(self) -> list[str]:
        return [self.input, *self.extra_inputs]

    @property
    def onnx_inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(ONNX name, ONNX shape) of every graph input, in :attr:`inputs` order."""
        return [(self.onnx_input_name, self.onnx_input_shape), *self.extra_onnx_inputs]

    @property
    def input_offsets(self) -> list[int]:
        """Byte offset of each input in the packed input buffer."""
        sizes = [self.tensors[i].size for i in self.inputs]
        return [int(sum(sizes[:k])) for k in range(len(sizes))]

    @property
    def input_bytes(self) -> int:
        return int(sum(self.tensors[i].size for i in self.inputs))

    @property
    def outputs(self) -> list[str]:
        return [self.output, *self.extra_outputs]

    @property
    def output_offsets(self) -> list[int]:
        """Byte offset of each output in the packed output buffer."""
        sizes = [self.tensors[o].size for o in self.outputs]
        return [int(sum(sizes[:k])) for k in range(len(sizes))]

    @property
    def output_bytes(self) -> int:
        return int(sum(self.tensors[o].size for o in self.outputs))

    @property
    def weight_bytes(self) -> int:
        return sum(op.const_bytes for op in self.ops)

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    def consumers(self, tensor: str) -> list[Op]:
        return [op for op in self.ops if tensor in op.inputs]


@dataclass
class LowerContext:
    """Lookup tables over the ONNX graph, used while lowering nodes."""

    inits: dict[str, np.ndarray]
    act_dq: dict[str, str]                 # DQ float output -> int8 tensor name
    const_dq: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]  # -> (q, scale, zp, axis)
    q_of: dict[str, list[Any]]             # float tensor -> QuantizeLinear nodes reading it
    float_consumers: dict[str, list[Any]]  # float tensor -> nodes reading it
    graph: IntGraph
    #: names of nodes already lowered as part of another (a BatchNormalization folded into its Conv).
    folded: set[str] = field(default_factory=set)
    #: float value -> (DQ output it is computed from, elementwise nodes): a float island read by a
    #: binary op (an SE gate ``HardSigmoid(x)`` in ``Mul(y, gate)``), lowered by that op.
    gates: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)


def load_qdq(model: Any, input_shapes: dict[str, tuple[int, ...]] | None = None) -> IntGraph:
    """Lower an int8 QDQ ONNX model (path or ``ModelProto``) to an :class:`IntGraph`.

    Dynamic input dims take ``input_shapes`` (else 1); shape arithmetic is folded first
    (:mod:`edgekiln.codegen.fold_shapes`). Raises :class:`EdgekilnError` naming the op and node
    for anything outside :data:`SUPPORTED_OPS` or a float (unquantized) path.

    >>> from edgekiln.codegen.testmodels import tiny_qdq_model
    >>> load_qdq(tiny_qdq_model("tiny_int8.onnx")).ops[0].kind
    'conv2d'
    """
    import onnx
    from onnx import numpy_helper

    from edgekiln.codegen import lower, lower_island, lower_movement
    from edgekiln.codegen.fold_shapes import fold_shape_subgraphs
    from edgekiln.models.qdq_pairs import recorded_pairs, restore_qdq_pairs
    from edgekiln.models.support import is_constant_mul

    if isinstance(model, str | Path):
        model = onnx.load(str(model))
    elif recorded_pairs(model):   # NOTE: restored below, in place: not the caller's proto
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    # NOTE: quantize may leave activations float where OpenVINO is faster (quant/float_pairs.py);
    # the integer kernels need them int8: the Q/DQ pairs it recorded go back first (exact), before
    # constant subgraphs are folded (YOLOv8n's anchor grid is folded through its Q/DQ pair)
    restore_qdq_pairs(model)
    model = fold_shape_subgraphs(model, input_shapes)
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif is_constant_mul(node, inits):   # a bias scale computed from the two scales
            inits[node.output[0]] = (inits[node.input[0]] * inits[node.input[1]]).astype(np.float32)
    real_inputs = [i for i in g.input if i.name not in inits]
    if not real_inputs or not g.output:
        raise EdgekilnError(f"C export needs at least one graph input and one output, got "
                            f"{len(real_inputs)} inputs and {len(g.output)} outputs")
    q_nodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    if not q_nodes:
        raise EdgekilnError("model has no QuantizeLinear nodes: it is a float model; "
                            "run `edgekiln quantize --scheme int8` first and export the QDQ model")
    ctx = LowerContext(inits=inits, act_dq={}, const_dq={}, q_of={}, float_consumers={},
               graph=IntGraph(tensors={}, ops=[], input="", output="", onnx_input_name=real_inputs[0].name,
                              onnx_input_shape=(), onnx_output_shape=()))
    for node in g.node:
        for name in node.input:
            ctx.float_consumers.setdefault(name, []).append(node)
        if node.op_type == "QuantizeLinear":
            ctx.q_of.setdefault(node.input[0], []).append(node)
    for vi in real_inputs:
        _read_input(ctx, vi)
    for node in g.node:
        if node.op_type == "DequantizeLinear":
            _read_dq(ctx, node)
        elif node.op_type in ("QuantizeLinear", "Constant") or is_constant_mul(node, inits) \
                or (node.name or node.output[0]) in ctx.folded:
            continue
        elif node.op_type not in SUPPORTED_OPS and not lower_island.wants_island(ctx, node):
            raise EdgekilnError(f"op {node.op_type} (node {node.name or node.output[0]!r}) is not supported "
                                f"by the C backend; supported: {', '.join(SUPPORTED_OPS)}")
        elif not (lower_island.wants_island(ctx, node) and lower_island.lower_island(ctx, node)):
            _refuse_float_layer(ctx, [node])
            lower.lower_node(ctx, node)
    _read_output(ctx, g)
    lower.fuse_activations(ctx.graph)
    lower_movement.compose_gathers(ctx.graph)
    return ctx.graph


def activation_qparams(ctx: LowerContext, node: Any) -> tuple[float, int]:
    """``(scale, zero_point)`` of the per-tensor int8 activation quantization ``node`` (a
    QuantizeLinear) applies, a uint8 one shifted to int8; an :class:`EdgekilnError` for per-channel ones."""
    scale = np.asarray(ctx.inits[node.input[1]], dtype=np.float64)
    zp = np.asarray(ctx.inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int8)
    if scale.size != 1 or zp.size != 1:
        raise EdgekilnError(f"activation quantization of node {node.name!r} is per-channel; C export needs "
                            "per-tensor activations")
    if zp.dtype == np.uint8:
        # NOTE: uint8 q with zero point z is the int8 value q - 128 with zero point z - 128: every
        # kernel works on q - z and saturates to the same 256 values, so the C stays int8 and exact.
        return float(scale.reshape(())), int(zp.reshape(())) - 128
    if zp.dtype != np.int8:
        raise EdgekilnError(f"activation zero point of node {node.name!r} is {zp.dtype}; C export needs int8 "
                            "or uint8")
    return float(scale.reshape(())), int(zp.reshape(()))


def _read_input(ctx: LowerContext, vi: Any) -> None:
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
    from edgekiln.codegen.lower_island import quantized_downstream

    qs = ctx.q_of.get(vi.name, [])
    name = ""
    if len(qs) != 1 or len(ctx.float_consumers.get(vi.name, [])) != 1:
        # NOTE: an input reshaped (Unsqueeze, Reshape, ...) before its QuantizeLinear: quantizing
        # first and moving the int8 values gives the same integers.
        down = quantized_downstream(ctx, vi.name)
        if down is None:
            _refuse_float_layer(ctx, ctx.float_consumers.get(vi.name, []))
            from onnx import TensorProto

            from edgekiln.codegen.lower_island import unsupported_reader

            dtype = TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
            reader = unsupported_reader(ctx, vi.name)
            raise EdgekilnError(f"graph input {vi.name!r} ({dtype}) must feed exactly one QuantizeLinear (an int8 "
                                f"QDQ model)" + (f"; it feeds {reader}" if reader else ""))
        qs, name = ctx.q_of[down], vi.name + "__int8"
        ctx.act_dq[vi.name] = name
    if dims[0] != 1:
        raise EdgekilnError(f"graph input {vi.name!r} has batch {dims[0]}; C export needs batch 1")
    scale, zp = activation_qparams(ctx, qs[0])
    name = name or qs[0].output[0]
    ctx.graph.tensors[name] = QTensor(name, to_c_shape(tuple(dims)), scale, zp)
    if ctx.graph.input:
        ctx.graph.extra_inputs.append(name)
        ctx.graph.extra_onnx_inputs.append((vi.name, tuple(dims)))
    else:
        ctx.graph.input = name
        ctx.graph.onnx_input_shape = tuple(dims)


#: ops with weights: float in an int8 QDQ model only when quantize kept the whole layer float.
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _refuse_float_layer(ctx: LowerContext, nodes: list[Any]) -> None:
    """A one-line error for a weighted layer left float (``quantize --keep-float``, or kept float for
    latency by the speed rule): the C library is integer-only."""
    for node in nodes:
        if node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] in ctx.inits:
            raise EdgekilnError(f"layer {node.name or node.output[0]!r} ({node.op_type}) is float in this QDQ model "
                                "(quantize kept it float: --keep-float, or for latency, see the quantize report's "
                                "speed.float_for_latency); the C backend is integer-only and needs every Conv/Gemm "
                                "int8")


def _read_dq(ctx: LowerContext, node: Any) -> None:
    src = node.input[0]
    if src in ctx.inits:
        scale = np.asarray(ctx.inits[node.input[1]], dtype=np.float64)
        zp = np.asarray(ctx.inits[node.input[2]]) if len(node.input) > 2 and node.input[2] \
            else np.zeros_like(scale, dtype=np.int32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        ctx.const_dq[node.output[0]] = (np.asarray(ctx.inits[src]), scale, zp, axis)
    elif src in ctx.graph.tensors:
        ctx.act_dq[node.output[0]] = src
    else:
        raise EdgekilnError(f"DequantizeLinear {node.name!r} reads {src!r}, which is neither a weight nor a "
                            "quantized activation")


def _read_output(ctx: LowerContext, g: Any) -> None:
    names = [_output_tensor(ctx, vi.name) for vi in g.output]
    if len(set(names)) != len(names):
        raise EdgekilnError("two graph outputs are the same int8 tensor; C export needs distinct outputs")
    ctx.graph.output, ctx.graph.extra_outputs = names[0], names[1:]
    ctx.graph.onnx_output_shape = to_onnx_shape(ctx.graph.tensors[names[0]].shape)


def _output_tensor(ctx: LowerContext, out: str) -> str:
    from edgekiln.codegen import lower

    if out in ctx.act_dq:
        name = ctx.act_dq[out]
    elif out in ctx.graph.tensors:
        name = out
    else:
        raise EdgekilnError(f"graph output {out!r} is not the DequantizeLinear of an int8 tensor; "
                            "the last op is not quantized")
    t = ctx.graph.tensors[name]
    if t.nchw_flatten_of is not None:
        name = lower.emit_nchw_transpose(ctx, name)
    if name == ctx.graph.input:
        raise EdgekilnError(f"graph output {out!r} is the graph input (no computation)")
    return name


def to_c_shape(onnx_shape: tuple[int, ...]) -> tuple[int, ...]:
    """NCHW -> NHWC for 4-D shapes; other ranks unchanged."""
    if len(onnx_shape) == 4:
        n, c, h, w = onnx_shape
        return (n, h, w, c)
    return tuple(onnx_shape)


def to_onnx_shape(c_shape: tuple[int, ...]) -> tuple[int, ...]:
    """NHWC -> NCHW for 4-D shapes; other ranks unchanged."""
    if len(c_shape) == 4:
        n, h, w, c = c_shape
        return (n, c, h, w)
    return tuple(c_shape)

