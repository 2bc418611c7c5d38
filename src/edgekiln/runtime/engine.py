"""`Runtime(bundle).infer(x)`: on-device inference from a bundle, numpy + onnxruntime only.

Each variant is opened through the execution layer's ``Session`` protocol: its whole file in
onnxruntime on ``device`` (``cpu``, ``auto`` or a provider, see
:func:`~edgekiln.execution.runtimes.device_providers`), or, when the manifest's top-level
``placements`` names the variant, the chain of segment files its ``placement.json`` describes
(:func:`~edgekiln.execution.chain.load_chain`).

>>> rt = Runtime("bundle/", device="auto")                         # doctest: +SKIP
>>> y = rt.infer(x)                                                # doctest: +SKIP
>>> rt.stats()["variants"]["int8"]["p95_ms"]                       # doctest: +SKIP

``learn(x, y)`` trains the current variant's head on streamed samples (numpy, no torch; see
:mod:`edgekiln.runtime.learner`) while inference keeps using the deployed model; ``commit(out,
gate=...)`` writes the adapted bundle to ``out`` if the gate accepts it
(:func:`edgekiln.runtime.adapt.write_and_gate`). Activating it on a device goes through the
agent's A/B slots (``edgekiln learn STATE``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.manifest import Manifest, load_manifest, safe_member
from edgekiln.runtime.monitor import Monitor
from edgekiln.runtime.policies import DeviceState, FixedPolicy, Policy, order_by_accuracy

if TYPE_CHECKING:
    from edgekiln.execution.runtimes import Session
    from edgekiln.runtime.adapt import AdaptResult, Base
    from edgekiln.runtime.learner import GateConfig, LearnConfig, StreamConfig


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
        self._learning: _Learning | None = None
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
        out = {"bundle": self.manifest.name, "version": self.manifest.version, "current": self.current,
               "requests": self.requests, "order": list(self.order), "variants": self.monitor.to_dict()}
        if self._learning is not None:
            lr = self._learning
            out["learning"] = {"n_seen": lr.n_seen, "classes": lr.base.learner.classes,
                               "last_step_ms": round(lr.base.learner.last_step["ms"], 4)}
        return out

    def learn(self, x: np.ndarray, y: np.ndarray, *, new_classes: int | Sequence[int] | None = None,
              config: LearnConfig | None = None, stream: StreamConfig | None = None) -> dict[str, Any]:
        """Train the default variant's head on samples ``(x, y)`` (a streaming step; the first call
        sets up the learner with ``config``/``stream`` and the bundle's replay). Labels at or
        above the model's classes are new classes; ``new_classes`` (a count, or the class
        indices) caps how many (None: any).
        Every ``round(1 / holdout_share)``-th sample of a class is held out for :meth:`commit`.
        Returns ``{loss, n_seen, classes, ms, peak_bytes}``; inference is unchanged until commit.
        """
        from edgekiln.runtime.learner import GateConfig, LearnConfig

        if self._learning is None:
            self._learning = _Learning(self.root, config or LearnConfig(), stream, GateConfig(), self.threads)
        count = new_classes if new_classes is None or isinstance(new_classes, int) else len(new_classes)
        return self._learning.learn(x, y, count)

    def commit(self, out: str | Path | None = None, *, gate: GateConfig) -> AdaptResult:
        """Write the head trained by :meth:`learn` as an adapted bundle in ``out`` (default:
        ``<bundle>.adapted``) and gate it on the held-out samples; a rejected one is deleted."""
        from edgekiln.runtime.adapt import write_and_gate

        if self._learning is None or not self._learning.n_seen:
            raise EdgekilnError("commit: nothing learned yet (call learn first)")
        lr = self._learning
        held_x, held_y = lr.held()
        target = Path(out) if out is not None else self.root.with_name(self.root.name + ".adapted")
        return write_and_gate(lr.base, held_x, held_y, gate=gate, out=target, samples=lr.n_seen)

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


class _Learning:
    """The streaming learner of one runtime: the adapted bundle's base and the held-out samples."""

    def __init__(self, root: Path, config: LearnConfig, stream: StreamConfig | None, gate: GateConfig,
                 threads: int) -> None:
        from edgekiln.runtime.adapt import open_base

        self.base: Base = open_base(root, config, threads=threads, stream=stream)
        self.every = max(2, round(1.0 / gate.holdout_share))
        self.per_class: dict[int, int] = {}
        self.held_x: list[np.ndarray] = []
        self.held_y: list[int] = []
        self.n_seen = 0

    def learn(self, x: np.ndarray, y: np.ndarray, new_classes: int | None) -> dict[str, Any]:
        learner = self.base.learner
        y = np.asarray(y).reshape(-1)
        limit = learner.old_classes + (new_classes if new_classes is not None else 1 << 15)
        if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= limit)):
            raise EdgekilnError(f"learn: labels must be class indices below {limit}")
        feats, _ = learner.features(np.asarray(x))
        if len(feats) != len(y):
            raise EdgekilnError(f"learn: {len(feats)} samples and {len(y)} labels")
        train = np.ones(len(y), bool)
        for i, c in enumerate(int(v) for v in y):
            k = self.per_class.get(c, 0)
            self.per_class[c] = k + 1
            if k % self.every == self.every - 1:   # NOTE: every k-th sample of a class is the gate's
                train[i] = False
                self.held_x.append(feats[i])
                self.held_y.append(c)
        self.n_seen += len(y)
        res = {"loss": None, "ms": 0.0, "peak_bytes": 0}
        if train.any():
            res = learner.partial_fit(None, y[train], feats=feats[train])
        return {**res, "n_seen": self.n_seen, "classes": learner.classes}

    def held(self) -> tuple[np.ndarray, np.ndarray]:
        dim = self.base.learner.spec.feature_dim
        return (np.stack(self.held_x) if self.held_x else np.zeros((0, dim), np.float32),
                np.asarray(self.held_y, np.int64))


def _first(latencies: dict[str, float]) -> float | None:
    if not latencies:
        return None
    return latencies.get("onnxruntime") or next(iter(latencies.values()))


def _static(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
