"""The split planner is exact: it matches brute force over every valid split, on chains and DAGs."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.runtime.split_plan import Node, SplitGraph, breakpoints, chain, evaluate, plan, valid_splits


def _residual(rng) -> SplitGraph:
    """x -> a -> b -> c -> add(b_out, c_out)? A residual block plus a concat branch."""
    d = lambda: float(rng.uniform(0.5, 5.0))  # noqa: E731
    s = lambda: float(rng.uniform(0.05, 0.5))  # noqa: E731
    nodes = (
        Node("stem", ("x",), ("a",), d(), s()),
        Node("conv1", ("a",), ("b",), d(), s()),
        Node("conv2", ("b",), ("c",), d(), s()),
        Node("add", ("a", "c"), ("r",), d() / 5, s() / 5),          # residual: a is read twice
        Node("left", ("r",), ("p",), d(), s()),
        Node("right", ("r",), ("q",), d(), s()),
        Node("concat", ("p", "q"), ("k",), d() / 5, s() / 5),
        Node("head", ("k",), ("y",), d(), s()),
    )
    sizes = {t: int(rng.integers(1_000, 200_000)) for t in ("x", "a", "b", "c", "r", "p", "q", "k")}
    sizes["y"] = 40
    return SplitGraph(nodes, sizes, ("x",), ("y",))


def _brute(graph, bw, rtt):
    return min(evaluate(graph, s, bandwidth_bps=bw, rtt_ms=rtt).latency_ms for s in valid_splits(graph))


@pytest.mark.parametrize("calls", [(0.0, 0.0), (3.0, 0.2)], ids=["no-call-cost", "call-cost"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bw", [1e6, 1e7, 1e8])
def test_planner_matches_brute_force_on_a_branching_model(seed, bw, calls):
    import dataclasses

    graph = dataclasses.replace(_residual(np.random.default_rng(seed)), device_call_ms=calls[0],
                                server_call_ms=calls[1])
    best = plan(graph, bandwidth_bps=bw, rtt_ms=20.0)
    expected = _brute(graph, bw, 20.0)
    assert abs(best.latency_ms - expected) < 1e-9, f"seed {seed} bw {bw}: planner {best.latency_ms} vs brute {expected}"


@pytest.mark.parametrize("seed", range(4))
def test_planner_matches_brute_force_on_a_chain(seed):
    rng = np.random.default_rng(seed)
    lat = [(float(rng.uniform(1, 8)), float(rng.uniform(0.1, 1))) for _ in range(7)]
    sizes = [int(rng.integers(500, 300_000)) for _ in range(7)]
    graph = chain(lat, sizes, input_bytes=150_000)
    for bw in (1e6, 1e7, 1e8):
        assert abs(plan(graph, bandwidth_bps=bw, rtt_ms=10.0).latency_ms - _brute(graph, bw, 10.0)) < 1e-9


def test_the_residual_tensor_is_paid_once_when_two_server_nodes_read_it():
    graph = _residual(np.random.default_rng(0))
    split = evaluate(graph, frozenset({"stem"}), bandwidth_bps=1e7, rtt_ms=0.0)
    assert split.sent == ("a",)
    assert split.parts["transfer_ms"] == pytest.approx((graph.tensor_bytes["a"] + 40) * 8 / 1e7 * 1000)


def test_breakpoint_table_lookup_equals_replanning():
    graph = _residual(np.random.default_rng(2))
    table = breakpoints(graph, rtt_ms=2.0)
    assert len(table.splits) >= 2, "expected the best split to change with bandwidth"
    for bw in np.geomspace(2e5, 5e9, 40):
        direct = plan(graph, bandwidth_bps=float(bw), rtt_ms=2.0)
        looked = evaluate(graph, table.lookup(float(bw)).device_nodes, bandwidth_bps=float(bw), rtt_ms=2.0)
        # Within the bisection precision (1% in bandwidth) the two may differ by a hair.
        assert looked.latency_ms <= direct.latency_ms * 1.01 + 1e-9, f"bw {bw:.3g}"


def test_slow_network_keeps_everything_on_device_and_fast_network_offloads():
    graph = chain([(10.0, 1.0)] * 4, [100_000] * 4, input_bytes=50_000)
    assert plan(graph, bandwidth_bps=1e5, rtt_ms=20).label == "all-device"
    assert plan(graph, bandwidth_bps=1e9, rtt_ms=1).label == "all-server"


def test_split_graph_from_onnx_measures_every_node(tmp_path):
    from edgekiln.runtime.split_profile import split_graph
    from edgekiln.testing.tiny import tiny_conv_onnx

    path = tiny_conv_onnx(tmp_path / "m.onnx")
    g = split_graph(path, {"input": np.zeros((1, 1, 8, 8), np.float32)}, device_factor=10.0, runs=5)
    assert [n.name for n in g.nodes] == ["conv1", "relu1", "flatten", "fc"]
    assert all(n.device_ms == pytest.approx(10.0 * n.server_ms) for n in g.nodes)
    assert g.tensor_bytes["c1"] == 4 * 6 * 6 * 4 and g.tensor_bytes["input"] == 64 * 4
    assert g.nodes[0].server_ms > 0
    g8 = split_graph(path, {"input": np.zeros((1, 1, 8, 8), np.float32)}, device_factor=1.0, int8_transfer=True, runs=5)
    assert g8.tensor_bytes["c1"] == 4 * 6 * 6


def test_call_costs_are_paid_once_per_side_that_runs():
    import dataclasses

    graph = dataclasses.replace(chain([(1.0, 0.1)] * 3, [1000] * 3, input_bytes=1000), device_call_ms=5.0,
                                server_call_ms=0.5)
    every = frozenset(n.name for n in graph.nodes)
    parts = {label: evaluate(graph, nodes, bandwidth_bps=1e9, rtt_ms=0.0).parts
             for label, nodes in (("device", every), ("server", frozenset()), ("split", frozenset({"l0"})))}
    assert parts["device"]["device_ms"] == pytest.approx(3.0 + 5.0) and parts["device"]["server_ms"] == 0.0
    assert parts["server"]["device_ms"] == 0.0 and parts["server"]["server_ms"] == pytest.approx(0.3 + 0.5)
    assert parts["split"]["device_ms"] == pytest.approx(1.0 + 5.0)
    assert parts["split"]["server_ms"] == pytest.approx(0.2 + 0.5)
