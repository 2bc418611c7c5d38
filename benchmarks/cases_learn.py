"""On-device incremental learning (issue 25): numpy head training with torch absent, MNIST, seeds 0-2.

Per seed, mnist_cnn with 8 outputs is trained on digits 0-7 (the example's recipe), exported, and
made int8 QDQ by the quantize pass (ORT static, per channel). The device stream is 20 training
images each of 8 and 9 (drawn with seed 100 + s). Every learning method runs in a subprocess
(:mod:`benchmarks.learn_device`) whose ``import torch`` fails (a sitecustomize meta-path
blocker, as tests/unit/runtime/test_no_torch.py has), one thread, ``OMP_NUM_THREADS=1``:
``HeadLearner`` trains, ``export`` writes the ONNX file (an int8 head re-quantized), and that written file is what is evaluated on
the 1,000 held-out images. Replay buffers hold old-class training features (reservoir, float16
for fp32, int8 at the cut's scale for int8). The torch rows retrain the whole 10-class model on
all 0-7 training data plus the 40 samples (not on a device). Table 2 adapts to a rotated and
shifted stream (25-35 degrees, 2 px, 20 per class of 0-7). Table 3: the cost of features, and
one FedAvg round over heads of 5 devices (in process; the Flower wiring carries the same arrays).

    python -m benchmarks.suite --only learn
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.learn_device import CLASS_METHODS, KB, NEW, OLD, SHIFT_METHODS
from benchmarks.suite import CaseResult

TITLE = ("On-device incremental learning (numpy head training, no torch): new classes and domain shift on "
         "MNIST, seeds 0-2")
GATE = 0.01
# NOTE: the same meta-path blocker as tests/unit/runtime/test_no_torch.py (tests/ is not importable here).
BLOCKER = '''import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the benchmark)", name=name)
sys.meta_path.insert(0, _NoTorch())
'''
TORCH_ROWS = ("torch joint retrain (not on device)", "torch joint retrain, class-balanced (not on device)")


# ---- the host side: the device jobs, models, data, torch baselines, tables --------------------------

def run_device(jobs: list[dict[str, Any]], work: Path, *, isolate: bool) -> list[list[dict[str, Any]]]:
    """Run the jobs in subprocesses where torch cannot be imported (one per job when ``isolate``,
    so ΔVmHWM is that job's; else one for all); return each job's rows."""
    site = work / "no_torch_site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(root), str(root / "src")])}
    results: list[list[dict[str, Any]]] = []
    for i, batch in enumerate([[j] for j in jobs] if isolate else [jobs]):
        path, result = work / f"jobs{i}.json", work / f"jobs{i}.out.json"
        path.write_text(json.dumps({"jobs": batch, "result": str(result)}))
        done = subprocess.run([sys.executable, "-m", "benchmarks.learn_device", str(path)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"device jobs {i} failed:\n{done.stderr[-3000:]}")
        results.extend(json.loads(result.read_text()))
    return results


def jobs_for(model: Path, data: Path, out: Path, seed: int, kind: str, isolate: bool,
             settings: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One job per method when ``isolate`` (so ΔVmHWM is that method's), else one job for all."""
    methods = [asdict(m) for m in (CLASS_METHODS if kind == "class" else SHIFT_METHODS)]
    base = {"model": str(model), "data": str(data), "out": str(out), "seed": seed, "kind": kind, "isolated": isolate,
            **(settings or {})}
    if not isolate:
        return [{**base, "methods": methods}]
    return [{**base, "methods": [m]} for m in methods]


def write_data(out: Path, train: tuple[np.ndarray, np.ndarray], evals: tuple[np.ndarray, np.ndarray], seed: int,
               per_class: int = 20) -> tuple[Path, Path]:
    """``class.npz`` (old training data for replay, the 8/9 stream, the held-out images) and
    ``shift.npz`` (a rotated and shifted stream of 0-7, and the held-out 0-7 images both ways)."""
    from edgekiln.fileio import atomic_save_npz
    from edgekiln.testing.streams import rotate_shift

    (x, y), (ex, ey) = train, evals
    rng = np.random.default_rng(100 + seed)
    old = np.isin(y, OLD)

    def draw(classes: tuple[int, ...]) -> np.ndarray:
        return np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in classes])

    new = draw(NEW)
    cls = atomic_save_npz(out / "class.npz", old_x=x[old], old_y=y[old], new_x=x[new], new_y=y[new],
                          eval_x=ex, eval_y=ey)
    shifted, eo = draw(OLD), np.isin(ey, OLD)
    shift = atomic_save_npz(out / "shift.npz", old_x=x[old], old_y=y[old],
                            new_x=rotate_shift(x[shifted], (25, 35), 2.0, seed=200 + seed), new_y=y[shifted],
                            eval_x=ex[eo], eval_y=ey[eo], shift_eval_x=rotate_shift(ex[eo], (25, 35), 2.0, seed=300 + seed),
                            shift_eval_y=ey[eo])
    return Path(cls), Path(shift)


def mnist_base(seed: int, out: Path, epochs: int) -> dict[str, Any]:
    """Train mnist_cnn with 8 outputs on 0-7, export it, quantize it; the data files; the torch rows."""
    import torch

    from edgekiln.fileio import atomic_save_npz
    from edgekiln.models import zoo
    from edgekiln.models.datasets import load_dataset
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.models.training import train_classifier
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    out.mkdir(parents=True, exist_ok=True)
    s = load_dataset("mnist", seed=seed)
    old = np.isin(s.train_y, OLD)
    torch.manual_seed(seed)
    model = zoo.mnist_cnn(num_classes=8)
    start = time.perf_counter()
    train_classifier(model, s.train_x[old], s.train_y[old], epochs=epochs, lr=2e-3, seed=seed, quiet=True,
                     augment=True)
    base_seconds = time.perf_counter() - start
    export_to_onnx(model, (1, 1, 28, 28), out / "fp32.onnx", input_name="input", output_name="logits")
    calib = atomic_save_npz(out / "calib.npz", x=s.calib_x[np.isin(s.calib_y, OLD)])
    quantize_model(out / "fp32.onnx", QuantizeConfig(scheme="int8"), out / "int8", calib=calib)
    cls, shift = write_data(out, (s.train_x, s.train_y), (s.eval_x, s.eval_y), seed)
    with np.load(cls) as f:
        new_x, new_y = f["new_x"], f["new_y"]
    rows = [torch_retrain(seed, (s.train_x[old], s.train_y[old]), (new_x, new_y), (s.eval_x, s.eval_y), epochs,
                          balanced) for balanced in (False, True)]
    return {"seed": seed, "fp32": out / "fp32.onnx", "int8": out / "int8" / "model.onnx", "class": cls,
            "shift": shift, "torch": rows, "base_train_seconds": round(base_seconds, 1)}


def torch_retrain(seed: int, old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray],
                  evals: tuple[np.ndarray, np.ndarray], epochs: int, balanced: bool) -> dict[str, Any]:
    """The 10-class model retrained from scratch on all 0-7 training data plus the 40 samples; with
    ``balanced`` the 40 are repeated to the mean old class size (oversampling)."""
    import torch

    from edgekiln.models import zoo
    from edgekiln.models.training import predict, train_classifier

    reps = max(1, round(len(old[1]) / len(OLD) / (len(new[1]) / len(NEW)))) if balanced else 1
    x = np.concatenate([old[0], *[new[0]] * reps])
    y = np.concatenate([old[1], *[new[1]] * reps])
    torch.manual_seed(seed)
    model = zoo.mnist_cnn(num_classes=10)
    start = time.perf_counter()
    train_classifier(model, x, y, epochs=epochs, lr=2e-3, seed=seed, quiet=True, augment=True)
    seconds = time.perf_counter() - start
    pred = predict(model, evals[0]).argmax(1)
    o = np.isin(evals[1], OLD)
    return {"method": TORCH_ROWS[int(balanced)], "seed": seed, "acc_old_after": float((pred[o] == evals[1][o]).mean()),
            "acc_new_after": float((pred[~o] == evals[1][~o]).mean()), "seconds": round(seconds, 1),
            "oversampling": reps}


def run(bases: list[dict[str, Any]], work: Path, *, isolate: bool, steps: int = 100,
        timing_runs: int = 300) -> dict[str, Any]:
    """The device jobs of every base (seed): class-incremental on fp32 and int8, domain shift and
    the federated round on fp32. ``steps``/``timing_runs``: fewer for a smoke run."""
    settings = {"steps": steps, "timing_runs": timing_runs}
    raw: dict[str, Any] = {"class": [], "shift": [], "features": [], "federated": [], "activation": [], "torch": [],
                           "torch_loaded": []}
    for b in bases:
        seed, out = b["seed"], work / f"seed{b['seed']}"
        jobs, tags = [], []
        for variant in ("fp32", "int8"):
            for job in jobs_for(b[variant], b["class"], out / variant, seed, "class", isolate, settings):
                jobs.append(job)
                tags.append(("class", variant))
        for job in jobs_for(b["fp32"], b["shift"], out / "shift", seed, "shift", isolate, settings):
            jobs.append(job)
            tags.append(("shift", "fp32"))
        jobs.append({"model": str(b["fp32"]), "data": str(b["class"]), "out": str(out / "fed"), "seed": seed,
                     "kind": "federated", **settings})
        tags.append(("federated", "fp32"))
        for (kind, variant), rows in zip(tags, run_device(jobs, out, isolate=isolate), strict=True):
            for row in rows:
                key = {"_features": "features", "_torch_loaded": "torch_loaded", "_federated": "federated",
                       "_activation": "activation"}.get(row["method"], kind)
                raw[key].append({**row, "variant": variant})
        raw["torch"].extend(b.get("torch", []))
    return raw


def _stat(values: list[float], fmt: str = "{:.3f}") -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]  # None: not measured
    if not v:
        return "-"
    if len(v) == 1 or min(v) == max(v):
        return fmt.format(np.mean(v))
    return f"{fmt.format(np.mean(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def _group(rows: list[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _peaks(rows: list[dict[str, Any]]) -> str:
    hwm = [r["vmhwm_delta_bytes"] / KB for r in rows if r["vmhwm_delta_bytes"] is not None]
    return (f"{_stat([r['tracemalloc_peak_bytes'] / KB for r in rows], '{:.0f}')} KiB / "
            + (f"{_stat(hwm, '{:.0f}')} KiB" if hwm else "- (not run alone)"))


def class_table(raw: dict[str, Any]) -> str:
    from edgekiln.report import md_table

    before = {(r["variant"], r["seed"]): r["acc_old"] for r in raw["class"]}
    body = []
    for (variant, method), rows in _group(raw["class"], "variant", "method").items():
        if any("refused" in r for r in rows):
            body.append([variant, method, f"refused: {next(r['refused'] for r in rows if 'refused' in r)}",
                         *["-"] * 6])
            continue
        drops = [before[(variant, r["seed"])] - r["acc_old_after"] for r in rows]
        timed = "step_ms_p50" in rows[0]
        body.append([
            variant, method, _stat([r["acc_new_after"] for r in rows]), _stat([r["acc_old_after"] for r in rows]),
            _stat([d * 100 for d in drops], "{:.2f}"), f"{sum(d <= GATE for d in drops)}/{len(rows)}",
            f"{_stat([r['step_ms_p50'] for r in rows], '{:.2f}')} / {_stat([r['step_ms_p90'] for r in rows], '{:.2f}')}"
            if timed else "-",
            _peaks(rows) if timed else "-",
            f"{_stat([r['state_bytes'] / KB for r in rows], '{:.0f}')} KiB"
            f" (replay {_stat([r['replay_bytes'] / KB for r in rows], '{:.0f}')})" if timed else "-"])
    for (method,), rows in _group(raw["torch"], "method").items():
        drops = [before[("fp32", r["seed"])] - r["acc_old_after"] for r in rows]
        body.append(["fp32 (torch)", method, _stat([r["acc_new_after"] for r in rows]),
                     _stat([r["acc_old_after"] for r in rows]), _stat([d * 100 for d in drops], "{:.2f}"),
                     f"{sum(d <= GATE for d in drops)}/{len(rows)}",
                     f"{_stat([r['seconds'] for r in rows], '{:.1f}')} s whole retrain", "-", "-"])
    return md_table(["variant", "method", "acc 8/9", "acc 0-7", "drop on 0-7 (points)",
                     f"passes the {GATE:.0%} gate (seeds)", "ms per update step p50 / p90",
                     "peak (tracemalloc / ΔVmHWM)", "state bytes"], body)


def shift_table(raw: dict[str, Any]) -> str:
    from edgekiln.report import md_table

    body = []
    for (method,), rows in _group(raw["shift"], "method").items():
        if any("refused" in r for r in rows):
            body.append([method, f"refused: {next(r['refused'] for r in rows if 'refused' in r)}", *["-"] * 4])
            continue
        drops = [r["original"] - r["original_after"] for r in rows]
        gains = [r["shifted_after"] - r["shifted"] for r in rows]
        body.append([method, _stat([r["shifted"] for r in rows]), _stat([r["shifted_after"] for r in rows]),
                     _stat([r["original"] for r in rows]), _stat([r["original_after"] for r in rows]),
                     f"{sum(d <= GATE and g > 0 for d, g in zip(drops, gains, strict=True))}/{len(rows)}"])
    return md_table(["method (fp32)", "shifted before", "shifted after", "original before", "original after",
                     f"gate: shifted up, original down <= {GATE:.0%} (seeds)"], body)


def cost_table(raw: dict[str, Any]) -> str:
    from edgekiln.report import md_table

    body = [[f"one sample through the {variant} model: alone / with the cut exposed (µs, median)",
             f"{_stat([r['alone_us'] for r in rows], '{:.0f}')} / {_stat([r['features_us'] for r in rows], '{:.0f}')}"]
            for (variant,), rows in _group(raw["features"], "variant").items()]
    for r in raw["federated"][:1]:
        body.append(["uplink per device and round: int8 head delta / float32 head delta / whole float32 model",
                     f"{r['uplink_int8_bytes']:,} B / {r['uplink_float_bytes']:,} B / {r['whole_model_float_bytes']:,} B"])
    if raw["federated"]:
        f = raw["federated"]
        body.append([f"one FedAvg round over heads, {f[0]['devices']} devices x 8 samples, 256 KB replay, int8 "
                     "uplink: acc 8/9, acc 0-7",
                     f"{_stat([r['acc_new'] for r in f])}, {_stat([r['acc_old'] for r in f])}"])
    act = [r for r in raw["activation"] if "adapt_s" in r]
    if act:
        body.append([f"one gated adaptation of a bundle (features, {act[0]['steps']} steps, candidate written, gate "
                     "on the written file, health check; before the A/B switch), s; accepted by the 1% gate",
                     f"{_stat([r['adapt_s'] for r in act], '{:.2f}')}; {sum(r['accepted'] for r in act)}/{len(act)}"])
    for r in raw["activation"]:
        if "refused" in r:
            body.append([f"gated adaptation of a bundle, seed {r['seed']}", f"refused: {r['refused']}"])
    body.append(["torch imported by any device job", str(any(r["torch"] for r in raw["torch_loaded"]))])
    return md_table(["measure", "value"], body)


def findings(raw: dict[str, Any]) -> str:
    """What table 1 says, from its numbers: which methods keep 0-7 within the budget on every seed,
    and how the torch retrains compare with the best of them on 8/9."""
    before = {(r["variant"], r["seed"]): r["acc_old"] for r in raw["class"]}
    within, new_acc = [], {}
    for (variant, method), rows in _group(raw["class"], "variant", "method").items():
        if any("refused" in r for r in rows) or "step_ms_p50" not in rows[0]:
            continue
        if all(before[(variant, r["seed"])] - r["acc_old_after"] <= GATE for r in rows):
            within.append(f"{method} ({variant})")
            new_acc[f"{method} ({variant})"] = float(np.mean([r["acc_new_after"] for r in rows]))
    text = [f"Within the {GATE:.0%} budget on 0-7 on every seed: " + ("; ".join(within) or "no on-device method")
            + "."]
    if new_acc:
        best = max(new_acc, key=new_acc.__getitem__)
        text.append(f"The best of them on 8/9: {best}, {new_acc[best]:.3f}.")
    for (method,), rows in _group(raw["torch"], "method").items():
        text.append(f"{method}: 8/9 {np.mean([r['acc_new_after'] for r in rows]):.3f}.")
    if raw["torch"]:
        text.append("The torch rows retrain the whole model on all 0-7 training data plus the 40 samples "
                    "(class-balanced: the 40 repeated up to the mean old class size); with 20 samples per new "
                    "class they are a reference, not an upper bound.")
    return " ".join(text)


def markdown(raw: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in raw["class"]})
    return "\n".join([
        f"mnist_cnn with 8 outputs trained on digits 0-7; on the device, 20 training images each of 8 and 9 are "
        f"added; held-out: the eval split's images. Seeds {', '.join(map(str, seeds))}: mean (min-max). Learning "
        "runs in subprocesses where `import torch` fails, one thread; the written ONNX file (int8 head "
        "re-quantized) is what is evaluated. Adam, 100 full-batch steps, lr 3e-3 (last block 1e-3); new rows "
        "start at the centred class mean. Replay: reservoir of old-class training features (float16; int8 at "
        "the cut's scale for int8). Peak: tracemalloc peak of one update step / rise of the process's VmHWM "
        "from building the learner (its onnxruntime session included) to the end of training, each method "
        "alone in its process. ms per step: the mean of the 100 steps (both columns) for batch rows, p50 / p90 "
        "of the 80 steps for streaming. State bytes: head, optimizer state and replay.", "",
        "**Table 1: new classes 8 and 9.**", "", class_table(raw), "",
        findings(raw), "",
        "**Table 2: domain shift** (a stream of 20 images per class of 0-7 rotated 25-35 degrees either way "
        "and moved 2 px; held-out 0-7 images shifted the same way and as they are).", "", shift_table(raw), "",
        "**Table 3: costs and the federated hook.**", "", cost_table(raw), "",
        "Not measured here: `export --to c --trainable-head` (microcontrollers) is not built.",
    ])


def learn(work: Path, quick: bool) -> CaseResult:
    """The suite's entry: ``python -m benchmarks.suite --only learn``."""
    import shutil

    if work.exists():
        shutil.rmtree(work)
    seeds, epochs = ((0,), 2) if quick else ((0, 1, 2), 15)
    bases = [mnist_base(seed, work / f"base{seed}", epochs) for seed in seeds]
    raw = run(bases, work / "device", isolate=not quick)
    raw.update({"seeds": list(seeds), "epochs": epochs, "load_average": os.getloadavg(),
                "base_train_seconds": [b["base_train_seconds"] for b in bases]})
    return CaseResult("learn", TITLE, markdown(raw), raw)
