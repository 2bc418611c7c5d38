"""The device side of the `learn` benchmark case (:mod:`benchmarks.cases_learn`): runs in a subprocess
whose ``import torch`` fails. Each job trains the methods on one model with the numpy learner,
writes the model with ``HeadLearner.export`` (an int8 head re-quantized) and evaluates that file.

    python -m benchmarks.learn_device JOBS.json     (JOBS.json: {"jobs": [...], "result": PATH})
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KB = 1024
OLD, NEW = tuple(range(8)), (8, 9)


@dataclass(frozen=True)
class Method:
    """One row: what trains and with what protection against forgetting."""

    label: str
    scope: str = "head"
    replay: int = 0            # replay buffer bytes (0: none)
    distill: float = 0.0
    freeze_old: bool = False
    lr: float = 3e-3
    stream: bool = False       # partial_fit one sample at a time (what Runtime.learn runs), 2 passes
    train: bool = True         # False: the deployed model as it is


CLASS_METHODS = (
    Method("no adaptation", train=False),
    Method("head, CE"),
    Method("head + distillation", distill=1.0),
    Method("head + replay 64 KB", replay=64 * KB),
    Method("head + replay 64 KB + distillation", replay=64 * KB, distill=1.0),
    Method("head + replay 256 KB + distillation", replay=256 * KB, distill=1.0),
    Method("head, old rows frozen, replay 256 KB + distillation", replay=256 * KB, distill=1.0, freeze_old=True),
    Method("last block + replay 256 KB + distillation", scope="last-block", replay=256 * KB, distill=1.0, lr=1e-3),
    Method("streaming partial_fit (Runtime.learn), replay 256 KB", replay=256 * KB, stream=True),
)


SHIFT_METHODS = (
    Method("before (deployed)", train=False),
    Method("head, no replay"),
    Method("head + replay 64 KB", replay=64 * KB),
    Method("head + replay 256 KB + distillation", replay=256 * KB, distill=1.0),
    Method("last block, no replay", scope="last-block", lr=1e-3),
    Method("last block + replay 64 KB", scope="last-block", replay=64 * KB, lr=1e-3),
)


def _status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm() -> int:
    """Reset the process's peak RSS to its current RSS (``/proc/self/clear_refs`` 5); return that RSS.

    NOTE: without it VmHWM keeps the peak of computing the replay features before the learner is built."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from edgekiln.execution.ort import ort_session

    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
    return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")


def _replay(feats: np.ndarray, spec: Any, nbytes: int, y: np.ndarray, seed: int) -> Any:
    """A reservoir of ``nbytes`` over the old-class features (int8 at the cut's scale for an int8 model)."""
    from edgekiln.runtime.replay import ReplayBuffer

    if nbytes == 0:
        return None
    q = spec.cut_q
    storage, qparams = ("float16", None) if q is None else (
        "int8", (float(np.asarray(q.scale).reshape(-1)[0]), int(np.asarray(q.zero_point).reshape(-1)[0])))
    buf = ReplayBuffer(nbytes, feats.shape[1], storage=storage, qparams=qparams, seed=seed)
    buf.add(feats, y)
    return buf


def _old_features(model: Path, cfg: Any, x: np.ndarray, cache: dict[str, Any]) -> tuple[Any, np.ndarray]:
    """``(spec, features of the old training data)`` at ``cfg.scope``'s cut, computed once per scope."""
    from edgekiln.runtime.learner import HeadLearner

    if cfg.scope not in cache:
        probe = HeadLearner(model, cfg, threads=1)
        cache[cfg.scope] = (probe.spec, probe.features(x)[0])
    return cache[cfg.scope]


def _train_and_eval(m: Method, model: Path, d: dict[str, np.ndarray], job: dict[str, Any],
                    cache: dict[str, Any]) -> dict[str, Any]:
    """Train one method on the stream, export the model, evaluate the written file."""
    from edgekiln.runtime.learner import HeadLearner, LearnConfig, StreamConfig

    seed, out = int(job["seed"]), Path(job["out"])
    cfg = LearnConfig(scope=m.scope, lr=m.lr, distill=m.distill, freeze_old=m.freeze_old, seed=seed,
                      steps=int(job.get("steps", 100)))
    spec, feats = _old_features(model, cfg, d["old_x"], cache)
    replay = _replay(feats, spec, m.replay, d["old_y"], seed)
    rss = _reset_hwm()
    learner = HeadLearner(model, cfg, replay=replay, threads=1, stream=StreamConfig())
    steps_ms, peaks = [], []
    if m.stream:
        rng = np.random.default_rng(seed)
        for _ in range(2):
            for i in rng.permutation(len(d["new_y"])):
                r = learner.partial_fit(d["new_x"][i:i + 1], d["new_y"][i:i + 1])
                steps_ms.append(r["ms"])
                peaks.append(r["peak_bytes"])
    else:
        # NOTE: fit times its steps together: the p50 and p90 of a batch row are both the mean step.
        r = learner.fit(d["new_x"], d["new_y"])
        steps_ms.append(r["ms_per_step"])
        peaks.append(r["peak_bytes"])
    hwm = _status_bytes("VmHWM")
    path = learner.export(out / f"{m.label.replace(' ', '_').replace(',', '')}.onnx")
    after = _eval(Path(path), d, job["kind"])
    return {**{k + "_after": v for k, v in after.items()},
            "step_ms_p50": float(np.percentile(steps_ms, 50)), "step_ms_p90": float(np.percentile(steps_ms, 90)),
            "tracemalloc_peak_bytes": int(max(peaks)),
            # NOTE: measured only when the method ran alone in its process.
            "vmhwm_delta_bytes": max(0, hwm - rss) if job.get("isolated") else None,
            "state_bytes": int(learner.state_bytes()),
            "replay_bytes": int(replay.nbytes) if replay is not None else 0, "replay_capacity": m.replay}


def device_rows(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method of ``job`` on one model: train, export, evaluate the written file (torch-free)."""
    if job["kind"] == "federated":
        return [federated_round(job), activation(job), {"method": "_torch_loaded", "torch": "torch" in sys.modules}]

    from edgekiln.errors import EdgekilnError

    model, out, seed = Path(job["model"]), Path(job["out"]), int(job["seed"])
    out.mkdir(parents=True, exist_ok=True)
    with np.load(job["data"]) as f:
        d = {k: f[k] for k in f.files}
    before = _eval(model, d, job["kind"])
    rows, cache = [], {}
    for m in (Method(**m) for m in job["methods"]):
        row: dict[str, Any] = {"method": m.label, "seed": seed, **before}
        if not m.train:
            rows.append({**row, **{k + "_after": v for k, v in before.items()}})
            continue
        try:
            rows.append({**row, **_train_and_eval(m, model, d, job, cache)})
        except EdgekilnError as exc:   # a tail the learner refuses is a result to show, not a crash
            rows.append({**row, "refused": str(exc)})
    with contextlib.suppress(EdgekilnError):   # a refused tail: the refusal is in the method rows
        rows.append({"method": "_features", **_feature_cost(model, d["eval_x"][:1], int(job.get("timing_runs", 300)))})
    rows.append({"method": "_torch_loaded", "torch": "torch" in sys.modules})
    return rows


def _eval(model: Path, d: dict[str, np.ndarray], kind: str) -> dict[str, float]:
    if kind == "shift":
        return {"shifted": _accuracy(model, d["shift_eval_x"], d["shift_eval_y"]),
                "original": _accuracy(model, d["eval_x"], d["eval_y"])}
    old = np.isin(d["eval_y"], OLD)
    return {"acc_old": _accuracy(model, d["eval_x"][old], d["eval_y"][old]),
            "acc_new": _accuracy(model, d["eval_x"][~old], d["eval_y"][~old])}


def _feature_cost(model: Path, x1: np.ndarray, runs: int) -> dict[str, float]:
    """Median µs of one sample: the model alone, and the learner's session with the cut exposed."""
    from edgekiln.execution.ort import ort_session
    from edgekiln.runtime.learner import HeadLearner, LearnConfig

    sess = ort_session(model)
    name = sess.get_inputs()[0].name
    learner = HeadLearner(model, LearnConfig(), threads=1)

    def median_us(fn: Any) -> float:
        for _ in range(max(3, runs // 10)):
            fn()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e6)

    return {"alone_us": median_us(lambda: sess.run(None, {name: x1})),
            "features_us": median_us(lambda: learner.features(x1))}


def federated_round(job: dict[str, Any], devices: int = 5) -> dict[str, Any]:
    """One FedAvg round over heads: each device trains on its share of the stream (with the 256 KB
    replay), sends int8 head deltas; the mean is written into the model and evaluated."""
    import onnx

    from edgekiln.federated.head_fedavg import decode_head, encode_head, fedavg_heads, payload_bytes
    from edgekiln.runtime.head_split import write_params
    from edgekiln.runtime.learner import HeadLearner, LearnConfig

    model, seed = Path(job["model"]), int(job["seed"])
    with np.load(job["data"]) as f:
        d = {k: f[k] for k in f.files}
    proto = onnx.load(str(model))
    cfg = LearnConfig(distill=1.0, seed=seed, steps=int(job.get("steps", 100)))
    probe = HeadLearner(model, cfg, threads=1)
    spec, base = probe.spec, {k: np.array(v, np.float32) for k, v in probe.params().items()}
    replay = _replay(probe.features(d["old_x"])[0], spec, 256 * KB, d["old_y"], seed)
    shares = [np.concatenate([np.flatnonzero(d["new_y"] == c)[i::devices] for c in NEW]) for i in range(devices)]
    payloads, weights, calib = [], [], [replay.arrays()[0]]
    for idx in shares:
        learner = HeadLearner(model, cfg, replay=replay, threads=1)
        learner.fit(d["new_x"][idx], d["new_y"][idx])
        payloads.append(encode_head(learner.params(), base, compress="int8"))
        weights.append(len(idx))
        calib.append(learner.features(d["new_x"][idx])[0])
    heads = [decode_head(p, base) for p in payloads]
    mean = {k: v.astype(np.float32) for k, v in fedavg_heads(heads, weights).items()}
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fedavg_heads.onnx"
    path.write_bytes(write_params(proto, spec, mean, calib_features=np.concatenate(calib)).SerializeToString())
    whole = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer)
    float_payload = encode_head(heads[0], base)
    return {"method": "_federated", "seed": seed, "devices": devices, **_eval(path, d, "class"),
            "uplink_int8_bytes": payload_bytes(payloads[0]), "uplink_float_bytes": payload_bytes(float_payload),
            "whole_model_float_bytes": whole}



def activation(job: dict[str, Any]) -> dict[str, Any]:
    """Seconds of one gated adaptation of a bundle (``adapt_bundle``: features, training, writing the
    candidate bundle, the gate on the written file and the health check), the path ``edgekiln learn``
    takes before the A/B slot switch; the bundle is built with ``--learn-data`` (256 KB replay)."""
    from edgekiln.errors import EdgekilnError
    from edgekiln.fileio import atomic_save_npz, atomic_write_json
    from edgekiln.runtime.adapt import adapt_bundle
    from edgekiln.runtime.bundle import LearnData, build_bundle
    from edgekiln.runtime.learner import GateConfig, LearnConfig

    out = Path(job["out"]) / "activation"
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    with np.load(job["data"]) as f:
        d = {k: f[k] for k in f.files}
    (run / "model.onnx").write_bytes(Path(job["model"]).read_bytes())
    old = np.isin(d["eval_y"], OLD)
    atomic_save_npz(run / "eval.npz", x=d["eval_x"][old], y=d["eval_y"][old])
    atomic_write_json(run / "report.json", {"artifact": "model.onnx", "metric": 0.0, "latency_ms": 0.1})
    train = atomic_save_npz(out / "train.npz", x=d["old_x"], y=d["old_y"])
    start = time.perf_counter()
    build_bundle([run], out / "bundle", learn=LearnData(data=Path(train)))
    bundle_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        res = adapt_bundle(out / "bundle", d["new_x"], d["new_y"], learn=LearnConfig(distill=1.0, seed=int(job["seed"]),
                           steps=int(job.get("steps", 100))), gate=GateConfig(), new_classes=NEW, out=out / "adapted")
    except EdgekilnError as exc:
        return {"method": "_activation", "seed": job["seed"], "refused": str(exc)}
    return {"method": "_activation", "seed": job["seed"], "bundle_s": bundle_s, "steps": int(job.get("steps", 100)),
            "adapt_s": time.perf_counter() - start, "accepted": bool(res.accepted),
            "old_drop": res.metrics.get("old_drop"), "reasons": list(res.reasons)}


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["result"]).write_text(json.dumps([device_rows(job) for job in spec["jobs"]]))
