"""Build a deployment bundle from run folders (`edgekiln bundle DIR1 DIR2 ... --out BUNDLE`).

Each run folder contributes one variant: its model (:meth:`edgekiln.models.run_folder.RunFolder.read`),
the metric and measured latency its report gives, and its provenance. The
bundle also carries a few sample inputs and the default variant's outputs on them, which the
update agent's health check compares against after installing.

A run folder of ``edgekiln place`` (it holds ``placement.json``) also brings its segment files:
they are copied to ``placement/VARIANT/`` and the manifest's top-level ``placements`` names
them, so the runtime runs that variant as its chain. The variant's whole file is kept (older
runtimes run it), and the samples' expected outputs come from it, so the health check compares
the chain against the whole model.

With ``learn_data`` (an npz with ``x`` and integer labels ``y``, e.g. the run's training data)
every variant also gets what learning on the device needs (:mod:`edgekiln.runtime.adapt`):
``learn/VARIANT/replay.npz``, a replay buffer of at most ``replay_bytes`` of that variant's
features at the tail's cut (int8 rows for an int8 variant, exact), and
``learn/VARIANT/holdout.npz``, ``holdout_per_class`` features per class from the eval data,
which the gate checks forgetting on and nothing trains on. The manifest's top-level ``learn``
names them.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.manifest import MANIFEST_NAME, Manifest, TensorSpec, Variant, load_manifest, sha256_of

PLACEMENT_FILE = "placement.json"   # what `edgekiln place --out RUN` writes (targets/place_io.FILE)


@dataclass(frozen=True, kw_only=True)
class LearnData:
    """What ``--learn-data`` puts in a bundle: the labelled training npz the replay buffer is
    sampled from, its size in bytes, the tail scope whose features it holds, and how many
    held-out eval features per class the gate gets."""

    data: Path
    replay_bytes: int = 256 * 1024
    scope: str = "head"
    holdout_per_class: int = 25


def build_bundle(run_dirs: list[str | Path], out: str | Path, *, name: str = "model", version: str = "1",
                 default: str | None = None, samples: int = 4, learn: LearnData | None = None) -> Manifest:
    """Write the bundle folder ``out`` atomically (built beside it, then renamed into place)."""
    if not run_dirs:
        raise EdgekilnError("bundle: give at least one run folder")
    out = Path(out)
    if out.exists():
        raise EdgekilnError(f"{out}: already exists; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        variants, sample_src = [], None
        used: set[str] = set()
        placements: dict[str, str] = {}
        learn_files: dict[str, dict[str, Any]] = {}
        for run in run_dirs:
            variant, data = _variant_from_run(Path(run), staging, used)
            variants.append(variant)
            sample_src = sample_src or data
            if (Path(run) / PLACEMENT_FILE).is_file():
                placements[variant.name] = _copy_placement(Path(run), staging, variant)
            if learn is not None:
                learn_files[variant.name] = _learn_files(staging, variant, learn, data)
        default = default or variants[0].name
        inputs, outputs, sample_in, sample_out = _io_and_samples(staging, variants, default, sample_src, samples)
        manifest = Manifest(name=name, version=str(version),
                            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                            inputs=inputs, outputs=outputs, variants=tuple(variants), default_variant=default,
                            sample_inputs=sample_in, sample_outputs=sample_out, placements=placements,
                            learn=learn_files)
        Manifest.from_dict(manifest.to_dict())  # the same validation a device applies
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        load_manifest(staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _variant_from_run(run: Path, staging: Path, used: set[str]) -> tuple[Variant, Path | None]:
    from edgekiln.models.run_folder import RunFolder, precision_of

    folder = RunFolder(run)
    report = folder.report()
    art = folder.read()
    if art.path.suffix != ".onnx":
        raise EdgekilnError(f"{run}: the run folder's model {art.path.name} is not an ONNX file")
    precision = precision_of(art.kind)
    name = precision if precision not in used else f"{precision}-{len(used)}"
    used.add(name)
    dest = f"models/{name}.onnx"
    (staging / "models").mkdir(exist_ok=True)
    shutil.copyfile(art.path, staging / dest)
    metric, latency = _metric_and_latency(report)
    provenance = tuple(art.provenance) or (({"pass": report["command"], "config": {}},) if report.get("command")
                                           else ())
    variant = Variant(name=name, file=dest, sha256=sha256_of(staging / dest), precision=precision,
                      size_bytes=(staging / dest).stat().st_size, metric=metric,
                      metric_name=report.get("metric_name") or ("accuracy" if "accuracy" in report else None),
                      latency_ms=latency, macs=_macs(report), provenance=provenance)
    return variant, art.data.get("eval")


def _learn_files(staging: Path, variant: Variant, learn: LearnData, eval_data: Path | None) -> dict[str, Any]:
    """Write ``learn/VARIANT/replay.npz`` and ``holdout.npz`` (see the module doc); return the entry."""
    from edgekiln.fileio import atomic_save_npz
    from edgekiln.runtime.learner import HeadLearner, LearnConfig
    from edgekiln.runtime.replay import ReplayBuffer

    x, y = _labelled(learn.data)
    learner = HeadLearner(staging / variant.file, LearnConfig(scope=learn.scope))
    spec = learner.spec
    int8 = spec.cut_q is not None and np.asarray(spec.cut_q.zero_point).dtype == np.int8
    qparams = ((float(np.asarray(spec.cut_q.scale).reshape(-1)[0]), int(np.asarray(spec.cut_q.zero_point).reshape(-1)[0]))
               if int8 and spec.cut_q is not None else None)
    replay = ReplayBuffer(learn.replay_bytes, spec.feature_dim, storage="int8" if int8 else "float16",
                          qparams=qparams, seed=0)
    for start in range(0, len(y), 256):
        replay.add(learner.features(x[start:start + 256])[0], y[start:start + 256])
    hx, hy = np.zeros((0, spec.feature_dim), np.float32), np.zeros(0, np.int16)
    if eval_data is not None:
        ex, ey = _labelled(eval_data, required=False)
        if ey is not None:
            keep = np.sort(np.concatenate([np.flatnonzero(ey == c)[:learn.holdout_per_class] for c in np.unique(ey)]))
            hx, hy = learner.features(ex[keep])[0], ey[keep].astype(np.int16)
    rel = PurePosixPath("learn") / variant.name
    replay.save(staging / Path(*rel.parts) / "replay.npz")
    atomic_save_npz(staging / Path(*rel.parts) / "holdout.npz", x=hx, y=hy)
    return {"cut": spec.cut, "scope": learn.scope, "replay": str(rel / "replay.npz"),
            "holdout": str(rel / "holdout.npz"), "classes": spec.num_classes, "storage": replay.storage}


def _labelled(path: Path, *, required: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` and integer ``y`` of an npz (``y`` None when absent and not ``required``)."""
    from edgekiln.execution.feeds import load_npz

    data = load_npz(path)
    if "x" not in data:
        raise EdgekilnError(f"{path}: has no array x (arrays: {', '.join(data) or 'none'})")
    y = data.get("y")
    if y is None or np.asarray(y).dtype.kind not in "iu" or len(y) != len(data["x"]):
        if required:
            raise EdgekilnError(f"{path}: needs integer class labels y, one per row of x")
        return np.asarray(data["x"]), None
    return np.asarray(data["x"], np.float32), np.asarray(y).reshape(-1).astype(np.int64)


def _copy_placement(run: Path, staging: Path, variant: Variant) -> str:
    """Copy ``run/placement.json`` and its segment files to ``placement/VARIANT/``; return the
    json's bundle path. Refuses a placement of another model, or segment files that changed."""
    from edgekiln.runtime.manifest import safe_member

    src = run / PLACEMENT_FILE
    try:
        data = json.loads(src.read_text())
        segments = [(str(s["file"]), str(s["sha256"])) for s in data["segments"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise EdgekilnError(f"{src}: not a placement ({type(exc).__name__}: {exc})") from None
    model_sha = data.get("model_sha256")
    if model_sha and model_sha != variant.sha256:
        raise EdgekilnError(f"{src}: placed a model with SHA-256 {str(model_sha)[:12]}..., but the run folder's "
                            f"model is {variant.sha256[:12]}...")
    dest = PurePosixPath("placement") / variant.name
    for rel, digest in segments:
        file = safe_member(run, rel)
        if not file.is_file() or sha256_of(file) != digest:
            raise EdgekilnError(f"{src}: segment file {rel} is missing or does not match its SHA-256")
        target = safe_member(staging, str(dest / rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    (staging / Path(*dest.parts)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, staging / Path(*dest.parts) / PLACEMENT_FILE)
    return str(dest / PLACEMENT_FILE)


def _macs(report: dict[str, Any]) -> int | None:
    sel = report.get("selected")
    macs = sel.get("macs") if isinstance(sel, dict) else report.get("macs")
    return int(macs) if isinstance(macs, (int, float)) else None


def _metric_and_latency(report: dict[str, Any]) -> tuple[float | None, dict[str, float]]:
    sel = report.get("selected") if isinstance(report.get("selected"), dict) else None
    if sel:
        lat = {"onnxruntime": sel["latency_ms_host"]} if sel.get("latency_ms_host") else {}
        return sel.get("metric"), lat
    metric = report.get("metric", report.get("accuracy"))
    latency = report.get("latency_ms")
    lat = {"onnxruntime": float(latency)} if isinstance(latency, (int, float)) else {}
    for row in report.get("latency_by_runtime") or ():   # quantize: p50 of the quantized model per runtime
        if isinstance(row, dict) and isinstance(row.get("p50"), (int, float)) and row.get("runtime"):
            lat[str(row["runtime"])] = float(row["p50"])
    return (float(metric) if isinstance(metric, (int, float)) else None), lat


def _io_and_samples(staging: Path, variants: list[Variant], default: str, data: Path | None,
                    samples: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], str | None, str | None]:
    from edgekiln.execution.feeds import npz_feeds
    from edgekiln.execution.ort import ort_session
    from edgekiln.execution.specs import numpy_dtype

    v = next(x for x in variants if x.name == default)
    sess = ort_session(staging / v.file)

    def spec(t: Any) -> TensorSpec:
        return TensorSpec(name=t.name, shape=tuple(d if isinstance(d, int) else -1 for d in t.shape),
                          dtype=numpy_dtype(t.type).name)

    inputs = tuple(spec(t) for t in sess.get_inputs())
    outputs = tuple(spec(t) for t in sess.get_outputs())
    if data is None:
        return inputs, outputs, None, None
    feeds = npz_feeds(data, inputs, count=samples)  # NOTE: manifest specs have the name/shape/dtype it reads
    expected = sess.run(None, feeds)
    np.savez(staging / "samples.npz", **feeds)
    np.savez(staging / "expected.npz", **{o.name: e for o, e in zip(outputs, expected, strict=True)})
    return inputs, outputs, "samples.npz", "expected.npz"


def health_check(bundle: str | Path, *, variant: str | None = None) -> dict[str, Any]:
    """Load the bundle with the runtime, run the sample inputs, compare with the expected outputs."""
    from edgekiln.runtime.engine import Runtime

    rt = Runtime(bundle, warmup=0)
    m = rt.manifest
    name = variant or m.default_variant   # NOTE: a placed variant is checked as its chain
    if not m.sample_inputs or not m.sample_outputs:
        rt.session(name)
        return {"ok": True, "variant": name, "checked": 0, "max_abs_error": None}
    with np.load(Path(bundle) / m.sample_inputs) as si, np.load(Path(bundle) / m.sample_outputs) as so:
        feeds = {k: si[k] for k in si.files}
        expected = so[so.files[0]]
    got = rt.session(name).run(feeds)[0]
    if got.shape != expected.shape:
        return {"ok": False, "variant": name, "checked": len(expected),
                "error": f"output shape {list(got.shape)} != expected {list(expected.shape)}"}
    err = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    return {"ok": err <= m.health_tolerance, "variant": name, "checked": len(expected), "max_abs_error": err}
