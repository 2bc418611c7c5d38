"""The health check of an installed slot: the bundle's own check (``edgekiln.runtime``) plus its
latency from the runtime monitor; a bad bundle is a failed check, never an exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError


def health_check_slot(path: Path, *, latency_runs: int = 20) -> dict[str, Any]:
    """The bundle health check of ``edgekiln.runtime`` plus latency stats from the runtime monitor.

    Returns ``{"ok", "error"?, "max_abs_error", "latency_ms": {"p50", "p95"}}``; never raises for a
    bad bundle (a bad bundle is a failed check, not a crash of the agent).
    """
    from edgekiln.runtime.bundle import health_check

    try:
        result = health_check(path)
    except EdgekilnError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - onnxruntime and numpy raise their own types
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if not result.get("ok"):
        err = result.get("error") or (f"sample outputs differ from the expected ones by {result.get('max_abs_error')}"
                                      " (more than the manifest's health_tolerance)")
        return {"ok": False, "error": f"health check failed: {err}", "max_abs_error": result.get("max_abs_error")}
    result["latency_ms"] = _latency(path, latency_runs)
    return result


def _latency(path: Path, runs: int) -> dict[str, float] | None:
    import numpy as np

    from edgekiln.runtime.engine import Runtime

    try:
        rt = Runtime(path, warmup=2)
        m = rt.manifest
        if m.sample_inputs:
            with np.load(path / m.sample_inputs) as si:
                feeds = {k: si[k] for k in si.files}
        else:
            feeds = {s.name: np.zeros(tuple(d if d > 0 else 1 for d in s.shape), s.dtype) for s in m.inputs}
        for _ in range(runs):
            rt.infer(feeds)
        stats = rt.monitor.variants[rt.current]
        return {"p50": round(stats.p(50) or 0.0, 4), "p95": round(stats.p(95) or 0.0, 4)}
    except Exception:  # noqa: BLE001 - latency is informative; the health check already passed
        return None
