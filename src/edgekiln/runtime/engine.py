"""`Runtime(bundle).infer(x)`: on-device inference from a bundle, numpy + onnxruntime only.

Each variant is opened through the execution layer's ``Session`` protocol: its whole file in
onnxruntime on ``device`` (``cpu``, ``auto`` or a provider, see
:func:`~edgekiln.execution.runtimes.device_providers`), or, when the manifest's top-level
``placements`` names the variant, the chain of segment files its ``placement.json`` describes
(:func:`~edgekiln.execution.chain.load_chain`).

>>> rt = Runtime("bundle/", device="auto")                         # doctest: +SKIP
>>> y = rt.infer(x)                                                # doctest: +SKIP
>>> rt.stats()["variants"]["int8"]["p95_ms"]                       # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.manifest import Manifest, load_manifest, safe_member
from edgekiln.runtime.monitor import Monitor
from edgekiln.runtime.policies import DeviceState, FixedPolicy, Policy, order_by_accuracy

if TYPE_CHECKING:
    from edgekiln.execution.runtimes import Session


class Runtime:
    """Loads a bundle, picks a variant per request with a policy, and keeps latency statistics.

    ``threads`` sets onnxruntime's intra-op threads (inter-op is 1). ``warmup`` runs each variant
    that many times on zeros when it is first loaded, so the first request is not an outlier.
    ``device`` picks onnxruntime's execution providers (``providers``, best first); ``"cpu"``,
    the default, is the CPU only. With ``placements`` (default) a variant the manifest places
    runs as its chain of segments; ``placement(variant)`` names the file, or None.
    """

    def __init__(self, bundle: str | Path, *, threads: int = 1, warmup: int = 3, policy: Policy | None = None,
                 window: int = 100, device: str = "cpu", placements: bool = True) -> None:
        from edgekiln.execution.runtimes import device_providers

        self.root = Path(bundle)
        self.manifest: Manifest = load_manifest(self.root)
        self.threads, self.warmup = threads, warmup
        self.device = device
        self.providers = device_providers(device)
        self.use_placements = placements
        metrics = {v.name: v.metric for v in self.manifest.variants}
        lat = {v.name: _first(v.latency_ms) for v in self.manifest.variants}
        self.order = order_by_accuracy(metrics, lat)
        self.expected_latency = {k: v for k, v in lat.items() if v}
        self.policy: Policy = policy or FixedPolicy(self.manifest.default_variant)
        self.monitor = Monitor(window=window)
        self.current = self.manifest.default_variant
        self.requests = 0
        self._sessions: dict[str, Session] = {}
        self.slowdown_ms = 0.0   # NOTE: test hook simulating a loaded device (added to measured latency)

    def placement(self, variant: str) -> str | None:
        """The placement.json (bundle-relative) the variant runs as, or None (its whole file)."""
        return self.manifest.placements.get(variant) if self.use_placements else None

    def session(self, variant: str) -> Session:
        """The variant's session (loaded and warmed up on first use), with the ``Session`` protocol."""
        if variant not in self._sessions:
            from edgekiln.execution.chain import load_chain
            from edgekiln.execution.ort import error_line
            from edgekiln.execution.runtimes import load_session

            v = self.manifest.variant(variant)
            placed = self.placement(variant)
            try:
                sess: Session = (load_chain(safe_member(self.root, placed), threads=self.threads) if placed else
                                 load_session(safe_member(self.root, v.file), "onnxruntime", threads=self.threads,
                                              providers=self.providers))
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
                where = placed or v.file
                raise EdgekilnError(f"variant '{variant}' ({where}) does not load: {error_line(exc)}") from None
            self._sessions[variant] = sess
            feeds = {n: np.zeros(_static(s), d) for n, s, d in zip(sess.input_names, sess.input_shapes,
                                                                    sess.input_dtypes, strict=True)}
            for _ in range(self.warmup):
                sess.run(feeds)
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
            out = sess.run(feeds)[0]
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

    def _feeds(self, sess: Session, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = dict(x) if isinstance(x, dict) else {sess.input_names[0]: x}
        for name, shape, want in zip(sess.input_names, sess.input_shapes, sess.input_dtypes, strict=True):
            if name not in feeds:
                raise EdgekilnError(f"missing input '{name}'")
            arr = np.asarray(feeds[name])
            if arr.dtype != want:
                arr = arr.astype(want)
            expected = [d if isinstance(d, int) else None for d in shape]
            if len(arr.shape) != len(expected) or any(e is not None and e != a for e, a in zip(expected, arr.shape,
                                                                                               strict=False)):
                raise EdgekilnError(f"input '{name}' has shape {list(arr.shape)}, the model expects "
                                    f"{['?' if e is None else e for e in expected]}")
            feeds[name] = arr
        return feeds


def _first(latencies: dict[str, float]) -> float | None:
    if not latencies:
        return None
    return latencies.get("onnxruntime") or next(iter(latencies.values()))


def _static(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
