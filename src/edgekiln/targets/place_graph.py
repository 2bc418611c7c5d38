"""An ONNX model as the placement planner's graph: coarse nodes in topological order, tensor sizes, shapes.

Coarsening (so that a cut falls only at a tensor a real deployment hands over):

- constant nodes (``Constant``, weight ``DequantizeLinear`` and anything computed from initializers only)
  are weights, not nodes: their bytes count for the nodes reading them, and the segment extractor pulls
  them into every segment that needs them;
- a ``QuantizeLinear`` joins the node producing its input, so an int8 tensor is cut after the Q (as measured
  on the host, plan24); a graph input's Q joins its consumer;
- a ``DequantizeLinear`` joins its consumer; one read by several nodes is folded into each of them (they read
  the int8 tensor; the segment extractor copies the DQ into each segment); a DQ making a graph output stays a
  node (the deployed model's Dequantize op, which e.g. the Edge TPU does not run);
- an activation (Relu, Clip, Sigmoid, HardSwish, ...) joins the node producing its input.

A merge happens only when the merged group is the other's sole predecessor or sole successor, so the coarse
graph stays acyclic. A QDQ MobileNet shrinks about 4x (57 ONNX nodes to 13).

>>> import tempfile
>>> from edgekiln.testing.tiny import tiny_conv_onnx
>>> g = place_graph(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"))
>>> [(n.ops, n.macs) for n in g.nodes]
[(('Conv', 'Relu'), 1296), (('Flatten',), 0), (('Gemm',), 1440)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgekiln.targets.kernel_kinds import kernel_kind
from edgekiln.targets.placement import PGraph, PNode, support

__all__ = ["ACTIVATIONS", "place_graph", "support"]   # support: the plan's interface names it here too

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
ACTIVATIONS = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Elu", "Selu",
                         "Softplus", "PRelu", "Swish"})
_PASS = frozenset({_Q, _DQ}) | ACTIVATIONS
_FC = frozenset({"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"})
_PRECISION_BYTES = {"int8": 1, "fp16": 2, "fp32": 4}


class _Groups:
    """Union-find over node indices with the acyclicity check on the quotient graph."""

    def __init__(self, n: int, preds: list[set[int]], succs: list[set[int]]) -> None:
        self.parent = list(range(n))
        self.preds, self.succs = preds, succs
        self.members: dict[int, list[int]] = {k: [k] for k in range(n)}

    def find(self, k: int) -> int:
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def _ext(self, g: int, edges: list[set[int]]) -> set[int]:
        return {self.find(x) for m in self.members[g] for x in edges[m]} - {g}

    def merge(self, a: int, b: int) -> bool:
        """Merge the groups of nodes a and b when one is the other's sole predecessor or sole successor."""
        ga, gb = self.find(a), self.find(b)
        if ga == gb:
            return True
        ok = any(self._ext(x, self.preds) == {y} or self._ext(y, self.succs) == {x} for x, y in ((gb, ga), (ga, gb)))
        if not ok:
            return False
        keep, drop = (ga, gb) if ga < gb else (gb, ga)
        self.parent[drop] = keep
        self.members[keep] += self.members.pop(drop)
        return True


def place_graph(model: str | Path | Any, input_shapes: Mapping[str, Sequence[int]] | None = None,
                precision: str | None = None) -> PGraph:
    """The coarse graph of ``model`` (a path or ModelProto) for :func:`edgekiln.targets.placement.place`.

    ``precision`` is what the model runs at (None: int8 for a model with QuantizeLinear, else fp32); float
    tensors of a float model are sized at it (a QDQ model keeps its stored dtypes).
    """
    from edgekiln.models.analysis import analyze, tensor_nbytes
    from edgekiln.models.intake import load_onnx

    proto = load_onnx(model) if isinstance(model, (str, Path)) else model
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    info = analyze(proto, dict(input_shapes or {}))   # MACs per node; fixes the input shapes (batch -> 1)
    shapes, types = info.value_shapes, info.value_types
    quantized = any(n.op_type == _Q for n in graph.node)
    precision = precision or ("int8" if quantized else "fp32")
    nodes = list(graph.node)

    constant: set[str] = set(inits)
    const_nodes: set[int] = set()
    reads = [_reads(nd) for nd in nodes]      # inputs, and outer-scope values an If/Loop/Scan body reads
    for k, nd in enumerate(nodes):
        if all(x in constant for x in reads[k]):
            const_nodes.add(k)
            constant.update(o for o in nd.output if o)
    weight_of: dict[str, int] = {}              # constant tensor -> bytes of the initializers behind it
    for name, t in inits.items():
        weight_of[name] = tensor_nbytes(t.data_type, math.prod(t.dims))
    for k in sorted(const_nodes):
        nd = nodes[k]
        behind = sum(weight_of.get(x, 0) for x in nd.input if x)
        if nd.op_type == "Constant":
            behind = sum(tensor_nbytes(a.t.data_type, math.prod(a.t.dims)) for a in nd.attribute if a.name == "value")
        for o in nd.output:
            weight_of[o] = behind

    out_names = {o.name for o in graph.output}
    raw_readers: dict[str, set[int]] = {}
    for k in range(len(nodes)):
        for x in reads[k]:
            if x not in constant:
                raw_readers.setdefault(x, set()).add(k)
    # A DQ read by several nodes is folded into each of them (the segment extractor copies it into every
    # segment that needs it), so they all read the int8 tensor and a cut there moves int8 bytes.
    alias: dict[str, str] = {}
    folded_into: dict[int, list[int]] = {}
    for k, nd in enumerate(nodes):
        if k not in const_nodes and nd.op_type == _DQ and len(raw_readers.get(nd.output[0], ())) > 1 and \
                nd.output[0] not in out_names:
            alias[nd.output[0]] = nd.input[0]
            const_nodes.add(k)                    # not a node of its own any more
            for c in raw_readers[nd.output[0]]:
                folded_into.setdefault(c, []).append(k)

    def act_in(k: int) -> list[str]:
        return list(dict.fromkeys(alias.get(x, x) for x in reads[k] if x not in constant))

    producer = {o: k for k, nd in enumerate(nodes) if k not in const_nodes for o in nd.output if o}
    consumers: dict[str, list[int]] = {}
    for k in range(len(nodes)):
        if k in const_nodes:
            continue
        for x in act_in(k):
            consumers.setdefault(x, []).append(k)
    n = len(nodes)
    preds: list[set[int]] = [set() for _ in range(n)]
    succs: list[set[int]] = [set() for _ in range(n)]
    for t, ks in consumers.items():
        if t in producer:
            for k in ks:
                preds[k].add(producer[t])
                succs[producer[t]].add(k)
    groups = _Groups(n, preds, succs)
    live = [k for k in range(n) if k not in const_nodes]
    for k in live:                               # Q joins its producer; a graph input's Q its single consumer
        if nodes[k].op_type == _Q:
            src = act_in(k)
            if src and src[0] in producer:
                groups.merge(producer[src[0]], k)
            elif len(consumers.get(nodes[k].output[0], [])) == 1:
                groups.merge(k, consumers[nodes[k].output[0]][0])
    for k in live:                               # DQ joins its single consumer (a graph output's DQ stays:
        if nodes[k].op_type == _DQ:               # it is the deployed model's Dequantize op)
            readers = set(consumers.get(nodes[k].output[0], []))
            if len(readers) == 1:
                groups.merge(k, readers.pop())
    for k in live:                               # an activation joins its input's producer
        src = act_in(k)
        if nodes[k].op_type in ACTIVATIONS and len(src) == 1 and src[0] in producer:
            groups.merge(producer[src[0]], k)

    layers = info.layers

    def tensor_bytes(t: str) -> int:
        shape = shapes.get(t)
        if shape is None:
            return 0
        elem = types.get(t, 1)
        if not quantized and elem in (1, 10, 11, 16):
            return _PRECISION_BYTES.get(precision, 4) * math.prod(shape)
        return tensor_nbytes(elem, math.prod(shape))

    roots = sorted({groups.find(k) for k in live}, key=lambda g: min(groups.members[g]))
    group_of = {m: g for g in roots for m in groups.members[g]}
    order = _topo(roots, group_of, preds)
    pnodes: list[PNode] = []
    tb: dict[str, int] = {}
    for g in order:
        mset = set(groups.members[g])
        ms = sorted(mset | {d for m in mset for d in folded_into.get(m, [])})
        main = next((m for m in ms if nodes[m].op_type not in _PASS), ms[0])
        ins = list(dict.fromkeys(x for m in mset for x in act_in(m) if producer.get(x, -1) not in mset))
        outs = [o for m in sorted(mset) for o in nodes[m].output
                if o and (o in out_names or any(c not in mset for c in consumers.get(o, [])))]
        wb = sum(weight_of.get(x, 0) for m in ms for x in dict.fromkeys(nodes[m].input) if x in constant)
        has_q = any(nodes[m].op_type in (_Q, _DQ) for m in ms)
        node_prec = None if not quantized or has_q else "fp32"
        for t in (*ins, *outs):
            tb[t] = tensor_bytes(t)
        pnodes.append(PNode(
            name=nodes[main].name or f"{nodes[main].op_type}_{main}", op=nodes[main].op_type, inputs=tuple(ins),
            outputs=tuple(outs), macs=sum(int(layers[m].macs) for m in ms), kind=_kind(nodes[main], shapes, inits, nodes),
            weight_bytes=wb, ops=tuple(dict.fromkeys(nodes[m].op_type for m in ms)),
            members=tuple(nodes[m].name or f"{nodes[m].op_type}_{m}" for m in ms), precision=node_prec,
            attrs=_attrs(nodes[main], inits, shapes, constant)))
    gin = tuple(i.name for i in inputs)
    for t in gin:
        tb.setdefault(t, tensor_bytes(t))
    return PGraph(tuple(pnodes), tb, gin, tuple(o.name for o in graph.output), precision,
                  {t: tuple(shapes[t]) for t in tb if t in shapes})


def _reads(node: Any) -> list[str]:
    """The values a node reads: its inputs and what its subgraphs read from the outer scope."""
    from edgekiln.execution.ort import node_subgraphs

    out = [x for x in node.input if x]
    for g in node_subgraphs(node):
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for sub in g.node:
            out += [x for x in _reads(sub) if x not in defined]
            defined.update(sub.output)
    return list(dict.fromkeys(out))


def _topo(roots: list[int], group_of: Mapping[int, int], preds: list[set[int]]) -> list[int]:
    """Groups in a topological order, ties broken by their first member's position (stable)."""
    import heapq

    gpreds = {g: set() for g in roots}  # type: dict[int, set[int]]
    for m, g in group_of.items():
        gpreds[g] |= {group_of[p] for p in preds[m] if p in group_of and group_of[p] != g}
    indeg = {g: len(p) for g, p in gpreds.items()}
    gsuccs: dict[int, list[int]] = {g: [] for g in roots}
    for g, ps in gpreds.items():
        for p in ps:
            gsuccs[p].append(g)
    heap = [g for g in roots if indeg[g] == 0]
    heapq.heapify(heap)
    out: list[int] = []
    while heap:
        g = heapq.heappop(heap)
        out.append(g)
        for s in gsuccs[g]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, s)
    assert len(out) == len(roots), "coarse graph has a cycle"  # merges keep it acyclic (_Groups.merge)
    return out


def _weight_dims(name: str, inits: Mapping[str, Any], nodes: list[Any]) -> tuple[int, ...] | None:
    if name in inits:
        return tuple(inits[name].dims)
    for nd in nodes:                                # weight behind a constant DequantizeLinear
        if name in nd.output and nd.op_type == _DQ and nd.input[0] in inits:
            return tuple(inits[nd.input[0]].dims)
    return None


def _kind(node: Any, shapes: Mapping[str, Any], inits: Mapping[str, Any], nodes: list[Any]) -> str:
    if node.op_type in _FC:
        return "fc"
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        dims = _weight_dims(node.input[1], inits, nodes)
        if dims is None or len(dims) < 3 or node.op_type == "ConvTranspose":
            return "conv"
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        return kernel_kind(groups=groups, cin_per_group=dims[1], k_h=dims[2], k_w=math.prod(dims[3:]))
    if node.op_type in ("Add", "Sub") and len(node.input) == 2 and shapes.get(node.input[0]) is not None and \
            shapes.get(node.input[0]) == shapes.get(node.input[1]):
        return "add"
    return "model"


def _attrs(node: Any, inits: Mapping[str, Any], shapes: Mapping[str, Any], constant: set[str]) -> dict[str, Any]:
    """The main op's attributes the unit limits read: axes (Reduce*), pads (Pad), kernel_shape (conv, pools)."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out: dict[str, Any] = {}

    def const(pos: int) -> list[int] | None:
        if len(node.input) > pos and node.input[pos] in inits:
            return [int(v) for v in numpy_helper.to_array(inits[node.input[pos]]).ravel()]
        return None

    if node.op_type.startswith("Reduce"):
        axes = attrs.get("axes") or const(1)
        out["axes"] = None if axes is None else tuple(int(a) for a in axes)
    if node.op_type == "Pad":
        pads = attrs.get("pads") or const(1)
        out["pads"] = None if pads is None else tuple(int(p) for p in pads)
    if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
        out["weight_constant"] = node.input[1] in constant
    if "kernel_shape" in attrs:
        out["kernel_shape"] = tuple(int(k) for k in attrs["kernel_shape"])
    elif node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and shapes.get(node.input[1]):
        out["kernel_shape"] = tuple(int(k) for k in shapes[node.input[1]][2:])
    return out
