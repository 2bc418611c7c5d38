"""Find and rewrite the trainable tail of an ONNX classifier: the last dense layers after a cut.

:func:`find_tail` walks back from the graph output through the ops a numpy learner can train:
``Gemm`` (alpha = beta = 1, either ``transB``), ``MatMul`` + ``Add``, ``Relu``, a trailing
``Softmax``/``Identity`` (kept as it is), and in QDQ models the Quantize/DequantizeLinear pairs
around them (weights per tensor or per output channel, an int32 bias, activation QDQ, a Relu
that the quantizer fused into a QuantizeLinear whose zero point is the type's minimum).
``scope="head"`` takes the last dense layer, ``"last-block"`` the last two. Anything else is
refused with the op and node named.

:func:`read_params` gives the tail's weights as float32, dequantized, each weight as
``[out, in]`` (rows are output units, whatever the file's orientation). :func:`write_params`
writes new values into a copy of the model (a grown last layer included) and re-quantizes
them for an int8 model. Reading and writing the Q/DQ parameters, in the compacted form
``edgekiln quantize`` writes too (computed bias scales, left-out zero points, initializers shared
between layers and never changed in place), is :mod:`edgekiln.runtime.head_qdq`.

>>> import onnx, tempfile
>>> from edgekiln.testing.tiny import tiny_head_onnx
>>> proto = onnx.load(tiny_head_onnx(tempfile.mkdtemp() + "/m.onnx", int8=True))
>>> spec = find_tail(proto, scope="last-block")
>>> spec.cut, [d.node for d in spec.layers], spec.quantized
('features_DequantizeLinear_Output', ['fc1', 'fc2'], True)
>>> read_params(proto, spec)[spec.layers[-1].weight].shape
(8, 24)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.head_qdq import GraphIndex, InitWriter, QParams, attr, dequantize, label, qparams_of

SCOPES = ("head", "last-block")
_PASS_THROUGH = ("Softmax", "Identity")


@dataclass(frozen=True)
class Dense:
    """One dense layer of the tail. ``weight``/``bias`` are initializer names (the quantized ones
    in a QDQ model); ``transposed`` means the file stores the weight as ``[out, in]`` (Gemm
    ``transB=1``); ``relu_after`` a Relu follows (explicit or fused); ``wq``/``bq``/``out_q`` the
    weight's, bias's and output's quantization parameters (None in a float model)."""

    node: str
    weight: str
    bias: str
    transposed: bool
    relu_after: bool = False
    wq: QParams | None = None
    bq: QParams | None = None
    out_q: QParams | None = None
    in_dim: int = 0
    out_dim: int = 0


@dataclass(frozen=True)
class TailSpec:
    """The trainable tail: ``cut`` is the float tensor that feeds the first dense layer (the
    features), ``layers`` the dense layers in order, ``output`` the graph output, ``num_classes``
    the last layer's outputs, ``quantized`` whether the weights are int8 QDQ. ``cut_q`` is the
    activation QDQ in front of the cut (its int8 values are exact features), None in float."""

    cut: str
    layers: tuple[Dense, ...]
    output: str
    num_classes: int
    quantized: bool
    cut_q: QParams | None = None

    @property
    def feature_dim(self) -> int:
        return self.layers[0].in_dim


def _const_tensor(g: GraphIndex, name: str, what: str, node: Any) -> tuple[str, np.ndarray, QParams | None]:
    """``(initializer name, float value, qparams)`` of a weight or bias input: an initializer,
    or a DequantizeLinear of one."""
    if g.is_const(name):
        return name, np.asarray(g.array(name), np.float32), None
    dq = g.producer.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear" and g.is_const(dq.input[0]):
        q = qparams_of(g, dq)
        raw = np.asarray(g.array(dq.input[0]))
        return dq.input[0], dequantize(raw, q), q
    raise EdgekilnError(f"the {what} of {label(node)} is not a constant (nor a dequantized constant); "
                        "learning supports Gemm/MatMul/Relu tails with constant weights")


def _refuse(model_name: str, after: str, node: Any) -> EdgekilnError:
    return EdgekilnError(f"the tail of {model_name} after {after} has a {node.op_type} ({label(node)}); "
                         "learning supports Gemm/MatMul/Relu tails")


def _dense_at(g: GraphIndex, node: Any) -> tuple[Dense, str, int, int] | None:
    """``(Dense without relu/out_q, input tensor, in_dim, out_dim)`` for a Gemm or a MatMul+Add
    whose output tensor ``node`` produces; None if ``node`` is not one."""
    if node.op_type == "Gemm":
        if float(attr(node, "alpha", 1.0)) != 1.0 or float(attr(node, "beta", 1.0)) != 1.0 or attr(node, "transA", 0):
            raise EdgekilnError(f"{label(node)}: Gemm with alpha/beta != 1 or transA is not supported for learning")
        if len(node.input) < 3 or not node.input[2]:
            raise EdgekilnError(f"{label(node)}: a dense layer without a bias is not supported for learning")
        trans = bool(attr(node, "transB", 0))
        w_name, w, wq = _const_tensor(g, node.input[1], "weight", node)
        b_name, b, bq = _const_tensor(g, node.input[2], "bias", node)
        out_dim, in_dim = (w.shape if trans else w.shape[::-1])
        return (Dense(node.name or node.output[0], w_name, b_name, trans, wq=wq, bq=bq, in_dim=int(in_dim),
                      out_dim=int(out_dim)), node.input[0], int(in_dim), int(out_dim))
    if node.op_type == "Add":
        mm, bias_in = None, None
        for i, j in ((0, 1), (1, 0)):
            p = g.producer.get(node.input[i])
            if p is not None and p.op_type == "MatMul":
                mm, bias_in = p, node.input[j]
                break
        if mm is None:
            return None
        w_name, w, wq = _const_tensor(g, mm.input[1], "weight", mm)
        b_name, b, bq = _const_tensor(g, bias_in, "bias", node)
        if w.ndim != 2 or b.size != w.shape[1]:
            raise EdgekilnError(f"{label(mm)}: MatMul weight {list(w.shape)} with bias {list(b.shape)} is not a "
                                "dense layer")
        return (Dense(mm.name or mm.output[0], w_name, b_name, False, wq=wq, bq=bq, in_dim=int(w.shape[0]),
                      out_dim=int(w.shape[1])), mm.input[0], int(w.shape[0]), int(w.shape[1]))
    return None


def find_tail(proto: Any, *, scope: str = "head", head: str | None = None, model_name: str = "the model"
              ) -> TailSpec:
    """The trainable tail of ``proto`` (see the module doc). ``head`` names the last dense node
    to train (default: the one that produces the output). Raises :class:`EdgekilnError` (exit 2)
    naming the op and node it cannot train through."""
    if scope not in SCOPES:
        raise EdgekilnError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    g = GraphIndex(proto)
    if len(g.graph.output) != 1:
        raise EdgekilnError(f"{model_name} has {len(g.graph.output)} outputs; learning needs one classifier output")
    output = g.graph.output[0].name
    want = 1 if scope == "head" else 2
    layers: list[Dense] = []
    tensor, after = output, "the output"
    pending_relu, pending_q = False, None
    quantized = False
    while len(layers) < want:
        node = g.producer.get(tensor)
        if node is None:
            raise EdgekilnError(f"{model_name}: reached the graph input before finding {want} dense layer(s)")
        op = node.op_type
        if op in _PASS_THROUGH and not layers and not pending_relu:
            tensor, pending_q = node.input[0], None   # NOTE: a QDQ after a trailing Softmax is not retrained
            continue
        if op == "DequantizeLinear":
            q = g.producer.get(node.input[0])
            if q is None or q.op_type != "QuantizeLinear" or pending_q is not None:
                raise _refuse(model_name, after, node)
            quantized = True
            pending_q = qparams_of(g, q)
            tensor = q.input[0]
            continue
        if op == "Relu" and not pending_relu:
            pending_relu = True
            tensor = node.input[0]
            continue
        found = _dense_at(g, node)
        if found is None:
            raise _refuse(model_name, after, node)
        dense, inp, _, out_dim = found
        if head is not None and not layers and dense.node != head:
            raise EdgekilnError(f"{model_name}: the dense layer feeding the output is {dense.node}, not {head}")
        if not layers and pending_relu:
            raise EdgekilnError(f"{model_name}: a Relu after the last dense layer {dense.node} is not a classifier "
                                "output; learning needs logits")
        # NOTE: ORT's QDQ quantizer drops a Relu after a Gemm and gives the Gemm's QuantizeLinear
        # the range [0, max]: its zero point is the type's minimum. Only a hidden layer is read so.
        fused = (pending_q is not None and bool(layers) and not pending_relu
                 and int(np.asarray(pending_q.zero_point).reshape(-1)[0]) == pending_q.qrange[0])
        dense = replace(dense, relu_after=pending_relu or fused, out_q=pending_q)
        if layers and layers[0].in_dim != out_dim:
            raise EdgekilnError(f"{model_name}: {dense.node} gives {out_dim} outputs but the next layer takes "
                                f"{layers[0].in_dim}")
        layers.insert(0, dense)
        pending_relu, pending_q = False, None
        tensor, after = inp, dense.node
    cut_q = None
    dq = g.producer.get(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = g.producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            cut_q = qparams_of(g, q)
    return TailSpec(cut=tensor, layers=tuple(layers), output=output, num_classes=layers[-1].out_dim,
                    quantized=quantized or any(d.wq is not None for d in layers), cut_q=cut_q)


def read_params(proto: Any, spec: TailSpec) -> dict[str, np.ndarray]:
    """The tail's weights and biases as float32 (dequantized), keyed by their initializer names;
    each weight is ``[out, in]``.

    >>> from edgekiln.testing.tiny import tiny_head_onnx
    >>> import onnx, tempfile
    >>> proto = onnx.load(tiny_head_onnx(tempfile.mkdtemp() + "/m.onnx"))
    >>> spec = find_tail(proto)
    >>> read_params(proto, spec)[spec.layers[-1].weight].shape
    (8, 24)
    """
    g = GraphIndex(proto)
    out: dict[str, np.ndarray] = {}
    for d in spec.layers:
        w = np.asarray(g.array(d.weight))
        w = dequantize(w, d.wq) if d.wq is not None else w.astype(np.float32)
        out[d.weight] = np.ascontiguousarray(w if d.transposed else w.T, dtype=np.float32)
        b = np.asarray(g.array(d.bias))
        out[d.bias] = (dequantize(b, d.bq) if d.bq is not None else b.astype(np.float32)).reshape(-1)
    return out


def write_params(proto: Any, spec: TailSpec, params: dict[str, np.ndarray], *,
                 calib_features: np.ndarray | None = None) -> Any:
    """A copy of ``proto`` with the tail's weights replaced by ``params`` (as :func:`read_params`
    gives them; the last layer may have more rows: the output grows). In an int8 model the
    weights, biases and the activation QDQ after each layer are re-quantized, the activation
    ranges measured on ``calib_features`` (required then). The graph structure is unchanged.

    >>> from edgekiln.testing.tiny import tiny_head_onnx
    >>> import onnx, tempfile
    >>> proto = onnx.load(tiny_head_onnx(tempfile.mkdtemp() + "/m.onnx"))
    >>> spec = find_tail(proto)
    >>> p = read_params(proto, spec)
    >>> w, b = spec.layers[-1].weight, spec.layers[-1].bias
    >>> grown = write_params(proto, spec, {w: np.vstack([p[w], p[w][:2]]), b: np.r_[p[b], p[b][:2]]})
    >>> grown.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    10
    """
    import onnx

    missing = [n for d in spec.layers for n in (d.weight, d.bias) if n not in params]
    if missing:
        raise EdgekilnError(f"write_params: no values for {', '.join(missing)}")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = GraphIndex(out)
    values = [(np.asarray(params[d.weight], np.float32), np.asarray(params[d.bias], np.float32).reshape(-1))
              for d in spec.layers]
    for d, (w, b), nxt in zip(spec.layers, values, [*spec.layers[1:], None], strict=True):
        if w.ndim != 2 or w.shape[0] != b.size or w.shape[1] != d.in_dim:
            raise EdgekilnError(f"write_params: {d.node} needs a weight [out, {d.in_dim}] and a bias [out], "
                                f"not {list(w.shape)} and {list(b.shape)}")
        if nxt is not None and w.shape[0] != d.out_dim:
            raise EdgekilnError(f"write_params: only the last layer may grow; {d.node} has {w.shape[0]} rows, "
                                f"not {d.out_dim}")
    # NOTE: a compacted int8 file shares equal initializers between layers: what the tail
    # changes is written in place only where the tail alone reads it (InitWriter).
    used_before = {x for n in g.graph.node for x in n.input}
    w_ = InitWriter(g)
    tail = _tail_nodes(g, spec.cut)
    if not spec.quantized:
        for d, (w, b) in zip(spec.layers, values, strict=True):
            _set(w_, tail, d.weight, w if d.transposed else np.ascontiguousarray(w.T))
            _set(w_, tail, d.bias, b.reshape(_shape(g, d.bias, b.size)))
    else:
        if calib_features is None or not len(calib_features):
            raise EdgekilnError("write_params: an int8 tail needs calib_features to re-calibrate its activations")
        _requantize(w_, tail, spec, values, np.asarray(calib_features, np.float32))
    w_.prune(used_before)
    grown = values[-1][0].shape[0]
    if grown != spec.num_classes:
        _grow_output(out, g, spec, grown)
    return out


def quantize_weight(w: np.ndarray, per_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` ``[out, in]``: ``s = max|w| / 127`` per row (or per tensor),
    ``q = clip(round_half_even(w / s), -127, 127)``. An all-zero row gets ``s = 1``.

    # NOTE: ours, ~30 lines, because runtime/ may not import quant/ (docs/architecture.md); the
    # test pins it to an independent formula.

    >>> q, s = quantize_weight(np.array([[0.5, -1.0, 0.25]], np.float32), True)
    >>> q.tolist(), s.tolist()
    ([[64, -127, 32]], [0.007874015718698502])
    """
    amax = np.abs(w).max(axis=1) if per_row else np.abs(w).max(keepdims=True).reshape(())
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    s = scale.reshape(-1, 1) if per_row else scale
    q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
    return q, scale


def quantize_bias(b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 bias ``round_half_even(b / scale)``, saturated to the int32 range."""
    info = np.iinfo(np.int32)
    return np.clip(np.round(b.astype(np.float64) / scale.astype(np.float64)), info.min, info.max).astype(np.int32)


def activation_qparams(lo: float, hi: float, qmin: int = -128, qmax: int = 127) -> tuple[np.float32, int]:
    """Asymmetric ``(scale, zero_point)`` covering ``[min(lo, 0), max(hi, 0)]``, as onnxruntime's
    MinMax calibration gives them: ``scale = (hi - lo) / (qmax - qmin)``,
    ``zp = round(qmin - lo / scale)``; a range of zero width gets scale 1."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / (qmax - qmin)) if hi > lo else np.float32(1.0)
    zp = int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))
    return scale, zp


def _requantize(w_: InitWriter, tail: list[Any], spec: TailSpec, values: list[tuple[np.ndarray, np.ndarray]],
                calib: np.ndarray) -> None:
    from edgekiln.runtime.learner import forward

    g = w_.g
    layers = [(w, b, d.relu_after) for d, (w, b) in zip(spec.layers, values, strict=True)]
    zs = forward(layers, calib)
    in_scale = None if spec.cut_q is None else np.float32(np.asarray(spec.cut_q.scale).reshape(-1)[0])
    cut_dq = g.producer.get(spec.cut)
    in_name = cut_dq.input[1] if cut_dq is not None and cut_dq.op_type == "DequantizeLinear" else ""
    for d, (w, b), z in zip(spec.layers, values, zs, strict=True):
        if d.wq is None:
            _set(w_, tail, d.weight, w if d.transposed else np.ascontiguousarray(w.T))
        else:
            want_axis = 0 if d.transposed else 1
            if np.asarray(d.wq.zero_point).dtype != np.int8:
                raise EdgekilnError(f"{d.node}: its weight is {np.asarray(d.wq.zero_point).dtype}, not int8; learning "
                                    "re-quantizes symmetric int8 weights only")
            per_row = d.wq.axis is not None
            if per_row and d.wq.axis != want_axis:
                raise EdgekilnError(f"{d.node}: its weight is quantized along axis {d.wq.axis}, not per output "
                                    "channel; learning cannot re-quantize it")
            q, scale = quantize_weight(w, per_row)
            wdq = g.producer[d.wq.node_output]
            w_.assign([(wdq, 0)], q if d.transposed else np.ascontiguousarray(q.T), d.weight)
            w_scale = w_.assign([(wdq, 1)], scale, f"{d.node}_w_scale")
            if d.wq.zero_point_name:
                w_.assign([(wdq, 2)], np.zeros(scale.shape, np.asarray(d.wq.zero_point).dtype), f"{d.node}_w_zp")
            if d.bq is not None:
                if in_scale is None:
                    raise EdgekilnError(f"{d.node}: an int32 bias without a quantized input; cannot re-quantize")
                bscale = (in_scale * (scale if per_row else np.full(b.size, scale))).astype(np.float32)
                bdq = g.producer[d.bq.node_output]
                w_.assign([(bdq, 0)], quantize_bias(b, bscale), d.bias)
                w_.assign_bias_scale(bdq, bscale, in_name, w_scale, f"{d.node}_b_scale")
                if d.bq.zero_point_name:
                    w_.assign([(bdq, 2)], np.zeros(bscale.shape, np.int32), f"{d.node}_b_zp")
            elif d.bias in g.inits:
                _set(w_, tail, d.bias, b)
        if d.out_q is not None:
            qmin, qmax = d.out_q.qrange
            lo = 0.0 if d.relu_after else float(z.min(initial=0.0))
            scale_, zp = activation_qparams(lo, float(z.max(initial=0.0)), qmin, qmax)
            qnode = g.producer[d.out_q.node_output]
            nodes = [qnode, *(n for n in g.consumers.get(d.out_q.node_output, []) if n.op_type == "DequantizeLinear")]
            in_name = w_.assign([(n, 1) for n in nodes], np.array(scale_, np.float32), f"{d.node}_out_scale")
            w_.assign([(n, 2) for n in nodes], np.array(zp, np.asarray(d.out_q.zero_point).dtype),
                      f"{d.node}_out_zp")
            in_scale = scale_
        else:
            in_scale, in_name = None, ""


def _tail_nodes(g: GraphIndex, cut: str) -> list[Any]:
    """The nodes downstream of ``cut``: the ones whose inputs the tail may rewrite."""
    seen: dict[int, Any] = {}
    frontier = [cut]
    while frontier:
        for n in g.consumers.get(frontier.pop(), []):
            if id(n) not in seen:
                seen[id(n)] = n
                frontier.extend(n.output)
    return list(seen.values())


def _set(w_: InitWriter, tail: list[Any], name: str, value: np.ndarray) -> None:
    """Write ``value`` for the tail's uses of initializer ``name`` (a float weight or bias)."""
    if name not in w_.g.inits:
        raise EdgekilnError(f"write_params: {name} is not an initializer of the model")
    pairs = [(n, i) for n in tail for i, x in enumerate(n.input) if x == name]
    w_.assign(pairs, value, name)


def _shape(g: GraphIndex, name: str, size: int) -> tuple[int, ...]:
    """The bias's stored shape with its length set to ``size`` (``[N]`` or ``[1, N]``)."""
    dims = tuple(g.inits[name].dims)
    return (1, size) if len(dims) == 2 else (size,)


def _grow_output(out: Any, g: GraphIndex, spec: TailSpec, classes: int) -> None:
    """The last layer now has ``classes`` outputs: set the graph output's static dim and drop
    stale shape annotations of the tensors after it."""
    after: set[str] = set()
    frontier = [o for n in g.graph.node if (n.name or n.output[0]) == spec.layers[-1].node for o in n.output]
    while frontier:
        t = frontier.pop()
        if t in after:
            continue
        after.add(t)
        frontier.extend(o for n in g.consumers.get(t, []) for o in n.output)
    keep = [v for v in out.graph.value_info if v.name not in after]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep)
    for o in out.graph.output:
        dims = o.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[-1].HasField("dim_value"):
            dims[-1].dim_value = classes


def tail_reference(proto: Any, spec: TailSpec, feats: np.ndarray) -> np.ndarray:
    """The tail's output for ``feats`` computed in numpy from the file's own values: dequantized
    weights and biases, and each activation QDQ applied as ``(clip(round(z / s) + zp) - zp) * s``.
    onnxruntime's integer kernels round once more inside, so a file agrees with this within one
    step of its output scale (the health check of an adapted int8 bundle uses that)."""
    params = read_params(proto, spec)
    h = np.asarray(feats, np.float32)
    for d in spec.layers:
        z = h @ params[d.weight].T + params[d.bias]
        if d.relu_after:
            z = np.maximum(z, 0)
        if d.out_q is not None:
            s = np.float32(np.asarray(d.out_q.scale).reshape(-1)[0])
            zp = int(np.asarray(d.out_q.zero_point).reshape(-1)[0])
            qmin, qmax = d.out_q.qrange
            z = ((np.clip(np.round(z / s) + zp, qmin, qmax) - zp) * s).astype(np.float32)
        h = z
    return h
