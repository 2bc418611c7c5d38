"""Train a classifier's last dense layers on the device, in numpy, with no torch.

onnxruntime runs the frozen backbone once per sample (one optimized session with the cut tensor
exposed gives the features and the deployed model's logits in one call); numpy trains the tail
that :func:`edgekiln.runtime.head_split.find_tail` found: cross-entropy, optionally plus
distillation towards the deployed model's logits, with SGD (momentum 0.9) or Adam, on the new
samples together with a replay buffer of old features.

>>> import tempfile
>>> from edgekiln.testing.streams import class_clusters
>>> from edgekiln.testing.tiny import tiny_head_onnx
>>> learner = HeadLearner(tiny_head_onnx(tempfile.mkdtemp() + "/m.onnx"), LearnConfig(steps=20))
>>> x, y = class_clusters(5, classes=(8, 9))
>>> learner.fit(x, y)["steps"], learner.classes
(20, 10)
>>> learner.export(tempfile.mkdtemp() + "/adapted.onnx").suffix
'.onnx'
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.replay import ReplayBuffer

OPTIMIZERS = ("sgd", "adam")
TRACE_EVERY = 16   # streaming steps between two tracemalloc-measured ones (the first is measured)


@dataclass(frozen=True, kw_only=True)
class LearnConfig:
    """How the tail is trained. ``scope``: ``head`` (the last dense layer) or ``last-block``
    (the last two); ``distill``: weight of the distillation term towards the deployed model's
    logits at ``temperature`` (0 = cross-entropy only); ``freeze_old``: the old classes' rows
    of the last layer keep their values. The defaults are the measured best head setting."""

    version: int = 1
    scope: str = "head"
    optimizer: str = "adam"
    lr: float = 3e-3
    steps: int = 100
    distill: float = 0.0
    temperature: float = 2.0
    freeze_old: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from edgekiln.runtime.head_split import SCOPES

        if self.version != 1:
            raise EdgekilnError(f"LearnConfig version {self.version} is not supported (expected 1)")
        if self.scope not in SCOPES:
            raise EdgekilnError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        if self.optimizer not in OPTIMIZERS:
            raise EdgekilnError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if not (self.lr > 0 and self.lr < 10):
            raise EdgekilnError(f"lr must be in (0, 10), not {self.lr}")
        if not (0 <= self.steps <= 100_000):
            raise EdgekilnError(f"steps must be in 0..100000, not {self.steps}")
        if not (self.distill >= 0 and self.distill < 1e6):
            raise EdgekilnError(f"distill must be >= 0, not {self.distill}")
        if not (self.temperature > 0 and self.temperature < 1e3):
            raise EdgekilnError(f"temperature must be > 0, not {self.temperature}")


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Streaming updates (:meth:`HeadLearner.partial_fit`, ``Runtime.learn``): steps per call and
    how many replay rows join each step."""

    stream_steps: int = 1
    replay_batch: int = 32

    def __post_init__(self) -> None:
        if not (1 <= self.stream_steps <= 10_000):
            raise EdgekilnError(f"stream_steps must be in 1..10000, not {self.stream_steps}")
        if not (0 <= self.replay_batch <= 100_000):
            raise EdgekilnError(f"replay_batch must be in 0..100000, not {self.replay_batch}")


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """When an adaptation is accepted: the old classes' held-out accuracy may drop by at most
    ``budget_old_drop`` (a fraction), the new classes' (or, for a domain shift, the held-out
    device samples') accuracy must rise by more than ``min_new_gain``; ``holdout_share`` of the
    device samples (at least 3 per class) are held out for that check and never trained on."""

    budget_old_drop: float = 0.01
    min_new_gain: float = 0.0
    holdout_share: float = 0.25

    def __post_init__(self) -> None:
        if not (0.0 <= self.budget_old_drop <= 1.0):
            raise EdgekilnError(f"budget_old_drop must be in [0, 1], not {self.budget_old_drop}")
        if not (-1.0 <= self.min_new_gain <= 1.0):
            raise EdgekilnError(f"min_new_gain must be in [-1, 1], not {self.min_new_gain}")
        if not (0.0 < self.holdout_share < 1.0):
            raise EdgekilnError(f"holdout_share must be in (0, 1), not {self.holdout_share}")


def forward(layers: list[tuple[np.ndarray, np.ndarray, bool]], feats: np.ndarray) -> list[np.ndarray]:
    """The tail in numpy: ``layers`` is ``[(W [out, in], b, relu_after), ...]``; returns each
    layer's pre-activation output (the last one is the logits)."""
    outs, h = [], feats
    for w, b, relu in layers:
        z = h @ w.T + b
        outs.append(z)
        h = np.maximum(z, 0) if relu else z
    return outs


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loss_and_grads(layers: list[tuple[np.ndarray, np.ndarray, bool]], feats: np.ndarray, labels: np.ndarray,
                   teacher: np.ndarray | None = None, *, distill: float = 0.0, temperature: float = 2.0
                   ) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """Mean cross-entropy plus ``distill * T^2 * KL(softmax(teacher/T) || softmax(z[:, :k]/T))``
    (``k`` = the teacher's classes) and its gradients ``[(dW, db), ...]``, by hand. Works in the
    dtype it is given (the tests check it in float64 against finite differences)."""
    zs = forward(layers, feats)
    z = zs[-1]
    n = len(labels)
    p = _softmax(z)
    loss = float(-np.log(np.maximum(p[np.arange(n), labels], 1e-30)).mean())
    dz = p.copy()
    dz[np.arange(n), labels] -= 1
    if distill > 0 and teacher is not None:
        k, t = teacher.shape[1], temperature
        pt, qs = _softmax(teacher / t), _softmax(z[:, :k] / t)
        kl = (pt * (np.log(np.maximum(pt, 1e-30)) - np.log(np.maximum(qs, 1e-30)))).sum(axis=1).mean()
        loss += float(distill * t * t * kl)
        dz[:, :k] += distill * t * (qs - pt)
    dz /= n
    grads: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(len(layers) - 1, -1, -1):
        w, _, _ = layers[i]
        h_in = feats if i == 0 else (np.maximum(zs[i - 1], 0) if layers[i - 1][2] else zs[i - 1])
        grads.insert(0, (dz.T @ h_in, dz.sum(axis=0)))
        if i:
            dz = dz @ w
            if layers[i - 1][2]:
                dz = dz * (zs[i - 1] > 0)
    return loss, grads


class Optimizer:
    """SGD with momentum 0.9, or Adam (0.9, 0.999, eps 1e-8), over a list of arrays, in place."""

    def __init__(self, kind: str, lr: float, params: list[np.ndarray]) -> None:
        self.kind, self.lr, self.t = kind, lr, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params] if kind == "adam" else []

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.t += 1
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.kind == "sgd":
                self.m[i] = 0.9 * self.m[i] + g
                p -= self.lr * self.m[i]
            else:
                self.m[i] = 0.9 * self.m[i] + 0.1 * g
                self.v[i] = 0.999 * self.v[i] + 0.001 * g * g
                mh = self.m[i] / (1 - 0.9 ** self.t)
                vh = self.v[i] / (1 - 0.999 ** self.t)
                p -= (self.lr * mh / (np.sqrt(vh) + 1e-8)).astype(p.dtype)

    def grow(self, index: int, rows: int) -> None:
        """Parameter ``index`` gained ``rows`` rows (new classes): their state starts at zero."""
        for state in (self.m, self.v):
            if state:
                a = state[index]
                state[index] = np.concatenate([a, np.zeros((rows, *a.shape[1:]), a.dtype)])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.m, *self.v))


class HeadLearner:
    """Trains the tail of the ONNX classifier ``model_path`` (see the module doc).

    ``features(x)`` runs the backbone; ``fit(x, y)`` trains ``config.steps`` full-batch steps on
    the new samples together with everything in ``replay``; ``partial_fit(x, y)`` trains
    ``stream.stream_steps`` steps on them plus ``stream.replay_batch`` replay rows, then offers
    them to the buffer. Labels at or above the model's classes grow the last layer.
    """

    def __init__(self, model_path: str | Path, config: LearnConfig, *, replay: ReplayBuffer | None = None,
                 threads: int = 1, stream: StreamConfig | None = None) -> None:
        import onnx

        from edgekiln.runtime.head_split import find_tail, read_params

        self.path = Path(model_path)
        self.config, self.stream = config, stream or StreamConfig()
        self.replay, self.threads = replay, threads
        try:
            self.proto = onnx.load(str(self.path))
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and OSError alike
            raise EdgekilnError(f"{self.path}: not a readable ONNX model ({exc})") from None
        self.spec = find_tail(self.proto, scope=config.scope, model_name=self.path.name)
        self.old_classes = self.spec.num_classes
        p = read_params(self.proto, self.spec)
        self._w = [p[d.weight] for d in self.spec.layers]
        self._b = [p[d.bias] for d in self.spec.layers]
        self._initial = [(w.copy(), b.copy(), d.relu_after) for w, b, d in zip(self._w, self._b, self.spec.layers,
                                                                              strict=True)]
        self._opt: Optimizer | None = None
        self._rng = np.random.default_rng(config.seed)
        self._session: Any = None
        self._seen: list[np.ndarray] = []     # features trained on, for the int8 re-calibration
        self.trace_memory = True   # measure the peak bytes of a step with tracemalloc (see TRACE_EVERY)
        self.steps_done = 0
        self.last_step: dict[str, float] = {"ms": 0.0, "tracemalloc_peak_bytes": 0}

    @property
    def classes(self) -> int:
        return len(self._b[-1])

    def _layers(self) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        return [(w, b, d.relu_after) for w, b, d in zip(self._w, self._b, self.spec.layers, strict=True)]

    def features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(features at the cut, the deployed model's output)`` for the inputs ``x``."""
        if self._session is None:
            # NOTE: one optimized session with the cut exposed. On mnist_cnn int8 that costs 67 us
            # against 52 us for the model alone (a QDQ fusion is lost); exposing the QuantizeLinear
            # output instead measured the same 67 us, so the float DequantizeLinear output is used.
            from edgekiln.execution.ort import expose_tensors, ort_session

            self._session = ort_session(expose_tensors(self.proto, [self.spec.cut]), threads=self.threads)
            inp = self._session.get_inputs()[0]
            self._input, self._batch1 = inp.name, inp.shape[0] == 1
        x = np.asarray(x, np.float32)
        if self.spec.cut == self._input:   # the whole model is the tail: the input is the features
            return x.reshape(len(x), -1), self._session.run([self.spec.output], {self._input: x})[0].reshape(len(x), -1)
        names = [self.spec.output, self.spec.cut]
        if self._batch1 and len(x) != 1:
            parts = [self._session.run(names, {self._input: x[i:i + 1]}) for i in range(len(x))]
            logits, feats = (np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, 0), np.float32)
                             for k in (0, 1))
        else:
            logits, feats = self._session.run(names, {self._input: x})
        return feats.reshape(len(x), -1).astype(np.float32), logits.reshape(len(x), -1)

    def logits(self, feats: np.ndarray) -> np.ndarray:
        """The current tail's logits for features, in numpy."""
        return forward(self._layers(), np.asarray(feats, np.float32))[-1]

    def teacher(self, feats: np.ndarray) -> np.ndarray:
        """The deployed tail's logits (before any training), in numpy: the distillation target."""
        return forward(self._initial, np.asarray(feats, np.float32))[-1]

    def params(self) -> dict[str, np.ndarray]:
        """Copies of the current weights (``[out, in]``) and biases, keyed by initializer name."""
        out: dict[str, np.ndarray] = {}
        for d, w, b in zip(self.spec.layers, self._w, self._b, strict=True):
            out[d.weight], out[d.bias] = w.copy(), b.copy()
        return out

    def grow(self, classes: int, feats: np.ndarray | None = None, labels: np.ndarray | None = None) -> None:
        """Give the last layer ``classes`` outputs. A new class's row starts at the mean of its
        samples' last-layer inputs minus the mean over old data (replay, else the samples),
        scaled to the old rows' mean norm, its bias at the mean old bias; a class without
        samples starts at zero with the lowest old bias."""
        k = self.classes
        if classes <= k:
            return
        w, b = self._w[-1], self._b[-1]
        new_w = np.zeros((classes - k, w.shape[1]), np.float32)
        new_b = np.full(classes - k, b[:self.old_classes].min(), np.float32)
        if feats is not None and labels is not None and len(labels):
            h = self._last_inputs(feats)
            if self.replay is not None and len(self.replay):
                centre = self._last_inputs(self.replay.arrays()[0]).mean(axis=0)
            else:
                centre = h.mean(axis=0)
            # NOTE: scaled to the old rows' mean norm: unscaled, a class mean of features of norm
            # ~10 gave the new classes logits of ~100 and the first steps forgot the old ones.
            norm = float(np.linalg.norm(w[:self.old_classes], axis=1).mean())
            for c in range(k, classes):
                sel = labels == c
                if sel.any():
                    row = h[sel].mean(axis=0) - centre
                    new_w[c - k] = row * (norm / max(float(np.linalg.norm(row)), 1e-12))
                    new_b[c - k] = b[:self.old_classes].mean()
        self._w[-1] = np.concatenate([w, new_w])
        self._b[-1] = np.concatenate([b, new_b])
        if self._opt is not None:
            n = len(self._w)
            self._opt.grow(2 * n - 2, classes - k)
            self._opt.grow(2 * n - 1, classes - k)

    def _last_inputs(self, feats: np.ndarray) -> np.ndarray:
        if len(self._w) == 1:
            return feats
        zs = forward(self._layers()[:-1], feats)
        return np.maximum(zs[-1], 0) if self.spec.layers[-2].relu_after else zs[-1]

    def fit(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Train on ``(x, y)`` and all the replay rows; see :meth:`fit_features`."""
        return self.fit_features(self.features(x)[0], y)

    def fit_features(self, feats: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """``config.steps`` full-batch steps on the new features and the replay rows; returns
        ``{loss, steps, ms_per_step, peak_bytes}``."""
        y = _labels(y, len(feats))
        self._check_dim(feats)
        self.grow(int(y.max()) + 1 if len(y) else 0, feats, y)
        self._seen.append(feats)
        if self.replay is not None and len(self.replay):
            rf, ry = self.replay.arrays()
            feats, y = np.concatenate([feats, rf]), np.concatenate([y, ry])
        teacher = self.teacher(feats) if self.config.distill > 0 else None
        loss, timed, start = float("nan"), 0, time.perf_counter()
        for i in range(self.config.steps):
            traced = self.trace_memory and i == 0
            loss = self._step(feats, y, teacher, trace=traced)
            if traced:   # NOTE: a traced step is several times slower; the mean leaves it out
                start = time.perf_counter()
            else:
                timed += 1
        ms = (time.perf_counter() - start) * 1000.0 / timed if timed else self.last_step["ms"]
        return {"loss": loss, "steps": self.config.steps, "ms_per_step": ms,
                "peak_bytes": self.last_step["tracemalloc_peak_bytes"], "rows": len(y)}

    def partial_fit(self, x: np.ndarray | None, y: np.ndarray, *, feats: np.ndarray | None = None) -> dict[str, Any]:
        """``stream.stream_steps`` steps on the samples plus ``stream.replay_batch`` replay rows,
        then offer the samples to the replay buffer. ``feats`` skips the backbone."""
        if feats is None:
            feats = self.features(x)[0]
        y = _labels(y, len(feats))
        self._check_dim(feats)
        self.grow(int(y.max()) + 1 if len(y) else 0, feats, y)
        if sum(len(s) for s in self._seen) < 4096:
            self._seen.append(feats)
        loss = float("nan")
        for _ in range(self.stream.stream_steps):
            bf, by = feats, y
            if self.replay is not None and len(self.replay) and self.stream.replay_batch:
                rf, ry = self.replay.sample(self.stream.replay_batch, self._rng)
                bf, by = np.concatenate([feats, rf]), np.concatenate([y, ry])
            teacher = self.teacher(bf) if self.config.distill > 0 else None
            loss = self._step(bf, by, teacher, trace=self.trace_memory and self.steps_done % TRACE_EVERY == 0)
        if self.replay is not None:
            self.replay.add(feats, y)
        return {"loss": loss, "ms": self.last_step["ms"], "peak_bytes": self.last_step["tracemalloc_peak_bytes"]}

    def _check_dim(self, feats: np.ndarray) -> None:
        if feats.ndim != 2 or feats.shape[1] != self.spec.feature_dim:
            raise EdgekilnError(f"features have shape {list(feats.shape)}; the tail takes {self.spec.feature_dim}")

    def _step(self, feats: np.ndarray, y: np.ndarray, teacher: np.ndarray | None, *, trace: bool) -> float:
        import tracemalloc

        started = trace and not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        if trace:
            tracemalloc.reset_peak()
        t0 = time.perf_counter()
        loss, grads = loss_and_grads(self._layers(), feats, y, teacher, distill=self.config.distill,
                                     temperature=self.config.temperature)
        flat_g = [g for pair in grads for g in pair]
        if self.config.freeze_old:
            flat_g[-2][:self.old_classes] = 0
            flat_g[-1][:self.old_classes] = 0
        params = [p for pair in zip(self._w, self._b, strict=True) for p in pair]
        if self._opt is None:
            self._opt = Optimizer(self.config.optimizer, self.config.lr, params)
        self._opt.step(params, [g.astype(np.float32) for g in flat_g])
        ms = (time.perf_counter() - t0) * 1000.0
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
            if started:
                tracemalloc.stop()
            # NOTE: tracing slows a step several-fold: its time is kept only if no untraced one exists
            self.last_step = {"ms": self.last_step["ms"] or ms, "tracemalloc_peak_bytes": int(peak)}
        else:
            self.last_step = {"ms": ms, "tracemalloc_peak_bytes": self.last_step["tracemalloc_peak_bytes"]}
        self.steps_done += 1
        return loss

    def state_bytes(self) -> int:
        """Bytes held for learning: parameters, optimizer state and the replay rows."""
        return (sum(a.nbytes for a in (*self._w, *self._b)) + (self._opt.nbytes if self._opt else 0)
                + (self.replay.nbytes if self.replay is not None else 0))

    def calibration_features(self) -> np.ndarray:
        """What an int8 re-quantization calibrates on: the replay rows and the features trained on."""
        parts = [*self._seen]
        if self.replay is not None and len(self.replay):
            parts.append(self.replay.arrays()[0])
        return np.concatenate(parts) if parts else np.zeros((0, self.spec.feature_dim), np.float32)

    def to_proto(self) -> Any:
        """The model with the trained tail written in (re-quantized when int8)."""
        from edgekiln.runtime.head_split import write_params

        return write_params(self.proto, self.spec, self.params(), calib_features=self.calibration_features())

    def export(self, path: str | Path) -> Path:
        """Write the model with the trained tail to ``path`` (atomically)."""
        from edgekiln.fileio import atomic_save_onnx

        return atomic_save_onnx(path, self.to_proto())


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise EdgekilnError(f"{len(y)} labels for {n} samples")
    if y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise EdgekilnError(f"labels must be non-negative class indices, not {y.dtype} values")
    return y.astype(np.int64)
