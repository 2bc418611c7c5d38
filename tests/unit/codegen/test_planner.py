"""Arena planner: greedy-by-size placement, no overlap of live buffers, aliasing and in-place reuse."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.codegen import testmodels as tm
from edgekiln.codegen.ir import IntGraph, Op, QTensor, load_qdq
from edgekiln.codegen.planner import GreedyArenaPlanner, plan_memory

SEED = 0


def test_three_call_interface_reuses_dead_space():
    p = GreedyArenaPlanner(alignment=1)
    a = p.add_buffer(100, 0, 1)
    b = p.add_buffer(50, 1, 2)
    c = p.add_buffer(100, 2, 3)
    assert (p.offset(a), p.offset(b), p.offset(c)) == (0, 100, 0)
    assert p.total_size() == 150


def test_random_buffers_never_overlap_while_live():
    rng = np.random.default_rng(SEED)
    for _ in range(30):
        p = GreedyArenaPlanner()
        bufs = []
        for _ in range(25):
            first = int(rng.integers(0, 20))
            bufs.append((int(rng.integers(1, 500)), first, first + int(rng.integers(0, 6))))
            p.add_buffer(*bufs[-1])
        p.check()
        peak = max(sum(s for s, f, last in bufs if f <= t <= last) for t in range(30))
        assert peak <= p.total_size() <= sum(s + 3 for s, _, _ in bufs), f"seed {SEED}"


def test_bad_buffer_is_rejected():
    with pytest.raises(ValueError):
        GreedyArenaPlanner().add_buffer(10, 3, 2)


def _chain():
    t = {n: QTensor(n, (1, 64), 0.1, 0) for n in ("x", "a", "b", "c", "d")}
    rq = dict(size=64, input_zp=0, output_zp=0, mult=2**30, shift=1, act_min=-128, act_max=127)
    ops = [Op("requantize", "r1", ["x"], "a", attrs=rq), Op("requantize", "r2", ["a"], "b", attrs=rq),
           Op("reshape", "view", ["b"], "c", attrs=dict(size=64)), Op("requantize", "r3", ["c"], "d", attrs=rq)]
    return IntGraph(t, ops, "x", "d", "input", (1, 64), (1, 64))


def test_in_place_and_views_share_one_buffer():
    plan = plan_memory(_chain(), reorder=False)
    assert plan.location["x"] == ("input", 0) and plan.location["d"] == ("output", 0)
    assert plan.location["a"] == plan.location["b"] == plan.location["c"] == ("arena", 0)
    assert plan.arena_bytes == 64, f"elementwise chain should need one buffer, got {plan.arena_bytes}"


def test_small_cnn_plan_is_the_two_largest_live_maps(tmp_path):
    graph = load_qdq(tm.small_cnn_qdq(tmp_path / "cnn.onnx"))
    plan = plan_memory(graph)
    # conv1 out (28*28*8) and pool1 out (14*14*8) are live together; nothing else is bigger
    assert plan.arena_bytes == 28 * 28 * 8 + 14 * 14 * 8
    assert max(plan.live_bytes) == plan.arena_bytes
    assert plan.naive_bytes > plan.arena_bytes
