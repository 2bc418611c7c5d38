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


@dataclass
class LatencyBudgetPolicy:
    """The most accurate variant whose rolling p95 stays under ``budget_ms``.

    Steps down one variant as soon as the current one's p95 (over at least ``min_samples``
    requests) exceeds the budget. Steps up only after ``dwell`` requests on the current variant
    and when the more accurate variant's predicted p95 — the current p95 scaled by the ratio of
    their manifest latencies — is below ``budget_ms * (1 - hysteresis)``. That prediction is what
    keeps it from flapping: it only moves up when the slowdown that pushed it down has passed.
    """

    budget_ms: float
    hysteresis: float = 0.2
    min_samples: int = 10
    dwell: int = 50
    _since_switch: int = 0
    _last: str | None = None

    def decide(self, state: DeviceState) -> str:
        if state.current != self._last:
            self._last, self._since_switch = state.current, 0
        self._since_switch += 1
        mon = state.monitor
        if mon is None or mon.samples(state.current) < self.min_samples:
            return state.current
        idx = state.variants.index(state.current)
        p95 = mon.p95(state.current) or 0.0
        if p95 > self.budget_ms and idx + 1 < len(state.variants):
            return state.variants[idx + 1]
        if idx > 0 and self._since_switch >= self.dwell:
            up = state.variants[idx - 1]
            ratio = _ratio(state.expected_latency_ms, up, state.current)
            if p95 * ratio < self.budget_ms * (1 - self.hysteresis):
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
