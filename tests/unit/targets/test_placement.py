"""The placement planner: the DP is exact (against brute force), limits, transfers, energy, QDQ coarsening."""

from __future__ import annotations

import math
import random

import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.targets.compute_units import ComputeUnit, Link, profile_units
from edgekiln.targets.placement import PGraph, PNode, brute_force, place, support
from edgekiln.targets.profiles import load_profile


def _unit(name, *, peak=1e9, bw=1e9, ops=None, link=None, launch=0.0, cap=None, pj=None, excluded=frozenset()):
    return ComputeUnit(name=name, type="cpu" if link is None else "npu", precisions=("int8",),
                       peak_macs_per_s={"int8": peak}, efficiency=0.5, memory_bandwidth_bytes_per_s=bw,
                       ops=None if ops is None else frozenset(ops), ops_excluded=frozenset(excluded), link=link,
                       launch_overhead_us=launch, max_segments=cap,
                       energy_pj_per_mac={} if pj is None else {"int8": pj}, energy_pj_per_byte=0.5 if pj else None,
                       source="test")


UNITS = (_unit("cpu", pj=5.0),
         _unit("tpu", peak=1e11, ops={"Conv", "Add"}, link=Link(bandwidth_bytes_per_s=5e6, latency_us=100),
               launch=10, cap=1, pj=1.0),
         _unit("gpu", peak=1e10, bw=1e10, excluded={"Erf"}, link=Link(bandwidth_bytes_per_s=1e8, latency_us=20),
               pj=3.0))


def _random_dag(rng, n):
    nodes, sizes = [], {"x": rng.randint(100, 5000)}
    for k in range(n):
        earlier = ["x", *[f"t{m}" for m in range(k)]]
        ins = tuple(sorted(set(rng.sample(earlier, min(len(earlier), rng.randint(1, 2))))))
        nodes.append(PNode(f"n{k}", rng.choice(["Conv", "Conv", "Add", "Erf"]), ins, (f"t{k}",),
                           rng.randint(0, 2_000_000), "conv", rng.randint(0, 4000)))
        sizes[f"t{k}"] = rng.randint(1, 8000)
    outs = (f"t{n - 1}", *([f"t{rng.randrange(n - 1)}"] if rng.random() < 0.5 else []))
    return PGraph(tuple(nodes), sizes, ("x",), outs, "int8")


@pytest.mark.parametrize("objective", ["latency", "energy"])
def test_dp_equals_brute_force_on_random_dags(objective):
    rng = random.Random(24)
    for case in range(20):
        graph = _random_dag(rng, 8)
        plan = place(graph, UNITS, objective=objective)
        got = plan.total_ms * 1e-3 if objective == "latency" else plan.total_energy_mj * 1e9  # s / pJ
        want = brute_force(graph, UNITS, objective=objective)
        assert got == pytest.approx(want, rel=1e-9), \
            f"case {case}: DP {got} vs brute force {want}: {[(s.unit, s.start, s.stop) for s in plan.segments]}"
        assert sum(s.unit == "tpu" for s in plan.segments) <= 1
        assert [s.start for s in plan.segments][1:] == [s.stop for s in plan.segments][:-1]
        assert all(a.unit != b.unit for a, b in zip(plan.segments, plan.segments[1:], strict=False))


def _chain(ops, size=1000, macs=10_000_000):
    nodes = [PNode(f"n{k}", op, (f"t{k}",), (f"t{k + 1}",), macs, "conv", 0) for k, op in enumerate(ops)]
    return PGraph(tuple(nodes), {f"t{k}": size for k in range(len(ops) + 1)}, ("t0",), (f"t{len(ops)}",), "int8")


def test_edge_tpu_max_segments_keeps_the_rest_on_the_cpu():
    graph = _chain(["Conv", "Conv", "Conv", "Erf", "Conv", "Conv"])
    link = Link(bandwidth_bytes_per_s=1e9, latency_us=10)
    free = (_unit("cpu"), _unit("tpu", peak=1e12, ops={"Conv"}, link=link))
    capped = (_unit("cpu"), _unit("tpu", peak=1e12, ops={"Conv"}, link=link, cap=1))
    assert [(s.unit, s.start, s.stop) for s in place(graph, free).segments] == \
        [("tpu", 0, 3), ("cpu", 3, 4), ("tpu", 4, 6)]
    plan = place(graph, capped)
    assert [(s.unit, s.start, s.stop) for s in plan.segments] == [("tpu", 0, 3), ("cpu", 3, 6)]
    assert [(f.unit, f.node, f.reason) for f in plan.fallback] == [("tpu", "n3", "Erf not in tpu's op list")]
    assert plan.gain is not None and plan.gain > 0.3, f"gain {plan.gain} vs all-cpu"


def test_unit_with_no_ops_gets_nothing():
    graph = _chain(["Conv", "Add", "Conv"])
    plan = place(graph, (_unit("cpu"), _unit("npu", peak=1e13, ops=[], link=Link(bandwidth_bytes_per_s=1e12,
                                                                                    latency_us=0))))
    assert [s.unit for s in plan.segments] == ["cpu"] and plan.gain == 0.0
    assert [(f.unit, f.node, f.reason) for f in plan.fallback] == [("npu", "", "supports no op")]
    assert plan.single_unit["npu"] == "supports no op"


def test_transfer_counts_a_tensor_once_per_crossing():
    # n0(A) -> t read by n1(B) and n3(B); n2(A) between: segments A|B|A|B.
    nodes = (PNode("n0", "A", ("x",), ("t",), 0, "", 0), PNode("n1", "B", ("t",), ("u",), 0, "", 0),
             PNode("n2", "A", ("u",), ("v",), 0, "", 0), PNode("n3", "B", ("t", "v"), ("y",), 0, "", 0))
    graph = PGraph(nodes, {"x": 7, "t": 100, "u": 30, "v": 20, "y": 5}, ("x",), ("y",), "int8")
    link = Link(bandwidth_bytes_per_s=1e9, latency_us=1)
    units = (_unit("a", ops={"A"}, link=link), _unit("b", ops={"B"}, link=link))
    plan = place(graph, units)
    got = [(s.unit, s.inputs, s.outputs, s.transfer_in_bytes, s.transfer_out_bytes) for s in plan.segments]
    assert got == [("a", ("x",), ("t",), 7, 100), ("b", ("t",), ("u",), 100, 30), ("a", ("u",), ("v",), 30, 20),
                   ("b", ("t", "v"), ("y",), 120, 5)]
    assert plan.single_unit == {"a": "B not in a's op list", "b": "A not in b's op list"} and plan.gain is None


def test_energy_objective_picks_the_frugal_unit_and_refuses_unknown_energy():
    graph = _chain(["Conv"] * 3)
    fast_hungry, slow_frugal = _unit("fast", peak=1e12, pj=50.0), _unit("slow", peak=1e9, pj=1.0)
    assert [s.unit for s in place(graph, (fast_hungry, slow_frugal)).segments] == ["fast"]
    plan = place(graph, (fast_hungry, slow_frugal), objective="energy")
    assert [s.unit for s in plan.segments] == ["slow"] and plan.total_energy_mj == pytest.approx(
        3 * (10_000_000 * 1.0 + 2000 * 0.5) * 1e-9)
    with pytest.raises(EdgekilnError, match=r"unknown energy for unit\(s\) cpu, gpu "):
        place(graph, (_unit("cpu"), _unit("gpu"), slow_frugal), objective="energy")
    with pytest.raises(EdgekilnError, match="unknown energy for unit"):
        place(graph, profile_units(load_profile("raspberry-pi-4")), objective="energy")


def test_no_unit_runs_a_node_names_it():
    with pytest.raises(EdgekilnError, match=r"no compute unit runs node n1 \(Erf\): tpu: Erf not in tpu's op list"):
        place(_chain(["Conv", "Erf"]), (_unit("tpu", ops={"Conv"}),))


def test_cost_function_replaces_the_roofline_and_can_forbid():
    graph = _chain(["Conv"] * 4)
    units = (_unit("ort"), _unit("ov"))

    def cost(i, j, unit):
        if unit.name == "ov" and i < 2:
            return None                             # forbidden
        return (j - i) * (1.0 if unit.name == "ov" else 2.0) + 0.1  # ms; 0.1 per segment boundary

    plan = place(graph, units, cost=cost)
    assert [(s.unit, s.start, s.stop, s.source) for s in plan.segments] == \
        [("ort", 0, 2, "measured"), ("ov", 2, 4, "measured")]
    assert plan.total_ms == pytest.approx(6.2) and plan.single_unit["ort"] == pytest.approx(8.1)
    with pytest.raises(EdgekilnError, match="objective 'latency' only"):
        place(graph, (_unit("ort", pj=1.0), _unit("ov", pj=1.0)), cost=cost, objective="energy")


def test_big_graphs_cut_only_where_one_tensor_is_live():
    # n1 and n2 both read t0; cutting between n1 and n2 has two live tensors (t0, t1).
    nodes = (PNode("n0", "Conv", ("x",), ("t0",), 10**7, "", 0), PNode("n1", "Erf", ("t0",), ("t1",), 10**7, "", 0),
             PNode("n2", "Conv", ("t0", "t1"), ("t2",), 10**7, "", 0), PNode("n3", "Conv", ("t2",), ("y",), 10**7, "", 0))
    graph = PGraph(nodes, {t: 10 for t in ("x", "t0", "t1", "t2", "y")}, ("x",), ("y",), "int8")
    units = (_unit("cpu"), _unit("tpu", peak=1e12, ops={"Conv"}, link=Link(bandwidth_bytes_per_s=1e9, latency_us=1)))
    exact = place(graph, units)
    assert [(s.unit, s.start, s.stop) for s in exact.segments] == [("tpu", 0, 1), ("cpu", 1, 2), ("tpu", 2, 4)]
    coarse = place(graph, units, max_exact_nodes=3)
    assert [(s.unit, s.start, s.stop) for s in coarse.segments] == [("tpu", 0, 1), ("cpu", 1, 3), ("tpu", 3, 4)]


def test_edge_tpu_support_reasons():
    tpu = profile_units(load_profile("coral-edgetpu"))[0]
    shapes = {"a": (1, 4, 8, 8), "s": (1, 10), "b": (1, 64, 64), "c": (1, 2, 3, 4, 5), "o": (1, 1)}

    def why(op, ins, attrs=None, precision=None):
        node = PNode("x", op, ins, ("o",), 0, "", 0, precision=precision, attrs=attrs or {})
        return support(tpu, node, PGraph((node,), {}, (), (), "int8", shapes))

    assert why("Softmax", ("s",)) is None
    assert why("Softmax", ("a",)) == "Softmax input 3-D (tpu: 1-D only)"
    assert why("Erf", ("a",)) == "Erf not in the Edge TPU op list"
    assert why("Conv", ("a",), precision="fp32") == "Conv is fp32 (tpu runs int8 only)"
    assert why("ReduceMean", ("a",), {"axes": (2, 3)}) is None
    assert why("ReduceMean", ("a",), {"axes": (1,)}) == "ReduceMean over axes [1] (tpu: x/y only)"
    assert why("Pad", ("a",), {"pads": (0, 1, 0, 0, 0, 1, 0, 0)}) == "Pad over non-spatial axes (tpu: x/y only)"
    assert why("MatMul", ("b",), {"weight_constant": False}) == \
        "MatMul of two activations (tpu: FullyConnected with a constant weight only)"
    assert why("Add", ("c",)).startswith("Add tensor c [1, 2, 3, 4, 5] has 4 dims > 1 (tpu: at most 3)")


def test_place_graph_coarsens_qdq_and_cuts_at_int8_tensors(tmp_path):
    import onnx

    from edgekiln.codegen.testmodels import mobilenet_style_qdq
    from edgekiln.targets.place_graph import place_graph

    path = mobilenet_style_qdq(tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    graph = place_graph(path)
    n_onnx, n_coarse = len(proto.graph.node), len(graph.nodes)
    assert n_coarse * 3 <= n_onnx, f"coarsened {n_onnx} ONNX nodes to {n_coarse}, want at most 1/3"
    assert graph.precision == "int8"
    q_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    graph_io = {*graph.graph_inputs, *graph.graph_outputs}
    cuts = {t for nd in graph.nodes for t in (*nd.inputs, *nd.outputs)} - graph_io
    assert cuts and cuts <= q_outputs, f"cut tensors that are not int8 Q outputs: {sorted(cuts - q_outputs)}"
    for t in cuts:                                      # int8: one byte per element
        assert graph.tensor_bytes[t] == math.prod(graph.tensor_shapes[t]), t
    weights = {i.name for i in proto.graph.initializer}
    real = {n.name for n in proto.graph.node if n.op_type != "DequantizeLinear" or n.input[0] not in weights}
    members = {m for nd in graph.nodes for m in nd.members}
    assert real <= members, f"ONNX nodes in no coarse node: {sorted(real - members)}"
    assert graph.nodes[-1].op == "DequantizeLinear"     # the output DQ stays: the Edge TPU does not run it
    plan = place(graph, profile_units(load_profile("coral-edgetpu")), target="coral-edgetpu")
    assert plan.segments[-1].unit == "cpu" and sum(s.macs for s in plan.segments) == sum(nd.macs for nd in graph.nodes)
