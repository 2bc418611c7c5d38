"""Which candidate wins, and which are Pareto-optimal.

>>> a = Candidate(number=0, label="a", steps=[], metric=0.98, model_bytes=100, latency_ms_target_est=2.0, feasible=True)
>>> b = Candidate(number=1, label="b", steps=[], metric=0.97, model_bytes=50, latency_ms_target_est=1.0, feasible=True)
>>> select_best([a, b], "latency").label, select_best([a, b], "accuracy").label
('b', 'a')
"""

from __future__ import annotations

from collections.abc import Sequence

from edgekiln.search.trial import Candidate

# NOTE: host p50s of one model measured minutes apart in a search differ by up to ~5% here
# (shared machine); within that, the more accurate candidate is selected.
HOST_LATENCY_NOISE = 0.05


def _latency(c: Candidate) -> float:
    value = c.latency_ms_target_est if c.latency_ms_target_est is not None else c.latency_ms_host
    return float("inf") if value is None else float(value)


def select_best(candidates: Sequence[Candidate], prefer: str, latency_tolerance: float = 0.0) -> Candidate | None:
    """The feasible candidate that is fastest on the target (``latency``), smallest (``size``)
    or most accurate (``accuracy``); the other objectives break ties, then the trial number.

    ``latency_tolerance`` is for latencies measured on a noisy machine: candidates within that
    fraction of the fastest count as equally fast, and the most accurate of them wins (otherwise
    run-to-run noise picks between models with the same graph).
    """
    feasible = [c for c in candidates if c.feasible and c.state == "complete" and c.metric is not None]
    if not feasible:
        return None
    if prefer == "latency" and latency_tolerance > 0:
        fastest = min(_latency(c) for c in feasible)
        tied = [c for c in feasible if _latency(c) <= fastest * (1 + latency_tolerance)]
        return min(tied, key=lambda c: (-(c.metric or 0.0), c.model_bytes or 0, _latency(c), c.number))
    keys = {
        "latency": lambda c: (_latency(c), c.model_bytes or 0, -(c.metric or 0.0), c.number),
        "size": lambda c: (c.model_bytes or 0, _latency(c), -(c.metric or 0.0), c.number),
        "accuracy": lambda c: (-(c.metric or 0.0), _latency(c), c.model_bytes or 0, c.number),
    }
    return min(feasible, key=keys[prefer])


def beats_fp32(c: Candidate, fp32: Candidate, latency_tolerance: float = 0.0) -> bool:
    """Whether ``c`` was measured faster than the FP32 model ``fp32`` on this machine (host p50 on
    each one's fastest runtime), by more than ``latency_tolerance``.

    >>> f = Candidate(number=-1, label="fp32", steps=[], latency_ms_host=2.0)
    >>> [beats_fp32(Candidate(number=0, label="q", steps=[], latency_ms_host=ms), f, 0.05) for ms in (1.5, 1.95)]
    [True, False]
    """
    if c.latency_ms_host is None or fp32.latency_ms_host is None:
        return False
    return c.latency_ms_host * (1 + latency_tolerance) < fp32.latency_ms_host


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates not dominated on (metric up, size down, target latency down), by size."""
    pts = [c for c in candidates if c.metric is not None and c.model_bytes is not None]

    def dominates(a: Candidate, b: Candidate) -> bool:
        no_worse = a.metric >= b.metric and a.model_bytes <= b.model_bytes and _latency(a) <= _latency(b)
        better = a.metric > b.metric or a.model_bytes < b.model_bytes or _latency(a) < _latency(b)
        return no_worse and better

    front = [c for c in pts if not any(dominates(o, c) for o in pts if o is not c)]
    return sorted(front, key=lambda c: (c.model_bytes, c.number))
