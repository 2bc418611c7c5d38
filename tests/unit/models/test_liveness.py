"""compute_liveness: intervals and live bytes on hand-made schedules (no ONNX)."""

from __future__ import annotations

import pytest

from edgekiln.models.liveness import compute_liveness


def test_branching_schedule_by_hand():
    # step 0: x -> a; step 1: x -> b; step 2: a, b -> c; step 3: c -> y (output); "dbg" written at 1, never read
    sizes = {"x": 10, "a": 20, "b": 30, "c": 40, "y": 5, "dbg": 7}
    producers = {"a": 0, "b": 1, "dbg": 1, "c": 2, "y": 3}
    consumers = {"x": [0, 1], "a": [2], "b": [2], "c": [3]}
    lv = compute_liveness(sizes, producers, consumers, 4, outputs=["y"])
    assert lv.intervals == {"x": (0, 1), "a": (0, 2), "b": (1, 2), "c": (2, 3), "y": (3, 3), "dbg": (1, 1)}
    # 0: x+a = 30; 1: x+a+b+dbg = 67; 2: a+b+c = 90; 3: c+y = 45
    assert lv.live_bytes_per_step == (30, 67, 90, 45)
    assert (lv.peak_bytes, lv.peak_step) == (90, 2)


def test_outputs_stay_live_to_the_end_and_ties_pick_the_first_step():
    # "early" is an output produced at step 0 and read by nobody: live through step 2.
    lv = compute_liveness({"x": 4, "early": 4, "h": 4, "y": 4}, {"early": 0, "h": 1, "y": 2},
                          {"x": [0, 1], "h": [2]}, 3, outputs=["early", "y"])
    # 0: x+early = 8; 1: x+early+h = 12; 2: early+h+y = 12
    assert lv.live_bytes_per_step == (8, 12, 12)
    assert (lv.peak_bytes, lv.peak_step) == (12, 1)


def test_read_before_produced_raises():
    with pytest.raises(ValueError, match="'a'"):
        compute_liveness({"a": 1}, {"a": 2}, {"a": [1]}, 3)
