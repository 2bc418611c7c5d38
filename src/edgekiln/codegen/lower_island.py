"""Float islands: elementwise float ops between one int8 tensor and the next QuantizeLinear, as one table.

``edgekiln quantize`` (the speed rule, quant/speed.py) and onnxruntime leave some activations float:
``DQ -> PRelu -> Q``, SiLU as ``DQ -> Sigmoid -> Mul(x, .) -> Q``, ``DQ -> HardSigmoid -> Mul -> Q``,
an ``Add``/``Mul``/``Sub``/``Div`` with a constant. Whatever the chain, when every float value in it
is an elementwise function of ONE int8 tensor (plus constants), its int8 result is a function of
that tensor's 256 possible values, per channel at most. The table is computed here by running the
chain itself, DequantizeLinear to QuantizeLinear, in onnxruntime on all 256 values (for every
channel at once): so the C lookup reproduces onnxruntime's float arithmetic exactly, not an
approximation of it. A table that is the same for every channel becomes a ``lut`` op (256 B);
otherwise a ``lut_channel`` op (``C x 256`` B, e.g. PRelu's per-channel slopes).

A float island whose result reaches a QuantizeLinear only through a MaxPool or data movement (MTCNN:
``PRelu -> MaxPool -> Q``, ``PRelu -> Transpose -> Reshape -> Q``) takes that quantization:
QuantizeLinear is monotone and elementwise, so quantizing before or after the max (or the move)
gives the same integers. An island read by Mul/Add/Sub of another tensor or by a mean over H,W (an
SE block's float HardSwish) is left to those ops, which read it through its table (lower_binary.py);
one that is a graph output gets int8 qparams from its exact range.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekiln.codegen.ir import LowerContext, Op, QTensor
from edgekiln.errors import EdgekilnError

#: ONNX ops that act element by element (with numpy broadcasting of their constant inputs).
ELEMENTWISE = frozenset({"PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Relu",
                         "Clip", "Mul", "Add", "Sub", "Div", "Neg", "Abs", "Exp", "Softplus", "Selu", "Erf",
                         "Sqrt", "Pow", "Min", "Max", "Celu", "Mish", "Gelu", "ThresholdedRelu"})
#: ops that commute with QuantizeLinear (a monotone elementwise map): max(Q(v)) == Q(max(v)), and
#: moving values moves their quantized values alike.
_COMMUTES_WITH_Q = frozenset({"MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
#: ops that read a float operand through its 256-entry table (lower_binary.py).
_TAKE_TABLES = frozenset({"Mul", "Add", "Sub", "GlobalAveragePool", "ReduceMean"})


def quantized_downstream(ctx: LowerContext, value: str) -> str | None:
    """The first value quantized along a chain of single readers that commute with QuantizeLinear."""
    while True:
        readers = ctx.float_consumers.get(value, [])
        if len(readers) != 1 or readers[0].op_type not in _COMMUTES_WITH_Q:
            return None
        value = readers[0].output[0]
        if ctx.q_of.get(value):
            return value


def _is_const(ctx: LowerContext, name: str) -> bool:
    return not name or name in ctx.inits or name in ctx.const_dq


def _const_value(ctx: LowerContext, name: str) -> np.ndarray:
    """A constant input as onnxruntime sees it: DequantizeLinear of a quantized constant in float32."""
    if name in ctx.const_dq:
        q, scale, zp, axis = ctx.const_dq[name]
        q = np.asarray(q)
        shape = [1] * q.ndim
        if np.asarray(scale).size > 1:
            shape[axis] = -1
        s = np.asarray(scale, np.float32).reshape(shape if np.asarray(scale).size > 1 else ())
        z = np.asarray(zp).astype(np.int32).reshape(shape if np.asarray(zp).size > 1 else ())
        return ((q.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32)
    return np.asarray(ctx.inits[name])


def wants_island(ctx: LowerContext, node: Any) -> bool:
    """Whether ``node`` is lowered as a float island rather than by its own integer kernel: an
    elementwise op with no kernel of its own, one whose result is not quantized, or an
    Add/Mul/Sub/Div with a constant operand."""
    from edgekiln.codegen.ir import SUPPORTED_OPS

    if node.op_type not in ELEMENTWISE:
        return False
    if node.op_type in ("Add", "Mul", "Sub") and _varies_per_element(ctx, node):
        return False  # a constant tensor operand (lower_binary.constant_tensor), not a table
    if node.op_type in ("Add", "Mul", "Sub", "Div", "PRelu") or node.op_type not in SUPPORTED_OPS:
        return True
    return not ctx.q_of.get(node.output[0])


def _varies_per_element(ctx: LowerContext, node: Any) -> bool:
    """Whether a binary op of one int8 tensor has a quantized constant operand that varies along an
    axis other than the channels (a detector's anchor grid): no per-channel table can hold it."""
    srcs = [i for i in node.input if not _is_const(ctx, i)]
    if len(srcs) != 1 or srcs[0] not in ctx.act_dq or not any(i in ctx.const_dq for i in node.input):
        return False
    x = ctx.graph.tensors[ctx.act_dq[srcs[0]]]
    try:
        _channels_of_constants(ctx, [node], len(x.shape), x.shape[-1] if len(x.shape) in (2, 4) else 1)
    except EdgekilnError:
        return True
    return False


def _gate_chain(ctx: LowerContext, node: Any) -> tuple[str, list[Any], str] | None:
    """``(dq_output, nodes, float_output)`` when ``node`` starts an elementwise chain of one int8
    tensor whose float result is read only by Mul nodes (with another data operand, or several
    readers) and means over H,W: the ops that take a float operand as a table (lower_binary.py)."""
    srcs = {i for i in node.input if not _is_const(ctx, i)}
    if len(srcs) != 1 or next(iter(srcs)) not in ctx.act_dq:
        return None
    values, nodes, cur = set(srcs), [node], node
    while True:
        out = cur.output[0]
        values.add(out)
        readers = ctx.float_consumers.get(out, [])
        if ctx.q_of.get(out) or not readers:
            return None
        own = len(readers) == 1 and readers[0].op_type in ELEMENTWISE and \
            all(i in values or _is_const(ctx, i) for i in readers[0].input)  # SiLU's x * sigmoid(x)
        if all(r.op_type in _TAKE_TABLES for r in readers) and not own:
            return next(iter(srcs)), nodes, out
        if len(readers) != 1 or readers[0].op_type not in ELEMENTWISE \
                or any(i not in values and not _is_const(ctx, i) for i in readers[0].input):
            return None
        cur = readers[0]
        nodes.append(cur)


def find_island(ctx: LowerContext, node: Any) -> tuple[str, list[Any], str, str] | None:
    """``(dq_output, nodes, float_output, quantized_value)`` of the island starting at ``node``, or None.

    ``node`` must read exactly one dequantized int8 tensor (besides constants); the island grows
    along single readers that are elementwise and read nothing but island values and constants,
    until a value is quantized (``quantized_value == float_output``) or feeds a chain of ops that
    commute with QuantizeLinear (MaxPool, Transpose, Reshape, ...) ending at a quantized value.
    """
    if node.op_type not in ELEMENTWISE:
        return None
    srcs = {i for i in node.input if not _is_const(ctx, i)}
    if len(srcs) != 1 or next(iter(srcs)) not in ctx.act_dq:
        return None
    src = next(iter(srcs))
    values, nodes, cur = {src}, [node], node
    while True:
        out = cur.output[0]
        values.add(out)
        if ctx.q_of.get(out):
            return src, nodes, out, out
        readers = ctx.float_consumers.get(out, [])
        if not readers:  # a float graph output (a final Sigmoid the speed rule left float)
            return src, nodes, out, ""
        if len(readers) != 1:
            return None
        nxt = readers[0]
        downstream = quantized_downstream(ctx, out)
        if downstream is not None:
            return src, nodes, out, downstream
        if nxt.op_type not in ELEMENTWISE or any(i not in values and not _is_const(ctx, i) for i in nxt.input):
            return None
        nodes.append(nxt)
        cur = nxt


def _channels_of_constants(ctx: LowerContext, nodes: list[Any], rank: int, channels: int) -> bool:
    """True when some constant varies along the channel axis (ONNX axis 1 of a 2-D or 4-D tensor);
    an error for a constant that varies along another axis."""
    from edgekiln.codegen.lower import node_label

    per_channel = False
    for n in nodes:
        for name in n.input:
            if not name or not _is_const(ctx, name):
                continue
            v = _const_value(ctx, name)
            if v.size == 1:
                continue
            full = (1,) * (rank - v.ndim) + v.shape  # numpy broadcasting aligns shapes on the right
            along_c = rank in (2, 4) and len(full) == rank and full[1] == channels == v.size
            if not along_c:
                raise EdgekilnError(f"{node_label(n)}: constant {name!r} of shape {v.shape} is not per-channel; "
                                    "the C backend needs scalar or per-channel constants in a float island")
            per_channel = True
    return per_channel


def island_table(ctx: LowerContext, nodes: list[Any], x: QTensor, out: str, y: QTensor | None, channels: int,
                 rank: int) -> np.ndarray:
    """``(channels, 256)`` int8: the island run in onnxruntime, from DequantizeLinear(x) to
    QuantizeLinear(y); with ``y=None`` the float32 values before quantization."""
    from onnx import TensorProto, helper, numpy_helper

    from edgekiln.execution.ort import ort_session

    src = nodes[0].input[[i for i, n in enumerate(nodes[0].input) if not _is_const(ctx, n)][0]]
    consts = {n for nd in nodes for n in nd.input if n and _is_const(ctx, n)}
    inits = [numpy_helper.from_array(np.asarray(_const_value(ctx, c)), c) for c in sorted(consts)]
    inits += [numpy_helper.from_array(np.array(x.scale, np.float32), "x_scale"),
              numpy_helper.from_array(np.array(x.zero_point, np.int8), "x_zp")]
    body = [helper.make_node("DequantizeLinear", ["q_in", "x_scale", "x_zp"], [src])]
    body += [helper.make_node(n.op_type, list(n.input), list(n.output), domain=n.domain or None,
                              **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in nodes]
    result, elem = out, TensorProto.FLOAT
    if y is not None:
        inits += [numpy_helper.from_array(np.array(y.scale, np.float32), "y_scale"),
                  numpy_helper.from_array(np.array(y.zero_point, np.int8), "y_zp")]
        body.append(helper.make_node("QuantizeLinear", [out, "y_scale", "y_zp"], ["q_out"]))
        result, elem = "q_out", TensorProto.INT8
    shape = [256, channels, *([1] * (rank - 2))]
    graph = helper.make_graph(body, "island", [helper.make_tensor_value_info("q_in", TensorProto.INT8, shape)],
                              [helper.make_tensor_value_info(result, elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    q = np.broadcast_to(np.arange(-128, 128, dtype=np.int8).reshape(256, *([1] * (rank - 1))), shape).copy()
    try:
        res = np.asarray(ort_session(model).run(None, {"q_in": q})[0])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
        first = (str(exc).strip().splitlines() or ["?"])[0][:200]
        raise EdgekilnError(f"float island ending at {out!r}: onnxruntime could not evaluate it ({first})") from None
    if res.shape != tuple(shape):
        raise EdgekilnError(f"float island ending at {out!r} is not elementwise (shape {res.shape})")
    return np.ascontiguousarray(res.reshape(256, channels).T.astype(np.int8 if y is not None else np.float32))


#: one-op islands a float32 runtime can run as the op itself: ONNX op -> its float attributes (defaults).
FLOAT_FORM_OPS = {"PRelu": {}, "Sigmoid": {}, "Tanh": {}, "HardSwish": {}, "LeakyRelu": {"alpha": 0.01}}


def float_form(ctx: LowerContext, nodes: list[Any], channels: int) -> tuple[str, np.ndarray | None, dict[str, float]] | None:
    """The island as one float op (see :attr:`~edgekiln.codegen.ir.Op.float_form`), or None when it
    is a chain or its constant operand does not reduce to one value per channel (channels last)."""
    if [n.op_type for n in nodes] == ["Sigmoid", "Mul"] and \
            sorted(nodes[1].input) == sorted([nodes[0].input[0], nodes[0].output[0]]):
        return "SiLU", None, {}   # x * sigmoid(x), EfficientNet's and YOLOv8's activation
    if len(nodes) != 1 or nodes[0].op_type not in FLOAT_FORM_OPS:
        return None
    node = nodes[0]
    attrs = {a.name: float(a.f) for a in node.attribute if a.name in FLOAT_FORM_OPS[node.op_type]}
    if node.op_type != "PRelu":
        return node.op_type, None, {**FLOAT_FORM_OPS[node.op_type], **attrs}
    if not _is_const(ctx, node.input[1]):
        return None
    slope = np.asarray(_const_value(ctx, node.input[1]), np.float32)
    if slope.size == 1:
        return "PRelu", slope.reshape(1), {}
    # NOTE: ONNX's per-channel slope is (C,) for 2-D tensors and (C, 1, 1) for NCHW: one value per channel either way
    if slope.size != channels or sum(d > 1 for d in slope.shape) != 1:
        return None
    return "PRelu", slope.reshape(channels), {}


def _output_qparams(values: np.ndarray) -> tuple[float, int]:
    """int8 (scale, zero point) for a float graph output that had none: its exact range over every
    int8 input, zero included (a Sigmoid's [0, 1] gets scale 1/255, zero point -128)."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = float(np.float32((hi - lo) / 255.0)) or 1.0
    return scale, int(np.clip(np.rint(-128 - lo / scale), -128, 127))


def lower_island(ctx: LowerContext, node: Any) -> bool:
    """Lower the float island starting at ``node`` to one ``lut``/``lut_channel`` op; False if it is none."""
    from edgekiln.codegen.ir import activation_qparams
    from edgekiln.codegen.lower import act_input

    found = find_island(ctx, node)
    if found is None:
        gate = _gate_chain(ctx, node) if node.op_type in ELEMENTWISE else None
        if gate is None:
            return False
        ctx.gates[gate[2]] = (gate[0], gate[1])  # lowered by the Mul/Add that reads it
        ctx.folded.update(n.name or n.output[0] for n in gate[1])
        return True
    src, nodes, out, quantized = found
    x = act_input(ctx, nodes[0], list(nodes[0].input).index(src))
    rank = len(x.shape)
    # NOTE: channels are the last C-layout axis (NHWC, or features of a 2-D tensor) = ONNX axis 1
    channels = x.shape[-1] if rank in (2, 4) else 1
    per_channel = _channels_of_constants(ctx, nodes, rank, channels)
    if quantized:
        q_node = ctx.q_of[quantized][0]
        scale, zp = activation_qparams(ctx, q_node)
        name = q_node.output[0] + ("" if quantized == out else "__island")
    else:
        scale, zp = _output_qparams(island_table(ctx, nodes, x, out, None, channels if per_channel else 1,
                                                 rank if per_channel else 2))
        name = out + "__int8"
    y = QTensor(name, x.shape, scale, zp)
    ctx.graph.tensors[name] = y
    table = island_table(ctx, nodes, x, out, y, channels if per_channel else 1, rank if per_channel else 2)
    op_name = (nodes[-1].name or out)
    form = float_form(ctx, nodes, channels)
    if per_channel and not (table == table[:1]).all():
        ctx.graph.ops.append(Op("lut_channel", op_name, [x.name], y.name,
                                attrs=dict(size=x.size, channels=channels), arrays=dict(table=table.reshape(-1)),
                                macs=x.size, float_form=form))
    else:
        ctx.graph.ops.append(Op("lut", op_name, [x.name], y.name, attrs=dict(size=x.size),
                                arrays=dict(table=table[0].copy()), macs=x.size, float_form=form))
    for n in nodes:
        ctx.folded.add(n.name or n.output[0])
    if quantized != out:
        ctx.act_dq[out] = y.name  # the MaxPool/Transpose/... after the island (or the output) reads it
    return True


def unsupported_reader(ctx: LowerContext, value: str) -> str:
    """``"OpType (node 'name')"`` of the first op downstream of float ``value`` that no integer kernel
    lowers (the reason a value stayed float, e.g. an LSTM), or ``""``."""
    from edgekiln.codegen.ir import SUPPORTED_OPS
    from edgekiln.codegen.lower import node_label

    seen, todo = set(), [value]
    while todo and len(seen) < 200:
        for reader in ctx.float_consumers.get(todo.pop(0), []):
            if reader.op_type not in (*SUPPORTED_OPS, *ELEMENTWISE, "QuantizeLinear", "DequantizeLinear"):
                return node_label(reader)
            if reader.output[0] not in seen:
                seen.add(reader.output[0])
                todo.append(reader.output[0])
    return ""


def float_source(ctx: LowerContext, value: str) -> str:
    """``": computed in float by OpType (node 'name')"`` (or ``": a float constant"``) for an error about
    float ``value``; ``""`` when nothing computes it (a graph input)."""
    from edgekiln.codegen.lower import node_label

    if value in ctx.inits:
        return ": a float constant, not quantized"
    producer = next((n for readers in ctx.float_consumers.values() for n in readers if value in n.output), None)
    return f": computed in float by {node_label(producer)}" if producer is not None else ""
