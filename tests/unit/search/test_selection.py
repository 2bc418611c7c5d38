"""Which feasible candidate optimize selects."""

from __future__ import annotations

from edgekiln.search.selection import select_best
from edgekiln.search.trial import Candidate


def _cand(number, metric, ms, size=100):
    return Candidate(number=number, label=f"c{number}", steps=[], metric=metric, model_bytes=size,
                     latency_ms_target_est=ms, feasible=True)


def test_measured_latencies_within_the_noise_are_a_tie_won_by_accuracy():
    # MiniLM on the host: three smoothing strengths, one graph, p50s 4.15..4.30 ms by noise.
    cands = [_cand(0, 0.9984, 4.30), _cand(1, 0.9977, 4.22), _cand(2, 0.9966, 4.15)]
    best = select_best(cands, "latency", latency_tolerance=0.05)
    assert best is not None and best.number == 0, f"selected #{best and best.number}: 4.30 ms is within 5% of 4.15"


def test_a_real_speedup_still_wins_over_accuracy():
    cands = [_cand(0, 0.9984, 4.60), _cand(1, 0.9966, 4.15)]
    best = select_best(cands, "latency", latency_tolerance=0.05)
    assert best is not None and best.number == 1, f"selected #{best and best.number}: 4.60 ms is 11% slower"


def test_estimated_latencies_are_compared_exactly():
    cands = [_cand(0, 0.99, 2.01), _cand(1, 0.98, 2.00)]
    best = select_best(cands, "latency")
    assert best is not None and best.number == 1
