"""Rolling latency statistics per variant (a fixed window; no allocation growth on the device)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class VariantStats:
    window: deque[float]
    count: int = 0
    errors: int = 0

    def p(self, q: float) -> float | None:
        if not self.window:
            return None
        return float(np.percentile(np.fromiter(self.window, float), q))


@dataclass
class Monitor:
    """Per-variant counters and rolling p50/p95 latency over the last ``window`` requests."""

    window: int = 100
    variants: dict[str, VariantStats] = field(default_factory=dict)

    def record(self, variant: str, latency_ms: float, *, error: bool = False) -> None:
        stats = self.variants.setdefault(variant, VariantStats(deque(maxlen=self.window)))
        stats.count += 1
        if error:
            stats.errors += 1
        else:
            stats.window.append(latency_ms)

    def p95(self, variant: str) -> float | None:
        stats = self.variants.get(variant)
        return stats.p(95) if stats else None

    def recent_p(self, variant: str, q: float, last: int) -> float | None:
        """Percentile ``q`` of the variant's ``last`` most recent latencies."""
        stats = self.variants.get(variant)
        if not stats or not stats.window or last <= 0:
            return None
        recent = list(stats.window)[-last:]
        return float(np.percentile(np.asarray(recent, float), q))

    def samples(self, variant: str) -> int:
        stats = self.variants.get(variant)
        return len(stats.window) if stats else 0

    def to_dict(self) -> dict[str, dict[str, float | int | None]]:
        return {name: {"count": s.count, "errors": s.errors, "p50_ms": s.p(50), "p95_ms": s.p(95)}
                for name, s in self.variants.items()}
