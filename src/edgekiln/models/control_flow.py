"""What the bodies of ``If``, ``Loop`` and ``Scan`` nodes cost: their weights and MACs.

A body runs inside its node, so :func:`edgekiln.models.analysis.analyze` adds its cost to the
node's row: every weight stored in a body counts as a parameter; the MACs count what one run
of the node executes: the larger branch of an ``If``, the body times the trip count of a
``Loop`` (one iteration when the trip count is not a constant), the body times the sequence
length of a ``Scan``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgekiln.execution.ort import node_subgraphs

Shape = tuple[int, ...]
MacsFn = Callable[[Any, Mapping[str, Shape]], int]


@dataclass(frozen=True)
class BodyCost:
    params: int          # elements of the weights stored in the bodies
    macs: int            # MACs of one run of the node
    iterations: int      # body runs counted (1 for If)


def subgraph_value_infos(graph: Any) -> list[Any]:
    """Inputs, outputs and value_info of every (nested) subgraph of ``graph``, for shape lookups."""
    found: list[Any] = []
    for node in graph.node:
        for g in node_subgraphs(node):
            found += [*g.input, *g.value_info, *g.output, *subgraph_value_infos(g)]
    return found


def body_cost(node: Any, shapes: Mapping[str, Shape], inits: Mapping[str, Any], macs: MacsFn) -> BodyCost | None:
    """The cost of ``node``'s bodies (None for a node without any); ``macs`` prices one plain node."""
    graphs = node_subgraphs(node)
    if not graphs:
        return None
    params, per_graph = 0, []
    for g in graphs:
        local = {**shapes, **{t.name: tuple(t.dims) for t in g.initializer}}
        p = sum(math.prod(t.dims) for t in g.initializer)
        m = 0
        for sub in g.node:
            m += macs(sub, local)
            inner = body_cost(sub, local, inits, macs)
            if inner is not None:
                p, m = p + inner.params, m + inner.macs
        params += p
        per_graph.append(m)
    if node.op_type == "If":
        return BodyCost(params, max(per_graph), 1)
    runs = _loop_trips(node, inits) if node.op_type == "Loop" else \
        _scan_length(node, shapes) if node.op_type == "Scan" else 1
    return BodyCost(params, sum(per_graph) * runs, runs)


def _loop_trips(node: Any, inits: Mapping[str, Any]) -> int:
    from onnx import numpy_helper

    name = node.input[0] if node.input else ""
    if name and name in inits:
        value = numpy_helper.to_array(inits[name])
        if value.size == 1 and int(value.reshape(-1)[0]) >= 0:
            return int(value.reshape(-1)[0])
    return 1   # NOTE: a trip count known only at run time: one iteration is counted


def _scan_length(node: Any, shapes: Mapping[str, Shape]) -> int:
    attrs = {a.name: a for a in node.attribute}
    scan_inputs = attrs["num_scan_inputs"].i if "num_scan_inputs" in attrs else 1
    first = len(node.input) - scan_inputs
    axes = list(attrs["scan_input_axes"].ints) if "scan_input_axes" in attrs else [0]
    shape = shapes.get(node.input[first]) if 0 <= first < len(node.input) else None
    if not shape:
        return 1
    axis = axes[0] if axes else 0
    return int(shape[axis % len(shape)])


def body_initializers(graph: Any) -> list[Any]:
    """Initializers stored inside the (nested) subgraphs of ``graph``'s nodes."""
    found: list[Any] = []
    for node in graph.node:
        for g in node_subgraphs(node):
            found += [*g.initializer, *body_initializers(g)]
    return found
