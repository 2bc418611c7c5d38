"""`Runtime(bundle).infer(x)`: on-device inference from a bundle, numpy + onnxruntime only.

>>> rt = Runtime("bundle/")                                        # doctest: +SKIP
>>> y = rt.infer(x)                                                # doctest: +SKIP
>>> rt.stats()["variants"]["int8"]["p95_ms"]                       # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.execution.specs import numpy_dtype
from edgekiln.runtime.manifest import Manifest, load_manifest, safe_member
from edgekiln.runtime.monitor import Monitor
from edgekiln.runtime.policies import DeviceState, FixedPolicy, Policy, order_by_accuracy


class Runtime:
    """Loads a bundle, picks a variant per request with a policy, and keeps latency statistics.

    ``threads`` sets onnxruntime's intra-op threads (inter-op is 1). ``warmup`` runs each variant
    that many times on zeros when it is first loaded, so the first request is not an outlier.
    """

    def __init__(self, bundle: str | Path, *, threads: int = 1, warmup: int = 3, policy: Policy | None = None,
                 window: int = 100) -> None:
        self.root = Path(bundle)
        self.manifest: Manifest = load_manifest(self.root)
        self.threads, self.warmup = threads, warmup
        metrics = {v.name: v.metric for v in self.manifest.variants}
        lat = {v.name: _first(v.latency_ms) for v in self.manifest.variants}
        self.order = order_by_accuracy(metrics, lat)
        self.expected_latency = {k: v for k, v in lat.items() if v}
        self.policy: Policy = policy or FixedPolicy(self.manifest.default_variant)
        self.monitor = Monitor(window=window)
        self.current = self.manifest.default_variant
        self.requests = 0
        self._sessions: dict[str, Any] = {}
        self.slowdown_ms = 0.0   # NOTE: test hook simulating a loaded device (added to measured latency)

    def session(self, variant: str) -> Any:
        if variant not in self._sessions:
            from edgekiln.execution.ort import error_line, ort_session

            v = self.manifest.variant(variant)
            try:
                sess = ort_session(Path(safe_member(self.root, v.file)), threads=self.threads)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
                raise EdgekilnError(f"variant '{variant}' ({v.file}) does not load: {error_line(exc)}") from None
            self._sessions[variant] = sess
            feeds = {i.name: np.zeros(_static(i.shape), numpy_dtype(i.type)) for i in sess.get_inputs()}
            for _ in range(self.warmup):
                sess.run(None, feeds)
        return self._sessions[variant]

    def infer(self, x: np.ndarray | dict[str, np.ndarray], *, battery_level: float | None = None,
              power_saver: bool = False, cpu_load: float | None = None, variant: str | None = None) -> np.ndarray:
        """Run one request; returns the first output. The policy picks the variant unless given."""
        state = DeviceState(variants=self.order, current=self.current, monitor=self.monitor,
                            expected_latency_ms=self.expected_latency, battery_level=battery_level,
                            power_saver=power_saver, cpu_load=cpu_load, requests=self.requests)
        chosen = variant or self.policy.decide(state)
        self.manifest.variant(chosen)
        self.current = chosen
        sess = self.session(chosen)
        feeds = self._feeds(sess, x)
        start = time.perf_counter()
        try:
            out = sess.run(None, feeds)[0]
        except Exception as exc:  # noqa: BLE001
            self.monitor.record(chosen, 0.0, error=True)
            raise EdgekilnError(f"inference failed on variant '{chosen}': {str(exc).splitlines()[0]}") from None
        elapsed = (time.perf_counter() - start) * 1000.0 + self.slowdown_ms
        if self.slowdown_ms:
            time.sleep(self.slowdown_ms / 1000.0)
        self.monitor.record(chosen, elapsed)
        self.requests += 1
        return out

    def stats(self) -> dict[str, Any]:
        return {"bundle": self.manifest.name, "version": self.manifest.version, "current": self.current,
                "requests": self.requests, "order": list(self.order), "variants": self.monitor.to_dict()}

    def _feeds(self, sess: Any, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = sess.get_inputs()
        feeds = dict(x) if isinstance(x, dict) else {inputs[0].name: x}
        for i in inputs:
            if i.name not in feeds:
                raise EdgekilnError(f"missing input '{i.name}'")
            arr = np.asarray(feeds[i.name])
            want = numpy_dtype(i.type)
            if arr.dtype != want:
                arr = arr.astype(want)
            expected = [d if isinstance(d, int) else None for d in i.shape]
            if len(arr.shape) != len(expected) or any(e is not None and e != a for e, a in zip(expected, arr.shape,
                                                                                               strict=False)):
                raise EdgekilnError(f"input '{i.name}' has shape {list(arr.shape)}, the model expects "
                                    f"{['?' if e is None else e for e in expected]}")
            feeds[i.name] = arr
        return feeds


def _first(latencies: dict[str, float]) -> float | None:
    if not latencies:
        return None
    return latencies.get("onnxruntime") or next(iter(latencies.values()))


def _static(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
