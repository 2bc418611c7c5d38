"""Policies choose the model variant for the next request from the device's state.

A policy is a small object with one method, ``decide(state) -> variant name``; users add their
own by writing one. Variants are ordered from most accurate to fastest (see
:func:`order_by_accuracy`), so "step down" means "faster, less accurate".

>>> state = DeviceState(variants=("big", "small"), current="big", battery_level=0.1)
>>> PowerPolicy().decide(state)
'small'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from edgekiln.runtime.monitor import Monitor


@dataclass(frozen=True)
class DeviceState:
    """What a policy may look at. The host program supplies battery/power/load."""

    variants: tuple[str, ...]                 # most accurate first
    current: str
    monitor: Monitor | None = None
    expected_latency_ms: Mapping[str, float] = field(default_factory=dict)  # from the manifest
    battery_level: float | None = None        # 0..1
    power_saver: bool = False
    cpu_load: float | None = None             # 0..1, e.g. os.getloadavg()[0] / cores
    requests: int = 0                         # requests served so far


class Policy(Protocol):
    def decide(self, state: DeviceState) -> str: ...


@dataclass
class FixedPolicy:
    variant: str

    def decide(self, state: DeviceState) -> str:
        return self.variant


@dataclass
class PowerPolicy:
    """Fastest variant on low battery or in power-saver mode, the most accurate otherwise;
    recovers only above ``low + hysteresis`` so it does not flap around the threshold."""

    low: float = 0.2
    hysteresis: float = 0.05

    def decide(self, state: DeviceState) -> str:
        fastest, best = state.variants[-1], state.variants[0]
        if state.power_saver:
            return fastest
        if state.battery_level is None:
            return state.current
        if state.battery_level < self.low:
            return fastest
        if state.current == fastest and state.battery_level < self.low + self.hysteresis:
            return fastest
        return best


@dataclass
class CpuLoadPolicy:
    """Step to the fastest variant while the CPU is busy with other work; back above hysteresis."""

    high: float = 0.8
    hysteresis: float = 0.15

    def decide(self, state: DeviceState) -> str:
        if state.cpu_load is None:
            return state.current
        if state.cpu_load >= self.high:
            return state.variants[-1]
        if state.cpu_load < self.high - self.hysteresis:
            return state.variants[0]
        return state.current


PROBE_SAMPLES = 3   # requests a step up is judged on before it may be undone (each costs one slow request)


@dataclass
class LatencyBudgetPolicy:
    """The most accurate variant whose rolling p95 stays under ``budget_ms``.

    Steps down one variant as soon as the current one's p95 (over at least ``min_samples``
    requests) exceeds the budget. Steps up only after ``dwell`` requests on the current variant
    and when the more accurate variant's predicted p95 — the current p95 scaled by the ratio of
    their manifest latencies — is below ``budget_ms * (1 - hysteresis)``. That prediction is what
    keeps it from flapping: it only moves up when the slowdown that pushed it down has passed.
    A load that only the more accurate variant feels is invisible to that prediction, so a step
    up that has to be undone within ``dwell`` requests doubles the wait before the next one (up
    to ``max_dwell``); a step up that holds resets it.
    """

    budget_ms: float
    hysteresis: float = 0.2
    min_samples: int = 10
    dwell: int = 50
    max_dwell: int = 800
    _since_switch: int = 0
    _last: str | None = None
    _wait: int = 0            # requests before the next step up: dwell, doubled after each failed one
    _probing: bool = False    # the last switch was a step up that has not held for `dwell` requests yet

    def decide(self, state: DeviceState) -> str:
        if state.current != self._last:
            self._last, self._since_switch = state.current, 0
        self._since_switch += 1
        wait = self._wait or self.dwell
        if self._probing and self._since_switch > self.dwell:
            self._probing, self._wait = False, self.dwell       # the step up held: back-off reset
        mon = state.monitor
        # NOTE: a variant is judged only on requests since it was chosen: its older samples
        # describe the load that made the policy leave it, and would push it down again at once.
        fresh = min(self._since_switch, mon.samples(state.current)) if mon is not None else 0
        need = min(self.min_samples, PROBE_SAMPLES) if self._probing else self.min_samples
        if mon is None or fresh < need:
            return state.current
        idx = state.variants.index(state.current)
        p95 = mon.recent_p(state.current, 95, fresh) or 0.0
        if p95 > self.budget_ms and idx + 1 < len(state.variants):
            if self._probing:       # the step up did not hold: wait twice as long before the next
                self._wait, self._probing = min(2 * wait, self.max_dwell), False
            return state.variants[idx + 1]
        if idx > 0 and self._since_switch >= wait:
            up = state.variants[idx - 1]
            ratio = _ratio(state.expected_latency_ms, up, state.current)
            if p95 * ratio < self.budget_ms * (1 - self.hysteresis):
                self._probing = True
                return up
        return state.current


def _ratio(expected: Mapping[str, float], up: str, current: str) -> float:
    a, b = expected.get(up), expected.get(current)
    if not a or not b:
        return 2.0  # unknown: assume the more accurate variant is twice as slow
    return a / b


def order_by_accuracy(metrics: Mapping[str, float | None], latencies: Mapping[str, float | None]) -> tuple[str, ...]:
    """Most accurate first; ties (or unknown metrics) broken by the slower variant first."""
    return tuple(sorted(metrics, key=lambda n: (-(metrics[n] if metrics[n] is not None else float("-inf")),
                                                 -(latencies.get(n) or 0.0))))
