"""Split computing: where to cut a model between the device and a server.

The model is a DAG of nodes. A split puts a *prefix* of it on the device (every node whose
inputs all come from the device side) and the rest on the server; the tensors crossing the cut
are sent over the network. For a fixed split, end-to-end latency is

    sum(device node latency) + RTT + bytes(cut tensors) / bandwidth + sum(server node latency)
    + bytes(outputs computed on the server) / bandwidth

(no RTT when everything stays on the device). Minimizing over all valid splits of a DAG —
not only the cut points of a chain — is a minimum s-t cut (as DADS showed): source = device,
sink = server, a node's device time on its sink edge, its server time on its source edge, one
auxiliary node per tensor so a tensor read by several server nodes is paid once, and infinite
reverse edges that forbid data flowing from the server back to the device.

For a fixed split the latency is linear in 1/bandwidth, so the best split changes only at a few
bandwidths: :func:`breakpoints` precomputes them and :meth:`SplitTable.lookup` re-plans at run
time with a table lookup.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

INF = float("inf")


@dataclass(frozen=True)
class Node:
    name: str
    inputs: tuple[str, ...]           # tensor names
    outputs: tuple[str, ...]
    device_ms: float
    server_ms: float


@dataclass(frozen=True)
class SplitGraph:
    nodes: tuple[Node, ...]
    tensor_bytes: Mapping[str, int]   # bytes sent if the tensor crosses the network
    graph_inputs: tuple[str, ...]     # produced on the device (the sensor data)
    graph_outputs: tuple[str, ...]    # needed back on the device
    device_call_ms: float = 0.0       # fixed cost of one session call on the device (paid if it runs anything)
    server_call_ms: float = 0.0       # the same on the server


@dataclass(frozen=True)
class Split:
    device_nodes: frozenset[str]
    sent: tuple[str, ...]             # tensors sent device -> server
    returned: tuple[str, ...]         # outputs sent server -> device
    latency_ms: float
    parts: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        if not self.sent and not self.returned:
            return "all-device"
        return "cut at " + ", ".join(self.sent) if self.device_nodes else "all-server"


def evaluate(graph: SplitGraph, device_nodes: frozenset[str], *, bandwidth_bps: float, rtt_ms: float) -> Split:
    """Latency of one split (which must be valid: no server -> device data flow)."""
    producer = {t: n.name for n in graph.nodes for t in n.outputs}
    for t in graph.graph_inputs:
        producer[t] = "<input>"
    on_device = set(device_nodes) | {"<input>"}
    sent, back = set(), set()
    for n in graph.nodes:
        for t in n.inputs:
            src = producer.get(t)
            if src is None:
                continue  # a weight / constant
            if n.name in on_device and src not in on_device:
                raise ValueError(f"invalid split: {n.name} on the device reads {t} from the server")
            if n.name not in on_device and src in on_device:
                sent.add(t)
    for t in graph.graph_outputs:
        if producer.get(t) not in on_device:
            back.add(t)
    dev = sum(n.device_ms for n in graph.nodes if n.name in on_device)
    srv = sum(n.server_ms for n in graph.nodes if n.name not in on_device)
    tx = sum(graph.tensor_bytes.get(t, 0) for t in sent | back) * 8.0 / bandwidth_bps * 1000.0
    remote = bool(sent or back or len(on_device) - 1 < len(graph.nodes))
    rtt = rtt_ms if remote else 0.0
    if len(on_device) > 1:
        dev += graph.device_call_ms
    if remote:
        srv += graph.server_call_ms
    return Split(frozenset(device_nodes), tuple(sorted(sent)), tuple(sorted(back)), dev + srv + tx + rtt,
                 {"device_ms": dev, "server_ms": srv, "transfer_ms": tx, "rtt_ms": rtt})


def plan(graph: SplitGraph, *, bandwidth_bps: float, rtt_ms: float) -> Split:
    """The split minimizing end-to-end latency (exact, by minimum cut).

    The per-call costs are left out of the cut: every split with nodes on both sides pays both,
    so the cut's best such split stays the best; it is then compared with all-device and
    all-server, which pay one call each."""
    kw = {"bandwidth_bps": bandwidth_bps, "rtt_ms": rtt_ms}
    candidates = [evaluate(graph, frozenset(n.name for n in graph.nodes), **kw), evaluate(graph, frozenset(), **kw)]
    device_nodes = _min_cut(graph, bandwidth_bps)
    if 0 < len(device_nodes) < len(graph.nodes):
        candidates.append(evaluate(graph, device_nodes, **kw))
    return min(candidates, key=lambda c: c.latency_ms)


def _min_cut(graph: SplitGraph, bandwidth_bps: float) -> frozenset[str]:
    ms_per_byte = 8.0 / bandwidth_bps * 1000.0
    index: dict[str, int] = {"<s>": 0, "<t>": 1, "<input>": 2}
    for n in graph.nodes:
        index[n.name] = len(index)
    producer = {t: n.name for n in graph.nodes for t in n.outputs}
    for t in graph.graph_inputs:
        producer[t] = "<input>"
    tensors = sorted({t for n in graph.nodes for t in n.inputs if t in producer} | set(graph.graph_outputs))
    for t in tensors:
        index[f"<T>{t}"] = len(index)
    for t in graph.graph_outputs:
        index[f"<O>{t}"] = len(index)
    flow = _Flow(len(index))
    s, t_ = 0, 1
    flow.add(s, index["<input>"], INF)          # the input is on the device
    for n in graph.nodes:
        v = index[n.name]
        flow.add(s, v, n.server_ms)              # cut when v is on the server
        flow.add(v, t_, n.device_ms)             # cut when v stays on the device
    for name in tensors:
        aux = index[f"<T>{name}"]
        src = index[producer[name]]
        flow.add(src, aux, graph.tensor_bytes.get(name, 0) * ms_per_byte)  # paid once if any reader is remote
        for n in graph.nodes:
            if name in n.inputs:
                flow.add(aux, index[n.name], INF)
                flow.add(index[n.name], src, INF)    # a device reader forces a device producer
    for name in graph.graph_outputs:
        out = index[f"<O>{name}"]
        flow.add(s, out, INF)
        flow.add(out, index[producer[name]], graph.tensor_bytes.get(name, 0) * ms_per_byte)
    source_side = flow.source_side(s, t_)
    return frozenset(n.name for n in graph.nodes if index[n.name] in source_side)


class _Flow:
    """Dinic's maximum flow on a small graph (float capacities)."""

    def __init__(self, n: int) -> None:
        self.adj: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[float] = []

    def add(self, u: int, v: int, c: float) -> None:
        self.adj[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(c)
        self.adj[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)

    def _bfs(self, s: int, t: int) -> list[int] | None:
        level = [-1] * len(self.adj)
        level[s] = 0
        q = deque([s])
        while q:
            u = q.popleft()
            for e in self.adj[u]:
                if self.cap[e] > 1e-12 and level[self.to[e]] < 0:
                    level[self.to[e]] = level[u] + 1
                    q.append(self.to[e])
        return level if level[t] >= 0 else None

    def _dfs(self, u: int, t: int, f: float, level: list[int], it: list[int]) -> float:
        if u == t:
            return f
        while it[u] < len(self.adj[u]):
            e = self.adj[u][it[u]]
            v = self.to[e]
            if self.cap[e] > 1e-12 and level[v] == level[u] + 1:
                pushed = self._dfs(v, t, min(f, self.cap[e]), level, it)
                if pushed > 0:
                    self.cap[e] -= pushed
                    self.cap[e ^ 1] += pushed
                    return pushed
            it[u] += 1
        return 0.0

    def source_side(self, s: int, t: int) -> set[int]:
        while (level := self._bfs(s, t)) is not None:
            it = [0] * len(self.adj)
            while (pushed := self._dfs(s, t, INF, level, it)) > 0:
                if pushed == INF:
                    raise ValueError("unbounded cut: every split is invalid")
        seen, q = {s}, deque([s])
        while q:
            u = q.popleft()
            for e in self.adj[u]:
                if self.cap[e] > 1e-12 and self.to[e] not in seen:
                    seen.add(self.to[e])
                    q.append(self.to[e])
        return seen


def valid_splits(graph: SplitGraph) -> list[frozenset[str]]:
    """Every valid device set (down-closed), for checking the planner on small graphs."""
    names = [n.name for n in graph.nodes]
    producer = {t: n.name for n in graph.nodes for t in n.outputs}
    preds = {n.name: {producer[t] for t in n.inputs if t in producer} for n in graph.nodes}
    out = []
    for mask in range(1 << len(names)):
        dev = {names[i] for i in range(len(names)) if mask >> i & 1}
        if all(preds[v] <= dev for v in dev):
            out.append(frozenset(dev))
    return out


@dataclass(frozen=True)
class SplitTable:
    """Best split per bandwidth range: ``bandwidths[i]`` is where ``splits[i+1]`` takes over."""

    bandwidths: tuple[float, ...]
    splits: tuple[Split, ...]

    def lookup(self, bandwidth_bps: float) -> Split:
        return self.splits[bisect_right(self.bandwidths, bandwidth_bps)]


def breakpoints(graph: SplitGraph, *, rtt_ms: float, low_bps: float = 1e5, high_bps: float = 1e10,
                probes: int = 48) -> SplitTable:
    """Precompute the bandwidths at which the best split changes (log-spaced probes, then
    bisection to 1% precision at each change)."""
    import math

    grid = [low_bps * (high_bps / low_bps) ** (i / (probes - 1)) for i in range(probes)]
    best = [plan(graph, bandwidth_bps=b, rtt_ms=rtt_ms) for b in grid]
    bws: list[float] = []
    splits = [best[0]]
    for i in range(1, probes):
        if best[i].device_nodes != splits[-1].device_nodes:
            lo, hi = grid[i - 1], grid[i]
            while hi / lo > 1.01:
                mid = math.sqrt(lo * hi)
                if plan(graph, bandwidth_bps=mid, rtt_ms=rtt_ms).device_nodes == splits[-1].device_nodes:
                    lo = mid
                else:
                    hi = mid
            bws.append(hi)
            splits.append(best[i])
    return SplitTable(tuple(bws), tuple(splits))


def chain(latencies: Sequence[tuple[float, float]], sizes: Sequence[int], input_bytes: int) -> SplitGraph:
    """A chain model from per-layer (device_ms, server_ms) and output sizes (bytes)."""
    nodes, prev = [], "x"
    for i, (d, s) in enumerate(latencies):
        nodes.append(Node(f"l{i}", (prev,), (f"t{i}",), d, s))
        prev = f"t{i}"
    tb = {"x": input_bytes, **{f"t{i}": b for i, b in enumerate(sizes)}}
    return SplitGraph(tuple(nodes), tb, ("x",), (prev,))
