"""Place each part of a model on the compute unit that runs it best: an exact DP over contiguous segments.

Pure Python, no ONNX (the graph comes from :mod:`edgekiln.targets.place_graph`). A segment is an interval
``[i, j)`` of the graph's topological order placed on one unit, which must support every node in it. Every
tensor crossing a segment boundary lands in host memory (how a chain of sessions, ORT execution providers
and TFLite delegates hand over), so a segment's cost depends only on ``(i, j, unit)``:

    cost(i, j, u) = sum(node_cost) + launch(u) + [u has a link] * (link.latency + (in_bytes + out_bytes) / link rate)

``in_bytes`` are the tensors produced before ``i`` (or graph inputs) and read in ``[i, j)``; ``out_bytes``
the tensors produced in ``[i, j)`` and read at or after ``j`` (or graph outputs). Then

    best[j] = min over i < j, u of best[i] + cost(i, j, u)

is exact over every contiguous segmentation of that order (not over every partition of the DAG: docs/targets.md).
A unit with ``max_segments`` adds its segment count to the DP state. Graphs over ``max_exact_nodes`` nodes
are cut only where a single tensor is live. ``objective="energy"`` minimises energy and refuses units
without energy figures (never invented, as fit.py).

>>> from edgekiln.targets.compute_units import ComputeUnit, Link
>>> def unit(name, peak, ops=None, link=None):
...     return ComputeUnit(name=name, type="cpu", precisions=("int8",), peak_macs_per_s={"int8": peak},
...                        efficiency=1.0, memory_bandwidth_bytes_per_s=1e12, ops=ops, link=link)
>>> units = (unit("cpu", 1e9), unit("npu", 1e12, frozenset({"Conv"}), Link(bandwidth_bytes_per_s=1e9, latency_us=10)))
>>> chain = [PNode(f"n{k}", op, (f"t{k}",), (f"t{k + 1}",), 10**6, "", 0) for k, op in enumerate(["Conv", "Erf", "Conv"])]
>>> graph = PGraph(tuple(chain), {f"t{k}": 1000 for k in range(4)}, ("t0",), ("t3",), "int8")
>>> [(s.unit, s.nodes) for s in place(graph, units).segments]
[('npu', ('n0',)), ('cpu', ('n1',)), ('npu', ('n2',))]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.targets.compute_units import ComputeUnit

OBJECTIVES = ("latency", "energy")
MAX_EXACT_NODES = 300
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
CostFn = Callable[[int, int, ComputeUnit], "float | None"]


@dataclass(frozen=True)
class PNode:
    name: str
    op: str                                       # the main op of the (coarsened) node
    inputs: tuple[str, ...]                       # activation tensors read (no weights)
    outputs: tuple[str, ...]
    macs: int
    kind: str                                     # kernel kind (kernel_kinds) or "" / "model"
    weight_bytes: int
    ops: tuple[str, ...] = ()                     # every op type folded into this node (default: (op,))
    members: tuple[str, ...] = ()                 # names of the ONNX nodes folded into it
    precision: str | None = None                  # None: the graph's
    attrs: Mapping[str, Any] = field(default_factory=dict)  # the main op's limits-relevant attributes

    def all_ops(self) -> tuple[str, ...]:
        return self.ops or (self.op,)


@dataclass(frozen=True)
class PGraph:
    nodes: tuple[PNode, ...]                      # topological order
    tensor_bytes: Mapping[str, int]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    precision: str = "fp32"
    tensor_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    index: int
    unit: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    macs: int
    compute_ms: float
    launch_ms: float
    transfer_ms: float
    transfer_in_bytes: int
    transfer_out_bytes: int
    energy_mj: float | None
    source: str                                   # estimate | measured | simulated
    start: int = 0                                # [start, stop) in the graph's node order
    stop: int = 0
    runtime: str | None = None

    @property
    def est_ms(self) -> float:
        return self.compute_ms + self.launch_ms + self.transfer_ms


@dataclass(frozen=True)
class Fallback:
    node: str                                     # "" when the unit runs none of the model's nodes
    op: str
    unit: str
    reason: str


@dataclass(frozen=True)
class Placement:
    target: str
    objective: str
    segments: tuple[Segment, ...]
    fallback: tuple[Fallback, ...]
    total_ms: float
    total_energy_mj: float | None
    single_unit: Mapping[str, float | str]        # unit -> whole graph on it (ms, or mJ for energy), or why not
    gain: float | None                            # 1 - total / best single unit, in the objective; None: no unit runs all

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"target": self.target, "objective": self.objective,
                "segments": [{**asdict(s), "est_ms": s.est_ms} for s in self.segments],
                "fallback": [asdict(f) for f in self.fallback], "total_ms": self.total_ms,
                "total_energy_mj": self.total_energy_mj, "single_unit": dict(self.single_unit), "gain": self.gain}


# ---- support and per-node cost ---------------------------------------------------------------------------

def _nonunit(shape: Sequence[int]) -> int:
    return sum(1 for d in shape if d != 1)


def support(unit: ComputeUnit, node: PNode, graph: PGraph) -> str | None:
    """None when ``unit`` runs ``node``, else why not ("Erf not in the Edge TPU op list")."""
    if unit.ops is not None and not unit.ops:
        return "supports no op"
    precision = node.precision or graph.precision
    if precision not in unit.precisions:
        return f"{node.op} is {precision} ({unit.name} runs {', '.join(unit.precisions)} only)"
    for op in node.all_ops():
        if op in _QDQ and op != node.op:
            continue                              # Q/DQ around an int8 op are part of the integer kernel
        if not unit.runs(op):
            return f"{op} not in {unit.ops_name or unit.name + chr(39) + 's op list'}"
    return _limits(unit, node, graph)


def _limits(unit: ComputeUnit, node: PNode, graph: PGraph) -> str | None:  # noqa: C901
    lim, shapes = unit.limits, graph.tensor_shapes
    tensors = [t for t in (*node.inputs, *node.outputs)]
    if lim.static_shapes and any(t not in shapes or any(d <= 0 for d in shapes[t]) for t in tensors):
        return f"{node.op} has a dynamic shape ({unit.name}: static shapes only)"
    if lim.max_nonunit_dims is not None:
        for t in tensors:
            if t in shapes and _nonunit(shapes[t]) > lim.max_nonunit_dims:
                return (f"{node.op} tensor {t} {list(shapes[t])} has {_nonunit(shapes[t])} dims > 1 "
                        f"({unit.name}: at most {lim.max_nonunit_dims})")
    x = shapes.get(node.inputs[0]) if node.inputs else None
    if node.op == "Softmax" and x is not None:
        if lim.softmax_max_rank is not None and _nonunit(x) > lim.softmax_max_rank:
            return f"Softmax input {_nonunit(x)}-D ({unit.name}: {lim.softmax_max_rank}-D only)"
        if lim.softmax_max_elements is not None and math.prod(x) > lim.softmax_max_elements:
            return f"Softmax input {math.prod(x)} elements ({unit.name}: at most {lim.softmax_max_elements})"
    if node.op.startswith("Reduce") and lim.reduce_axes == "spatial" and x is not None:
        axes = node.attrs.get("axes")
        rank = len(x)
        norm = sorted({a % rank for a in axes}) if axes is not None else list(range(rank))
        if any(a < 2 for a in norm if x[a] != 1):
            return f"{node.op} over axes {norm} ({unit.name}: x/y only)"
    if node.op == "Pad" and lim.pad_axes == "spatial" and x is not None:
        pads = node.attrs.get("pads")
        rank = len(x)
        if pads is None or any(pads[a] or pads[a + rank] for a in range(min(2, rank))):
            return f"Pad over non-spatial axes ({unit.name}: x/y only)"
    if lim.matmul_const_weight and node.op in ("MatMul", "Gemm") and node.attrs.get("weight_constant") is False:
        return f"{node.op} of two activations ({unit.name}: FullyConnected with a constant weight only)"
    kernel = node.attrs.get("kernel_shape")
    if lim.max_kernel is not None and kernel and max(kernel) > lim.max_kernel:
        return f"{node.op} kernel {list(kernel)} ({unit.name}: at most {lim.max_kernel})"
    return None


def node_bytes(node: PNode, graph: PGraph) -> int:
    tb = graph.tensor_bytes
    return node.weight_bytes + sum(tb.get(t, 0) for t in node.inputs) + sum(tb.get(t, 0) for t in node.outputs)


def node_cost(unit: ComputeUnit, node: PNode, graph: PGraph) -> tuple[float, float | None]:
    """(seconds, picojoules or None): fit.py's roofline per node, ``max(MACs / (peak * eff), bytes / bw)``."""
    precision = node.precision or graph.precision
    peak = unit.peak_macs_per_s.get(precision) or max(unit.peak_macs_per_s.values())
    moved = node_bytes(node, graph)
    seconds = max(node.macs / (peak * unit.efficiency), moved / unit.memory_bandwidth_bytes_per_s)
    pj_mac = unit.energy_pj_per_mac.get(precision)
    energy = None if pj_mac is None else node.macs * pj_mac + moved * (unit.energy_pj_per_byte or 0.0)
    return seconds, energy


# ---- segments ------------------------------------------------------------------------------------------

class _Table:
    """Per-(i, j, unit) segment figures, computed on demand from prefix sums and incremental byte counts."""

    def __init__(self, graph: PGraph, units: Sequence[ComputeUnit], objective: str, cost: CostFn | None) -> None:
        self.g, self.units, self.objective, self.cost = graph, list(units), objective, cost
        n = len(graph.nodes)
        producer = {t: k for k, nd in enumerate(graph.nodes) for t in nd.outputs}
        self.producer = producer
        last = {t: -1 for t in producer}
        for k, nd in enumerate(graph.nodes):
            for t in nd.inputs:
                last[t] = max(last.get(t, -1), k)
        for t in graph.graph_outputs:
            last[t] = n                           # a graph output is read "after the end"
        self.last = last
        # first reject per (unit, node): support reasons
        self.ok = [[support(u, nd, graph) is None for nd in graph.nodes] for u in units]
        self.sec = [[0.0] * (n + 1) for _ in units]
        self.pj: list[list[float] | None] = []
        for ui, u in enumerate(units):
            pj: list[float] | None = [0.0] * (n + 1)
            for k, nd in enumerate(graph.nodes):
                s, e = node_cost(u, nd, graph)
                self.sec[ui][k + 1] = self.sec[ui][k] + s
                if pj is not None:
                    pj = None if e is None else pj
                if pj is not None and e is not None:
                    pj[k + 1] = pj[k] + e
            self.pj.append(pj)
        self.macs = [0] * (n + 1)
        for k, nd in enumerate(graph.nodes):
            self.macs[k + 1] = self.macs[k] + nd.macs
        # first unsupported index at or after i, per unit
        self.next_bad = []
        for ui in range(len(units)):
            nb = [n] * (n + 1)
            for k in range(n - 1, -1, -1):
                nb[k] = k if not self.ok[ui][k] else nb[k + 1]
            self.next_bad.append(nb)

    def io(self, i: int, j: int) -> tuple[list[str], list[str]]:
        """Tensors entering [i, j) from outside and leaving it for later nodes or the graph's outputs."""
        ins: dict[str, None] = {}
        for nd in self.g.nodes[i:j]:
            for t in nd.inputs:
                if not (i <= self.producer.get(t, -1) < j):
                    ins.setdefault(t)
        outs = [t for nd in self.g.nodes[i:j] for t in nd.outputs if self.last.get(t, -1) >= j]
        return list(ins), outs

    def io_bytes_row(self, i: int, stop: int) -> list[tuple[int, int]]:
        """(in_bytes, out_bytes) of [i, j) for j = i+1 .. stop, incrementally."""
        tb = self.g.tensor_bytes
        seen: set[str] = set()
        in_b, out_b, rows = 0, 0, []
        expire: dict[int, int] = {}
        for k in range(i, stop):
            nd = self.g.nodes[k]
            for t in nd.inputs:
                if t not in seen and not (i <= self.producer.get(t, -1) < k + 1):
                    seen.add(t)
                    in_b += tb.get(t, 0)
            for t in nd.outputs:
                lu = self.last.get(t, -1)
                if lu > k:
                    out_b += tb.get(t, 0)
                    expire[lu + 1] = expire.get(lu + 1, 0) + tb.get(t, 0)
            out_b -= expire.pop(k + 1, 0)          # tensors whose last reader is node k are internal now
            rows.append((in_b, out_b))
        return rows

    def figures(self, i: int, j: int, ui: int, in_b: int, out_b: int) -> tuple[float, float, float, float | None] | None:
        """(compute_s, launch_s, transfer_s, energy_pj) of [i, j) on unit ui, or None when it cannot run it."""
        if self.next_bad[ui][i] < j:
            return None
        u = self.units[ui]
        launch = u.launch_overhead_us * 1e-6
        transfer = 0.0 if u.link is None else u.link.latency_us * 1e-6 + u.link.transfer_s(in_b + out_b)
        if self.cost is not None:
            c = self.cost(i, j, u)
            if c is None:
                return None
            return c / 1e3, 0.0, 0.0, None
        compute = self.sec[ui][j] - self.sec[ui][i]
        pj = self.pj[ui]
        link_pj = 0.0 if u.link is None else (in_b + out_b) * (u.energy_pj_per_byte or 0.0)
        energy = None if pj is None else pj[j] - pj[i] + link_pj
        return compute, launch, transfer, energy

    def value(self, fig: tuple[float, float, float, float | None]) -> float:
        if self.objective == "energy":
            return fig[3] if fig[3] is not None else math.inf
        return fig[0] + fig[1] + fig[2]


def _check(graph: PGraph, units: Sequence[ComputeUnit], objective: str) -> None:
    if objective not in OBJECTIVES:
        raise EdgekilnError(f"objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
    if not units:
        raise EdgekilnError("placement needs at least one compute unit")
    if objective == "energy":
        precisions = {nd.precision or graph.precision for nd in graph.nodes} or {graph.precision}
        missing = [u.name for u in units if any(p in u.precisions and not u.has_energy(p) for p in precisions)]
        if missing:
            raise EdgekilnError(f"unknown energy for unit(s) {', '.join(missing)} "
                                f"({'/'.join(sorted(precisions))}): the profile has no energy_pj_per_mac, and "
                                "edgekiln does not invent one; add it to the profile or use --objective latency")


def _cut_points(graph: PGraph, table: _Table, max_exact_nodes: int) -> list[int]:
    """Where segments may start/end: everywhere, or only where one tensor is live on big graphs."""
    n = len(graph.nodes)
    if n <= max_exact_nodes:
        return list(range(n + 1))
    cuts = [0]
    for k in range(1, n):
        live = {t for t, p in table.producer.items() if p < k and table.last.get(t, -1) >= k}
        live |= {t for t in graph.graph_inputs if any(t in nd.inputs for nd in graph.nodes[k:])}
        if len(live) == 1:
            cuts.append(k)
    return [*cuts, n]


def place(graph: PGraph, units: Sequence[ComputeUnit], *, objective: str = "latency", cost: CostFn | None = None,
          target: str = "", max_exact_nodes: int = MAX_EXACT_NODES) -> Placement:
    """The best contiguous segmentation of ``graph``'s node order over ``units`` (module doc).

    ``cost(i, j, unit) -> ms | None`` replaces the roofline for a segment (measured block costs); None
    forbids it. Raises EdgekilnError naming the node when no unit runs some node.
    """
    _check(graph, units, objective)
    if cost is not None and objective != "latency":
        raise EdgekilnError("a cost function gives milliseconds: it plans for objective 'latency' only")
    n = len(graph.nodes)
    table = _Table(graph, units, objective, cost)
    if n == 0:
        return Placement(target, objective, (), (), 0.0, 0.0, {}, None)
    for k, nd in enumerate(graph.nodes):
        if not any(table.ok[ui][k] for ui in range(len(units))):
            why = "; ".join(f"{u.name}: {support(u, nd, graph)}" for u in units)
            raise EdgekilnError(f"no compute unit runs node {nd.name} ({nd.op}): {why}")
    capped = [ui for ui, u in enumerate(units) if u.max_segments is not None]
    cuts = _cut_points(graph, table, max_exact_nodes)
    # best[j][counts] = (value, i, ui, figures, in_b, out_b, prev counts)
    best: dict[int, dict[tuple[int, ...], tuple[Any, ...]]] = {0: {tuple(0 for _ in capped): (0.0,)}}
    for a, i in enumerate(cuts[:-1]):
        if i not in best:
            continue
        rows = table.io_bytes_row(i, n)
        for j in cuts[a + 1:]:
            in_b, out_b = rows[j - i - 1]
            for ui in range(len(units)):
                fig = table.figures(i, j, ui, in_b, out_b)
                if fig is None:
                    continue
                v = table.value(fig)
                for counts, prev in best[i].items():
                    nc = counts
                    if ui in capped:
                        c = capped.index(ui)
                        if counts[c] + 1 > units[ui].max_segments:  # type: ignore[operator]
                            continue
                        nc = (*counts[:c], counts[c] + 1, *counts[c + 1:])
                    total = prev[0] + v
                    cur = best.setdefault(j, {}).get(nc)
                    if cur is None or total < cur[0]:
                        best[j][nc] = (total, i, ui, fig, in_b, out_b, counts)
    if n not in best or all(math.isinf(v[0]) for v in best[n].values()):
        raise EdgekilnError("no placement satisfies the units' limits (max_segments, op lists)")
    counts = min(best[n], key=lambda c: best[n][c][0])
    spans: list[tuple[int, int, int]] = []
    j = n
    while j > 0:
        _, i, ui, _fig, _ib, _ob, prev = best[j][counts]
        spans.append((i, j, ui))
        j, counts = i, prev
    spans.reverse()
    spans = _merge_same_unit(spans, table)
    return _placement(graph, units, objective, target, table, spans, cost)


def _merge_same_unit(spans: list[tuple[int, int, int]], table: _Table) -> list[tuple[int, int, int]]:
    """Adjacent segments on one unit merge when that costs no more (float ties of the DP)."""
    out: list[tuple[int, int, int]] = []
    for i, j, ui in spans:
        if out and out[-1][2] == ui:
            pi, _pj, _ = out[-1]
            both = [table.figures(a, b, ui, *table.io_bytes_row(a, b)[-1]) for a, b in ((pi, i), (i, j))]
            merged = table.figures(pi, j, ui, *table.io_bytes_row(pi, j)[-1])
            if merged is not None and all(f is not None for f in both) and \
                    table.value(merged) <= sum(table.value(f) for f in both if f is not None) * (1 + 1e-9):
                out[-1] = (pi, j, ui)
                continue
        out.append((i, j, ui))
    return out


def _placement(graph: PGraph, units: Sequence[ComputeUnit], objective: str, target: str, table: _Table,
               spans: list[tuple[int, int, int]], cost: CostFn | None) -> Placement:
    segs = []
    for idx, (i, j, ui) in enumerate(spans):
        in_b, out_b = table.io_bytes_row(i, j)[-1]
        fig = table.figures(i, j, ui, in_b, out_b)
        assert fig is not None
        ins, outs = table.io(i, j)
        u = units[ui]
        segs.append(Segment(idx, u.name, tuple(nd.name for nd in graph.nodes[i:j]), tuple(ins), tuple(outs),
                            table.macs[j] - table.macs[i], fig[0] * 1e3, fig[1] * 1e3, fig[2] * 1e3, in_b, out_b,
                            None if fig[3] is None else fig[3] * 1e-9,
                            "measured" if cost is not None else "estimate", i, j, u.runtime))
    n = len(graph.nodes)
    single: dict[str, float | str] = {}
    for ui, u in enumerate(units):
        bad = table.next_bad[ui][0]
        if bad < n:
            single[u.name] = support(u, graph.nodes[bad], graph) or "not supported"
            continue
        fig = table.figures(0, n, ui, *table.io_bytes_row(0, n)[-1])
        if fig is None:
            single[u.name] = "refused by the cost function"
        elif objective == "energy":
            single[u.name] = (fig[3] or 0.0) * 1e-9
        else:
            single[u.name] = (fig[0] + fig[1] + fig[2]) * 1e3
    total_ms = sum(s.est_ms for s in segs)
    energies = [s.energy_mj for s in segs]
    total_mj = None if any(e is None for e in energies) else sum(e for e in energies if e is not None)
    achieved = total_mj if objective == "energy" else total_ms
    numbers = [v for v in single.values() if isinstance(v, float)]
    gain = None if not numbers or achieved is None or min(numbers) <= 0 else 1.0 - achieved / min(numbers)
    if gain is not None and abs(gain) < 1e-9:
        gain = 0.0                                # the plan is a single unit: float noise of the sums
    return Placement(target, objective, tuple(segs), _fallback(graph, units, table), total_ms, total_mj, single, gain)


def _fallback(graph: PGraph, units: Sequence[ComputeUnit], table: _Table) -> tuple[Fallback, ...]:
    out: list[Fallback] = []
    for ui, u in enumerate(units):
        bad = [k for k, ok in enumerate(table.ok[ui]) if not ok]
        if not bad:
            continue
        if len(bad) == len(graph.nodes):
            reason = support(u, graph.nodes[0], graph) or ""
            if reason != "supports no op":
                reason = f"runs none of the model's {len(bad)} nodes (first: {reason})"
            out.append(Fallback("", "", u.name, reason))
            continue
        out.extend(Fallback(graph.nodes[k].name, graph.nodes[k].op, u.name, support(u, graph.nodes[k], graph) or "")
                   for k in bad)
    return tuple(out)


def brute_force(graph: PGraph, units: Sequence[ComputeUnit], *, objective: str = "latency") -> float:
    """The best objective value (s or pJ) over every cut set x unit assignment: the tests' reference.

    Exponential in the node count. Per cut set, every placement of the capped units (``max_segments``) is
    enumerated and each other segment takes its best uncapped unit (independent once those are fixed).
    Segment bytes come from :meth:`_Table.io` (sets), not the DP's incremental counts.
    """
    _check(graph, units, objective)
    n = len(graph.nodes)
    table = _Table(graph, units, objective, None)
    capped = [ui for ui, u in enumerate(units) if u.max_segments is not None]
    free = [ui for ui in range(len(units)) if ui not in capped]
    memo: dict[tuple[int, int, int], float] = {}

    def value(i: int, j: int, ui: int) -> float:
        if (i, j, ui) not in memo:
            ins, outs = table.io(i, j)
            fig = table.figures(i, j, ui, sum(graph.tensor_bytes.get(t, 0) for t in ins),
                                sum(graph.tensor_bytes.get(t, 0) for t in outs))
            memo[i, j, ui] = math.inf if fig is None else table.value(fig)
        return memo[i, j, ui]

    best = math.inf
    for mask in range(1 << max(n - 1, 0)):
        bounds = [0, *[k + 1 for k in range(n - 1) if mask >> k & 1], n]
        spans = list(itertools.pairwise(bounds))
        rest = [min((value(i, j, ui) for ui in free), default=math.inf) for i, j in spans]
        for assign in itertools.product([None, *capped], repeat=len(spans)):
            if any(assign.count(ui) > (units[ui].max_segments or 0) for ui in capped):
                continue
            total = sum(rest[k] if a is None else value(i, j, a) for k, ((i, j), a) in enumerate(zip(spans, assign,
                                                                                                    strict=True)))
            best = min(best, total)
    return best
