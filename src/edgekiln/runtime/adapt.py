"""Build and gate an adapted candidate of a bundle: train the head on device samples, write a new
bundle folder, and accept it only if the old classes did not lose more than a budget.

:func:`adapt_bundle` works on a plain bundle folder and knows nothing of A/B slots; the fleet
agent's :func:`edgekiln.fleet.adapt.adapt_state` runs it into the inactive slot. A call such as
``adapt_bundle("bundle/", x, y, learn=LearnConfig(), gate=GateConfig(), new_classes=(8, 9),
out="adapted/")`` returns an :class:`AdaptResult`: ``accepted``, the ``reasons`` of a rejection,
the gate's ``metrics`` (``old_drop`` and the rest) and the written folder.

The steps: hold out part of the device samples per class (:func:`split_holdout`), train the head
(:class:`~edgekiln.runtime.learner.HeadLearner`, with the bundle's replay buffer), write the
candidate bundle (the adapted default variant only, its replay and hold-out files grown by the
device samples, ``expected.npz`` from numpy), then gate it by running the written file's tail in
onnxruntime on held-out features: the old classes' accuracy (the bundle's ``holdout.npz`` plus
held-out device samples of old classes) may drop by at most the budget, the new classes' (or,
with no new classes, the held-out shifted device samples') must rise, and the health check must
pass.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.bundle import health_check
from edgekiln.runtime.learner import GateConfig, HeadLearner, LearnConfig, StreamConfig
from edgekiln.runtime.manifest import MANIFEST_NAME, Manifest, Variant, load_manifest, safe_member
from edgekiln.runtime.replay import ReplayBuffer

ADAPTATION_VERSION = 1
MIN_HELD = 3   # held-out device samples per class, at least
GATE_KEYS = ("old_before", "old_after", "old_drop", "budget", "new_before", "new_after", "n_old", "n_new",
             "health_max_abs_error")


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt_bundle` decided. ``reasons`` say why it was rejected (empty when
    accepted); ``metrics`` hold the gate's numbers (``old_before``, ``old_after``, ``old_drop``,
    ``budget``, ``new_before``, ``new_after``, ``n_old``, ``n_new``, ``health_max_abs_error``)
    and the learner's (``ms_per_step``, ``peak_bytes``, ``replay_bytes``, ``state_bytes``);
    ``adaptation`` is the manifest's top-level ``adaptation`` entry (also when rejected, for the
    report); ``out`` is the written bundle folder, None when rejected (it is deleted)."""

    accepted: bool
    reasons: list[str]
    metrics: dict[str, Any]
    adaptation: dict[str, Any]
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def adapt_bundle(bundle: str | Path, x: np.ndarray, y: np.ndarray, *, learn: LearnConfig, gate: GateConfig,
                 new_classes: Sequence[int] = (), out: str | Path, durable: bool = False,
                 checkpoint: Callable[[str], None] | None = None, replay_bytes: int | None = None) -> AdaptResult:
    """Adapt ``bundle``'s default variant to the device samples ``(x, y)`` and gate it (see the
    module doc). ``replay_bytes`` caps the bundle's replay buffer (None: all of it; 0: none).
    ``durable`` fsyncs every written folder (files always are); ``checkpoint(name)`` is called at
    ``learn:features``, ``learn:trained``, ``written:<file>``, ``fsynced:<file>`` and
    ``learn:gated``. Refused inputs raise :class:`EdgekilnError` (exit 2); a rejection is a result."""
    check = checkpoint or _no_checkpoint
    base = open_base(bundle, learn, replay_bytes=replay_bytes)
    x, y = _device_data(base, x, y, new_classes)
    feats, _ = base.learner.features(x)
    check("learn:features")
    train, held = split_holdout(y, gate.holdout_share, seed=learn.seed)
    fitted = base.learner.fit_features(feats[train], y[train])
    if base.learner.replay is not None:
        base.learner.replay.add(feats[train], y[train])
    check("learn:trained")
    res = write_and_gate(base, feats[held], y[held], gate=gate, out=out, samples=len(y), durable=durable,
                         checkpoint=check)
    res.metrics["ms_per_step"] = fitted["ms_per_step"]   # the mean over all steps of the fit
    return res


@dataclass
class Base:
    """The bundle being adapted: its folder and manifest, the variant, its learning files, and a
    learner on the variant's model with the replay buffer attached."""

    root: Path
    manifest: Manifest
    variant: Variant
    learner: HeadLearner
    holdout: tuple[np.ndarray, np.ndarray]
    learn_entry: dict[str, Any]


def open_base(bundle: str | Path, learn: LearnConfig, *, replay_bytes: int | None = None, threads: int = 1,
              stream: StreamConfig | None = None) -> Base:
    """Load ``bundle``'s default variant for learning: the learner, its replay (capped to
    ``replay_bytes``) and the held-out old-class features the manifest's ``learn`` names."""
    root = Path(bundle)
    manifest = load_manifest(root)
    variant = manifest.variant(manifest.default_variant)
    learner = HeadLearner(safe_member(root, variant.file), learn, threads=threads, stream=stream)
    entry = dict(manifest.learn.get(variant.name) or {})
    dim = learner.spec.feature_dim
    holdout = (np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
    if entry:
        if entry["cut"] != learner.spec.cut:
            raise EdgekilnError(f"{root}: the bundle's replay holds features of {entry['cut']} (scope "
                                f"{entry.get('scope', 'head')}); scope {learn.scope} trains from {learner.spec.cut}. "
                                f"Learn with --scope {entry.get('scope', 'head')}, or bundle with --learn-scope "
                                f"{learn.scope}")
        replay = ReplayBuffer.load(safe_member(root, entry["replay"]))
        if replay_bytes is not None and replay_bytes != replay.capacity_bytes:
            rf, ry = replay.arrays()
            replay = ReplayBuffer(int(replay_bytes), dim, storage=replay.storage, qparams=replay.qparams,
                                  seed=learn.seed)
            replay.add(rf, ry)
        learner.replay = replay
        with np.load(safe_member(root, entry["holdout"]), allow_pickle=False) as z:
            holdout = (z["x"].astype(np.float32), z["y"].astype(np.int64))
    elif replay_bytes:
        learner.replay = ReplayBuffer(int(replay_bytes), dim, storage="float16", seed=learn.seed)
    if learner.replay is not None and learner.replay.dim != dim:
        raise EdgekilnError(f"{root}: the replay holds {learner.replay.dim} features; the tail takes {dim}")
    return Base(root, manifest, variant, learner, holdout, entry)


def _device_data(base: Base, x: np.ndarray, y: np.ndarray, new_classes: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
    if len(x) != len(y) or not len(y):
        raise EdgekilnError(f"device data: {len(x)} samples and {len(y)} labels (need the same, at least one)")
    if y.dtype.kind not in "iu":
        raise EdgekilnError(f"device labels must be integer class indices, not {y.dtype}")
    k = base.learner.classes
    want = tuple(range(k, k + len(new_classes)))
    if tuple(int(c) for c in new_classes) != want:
        raise EdgekilnError(f"new classes {list(new_classes)}: the model has {k} classes, so new classes must be "
                            f"{', '.join(map(str, want)) or 'none'} (expected {k} first)")
    bad = sorted({int(c) for c in y if c < 0 or c >= k + len(want)})
    if bad:
        raise EdgekilnError(f"labels {bad} are neither classes of the model (0..{k - 1}) nor new classes "
                            f"{list(want) or '(none given)'}")
    return x, y.astype(np.int64)


def split_holdout(y: np.ndarray, share: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train, held)`` index arrays: ``max(3, round(share * n_c))`` of each class's
    ``n_c`` samples are held out, and at least one is left to train on.

    >>> tr, he = split_holdout(np.array([0] * 8 + [1] * 4), 0.25)
    >>> len(tr), len(he)
    (6, 6)
    """
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(MIN_HELD, int(round(share * len(idx))))
        if len(idx) < k + 1:
            raise EdgekilnError(f"class {int(c)} has {len(idx)} samples; the gate holds out at least {MIN_HELD} per "
                                f"class and trains on the rest: give at least {MIN_HELD + 1}")
        idx = rng.permutation(idx)
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def write_and_gate(base: Base, held_x: np.ndarray, held_y: np.ndarray, *, gate: GateConfig, out: str | Path,
                   samples: int, durable: bool = False, checkpoint: Callable[[str], None] | None = None
                   ) -> AdaptResult:
    """Write the trained learner of ``base`` as a candidate bundle in ``out`` and gate it on the
    held-out device features ``(held_x, held_y)`` and the bundle's held-out old classes. A rejected
    candidate is deleted."""
    check = checkpoint or _no_checkpoint
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdgekilnError(f"{out}: already exists and is not empty")
    learner, k_before = base.learner, base.learner.old_classes
    k_after = learner.classes
    new = held_y >= k_before
    if k_after > k_before:
        old_x = np.concatenate([base.holdout[0], held_x[~new]])
        old_y = np.concatenate([base.holdout[1], held_y[~new]])
        new_x, new_y = held_x[new], held_y[new]
    else:
        old_x, old_y, new_x, new_y = *base.holdout, held_x, held_y
    if not len(old_y):
        raise EdgekilnError(f"no held-out samples of classes 0-{k_before - 1} to check forgetting against: bundle "
                            "with --learn-data, or give device samples of the old classes too")
    candidate = learner.to_proto()
    adaptation = _adaptation(base, learner, samples)
    files, manifest, probe = _candidate(base, candidate, held_x, held_y, adaptation)
    tail_before, tail_after = _tail(learner.proto, learner.spec), _tail(candidate, learner.spec)
    m = {"old_before": _acc(tail_before, old_x, old_y), "old_after": _acc(tail_after, old_x, old_y),
         "new_before": _acc(tail_before, new_x, new_y) if len(new_y) else 0.0,
         "new_after": _acc(tail_after, new_x, new_y) if len(new_y) else 0.0,
         "n_old": int(len(old_y)), "n_new": int(len(new_y)), "budget": gate.budget_old_drop,
         "health_max_abs_error": _probe(candidate, probe)}
    m["old_drop"] = m["old_before"] - m["old_after"]
    adaptation["gate"] = {key: m[key] for key in GATE_KEYS}
    manifest = replace(manifest, adaptation=dict(adaptation))
    files[MANIFEST_NAME] = (json.dumps(manifest.to_dict(), indent=2) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    try:
        for rel, data in files.items():   # NOTE: the manifest last: a folder without one is no bundle
            _write(out, rel, data, check)
        if durable:
            _fsync_tree(out)
        health = health_check(out)   # the written folder, through the runtime, as a device loads it
        check("learn:gated")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    reasons = _reasons(m, gate, health, shift=k_after == k_before)
    metrics = {**m, "resolution_old": 1.0 / max(1, m["n_old"]), "resolution_new": 1.0 / max(1, m["n_new"]),
               "shift": k_after == k_before, "ms_per_step": learner.last_step["ms"],
               "peak_bytes": learner.last_step["tracemalloc_peak_bytes"], "state_bytes": learner.state_bytes(),
               "replay_bytes": learner.replay.nbytes if learner.replay is not None else 0}
    if reasons:
        shutil.rmtree(out, ignore_errors=True)
        return AdaptResult(False, reasons, metrics, adaptation, None)
    return AdaptResult(True, [], metrics, adaptation, out)   # NOTE: already fsynced before the health check


def _reasons(m: dict[str, Any], gate: GateConfig, health: dict[str, Any], *, shift: bool) -> list[str]:
    # NOTE: with n held-out samples an accuracy moves in steps of 1/n: with 200, a 1% budget is 2 images.
    reasons = []
    if m["old_drop"] > gate.budget_old_drop + 1e-12:
        reasons.append(f"old classes dropped {100 * m['old_drop']:.1f}% ({m['old_before']:.3f} -> "
                       f"{m['old_after']:.3f} on {m['n_old']} held-out samples, resolution "
                       f"{100 / max(1, m['n_old']):.1f}%), over the budget of {100 * gate.budget_old_drop:.1f}%")
    what = "held-out device samples (shifted)" if shift else "new classes"
    if not m["new_after"] > m["new_before"] + gate.min_new_gain:
        reasons.append(f"{what}: accuracy {m['new_before']:.3f} -> {m['new_after']:.3f} on {m['n_new']} samples "
                       f"did not rise by more than {gate.min_new_gain:g}")
    if not health.get("ok"):
        reasons.append(f"health check failed: {health.get('error') or health.get('max_abs_error')}")
    return reasons


def _adaptation(base: Base, learner: HeadLearner, samples: int) -> dict[str, Any]:
    import datetime as dt
    import secrets

    prev = base.manifest.adaptation or {}
    return {"version": ADAPTATION_VERSION, "id": secrets.token_hex(6), "n": int(prev.get("n", 0)) + 1,
            "base_sha256": base.variant.sha256, "variant": base.variant.name, "scope": learner.config.scope,
            "classes_before": learner.old_classes, "classes_after": learner.classes, "samples": int(samples),
            "replay_bytes": learner.replay.nbytes if learner.replay is not None else 0,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def _candidate(base: Base, candidate: Any, held_x: np.ndarray, held_y: np.ndarray, adaptation: dict[str, Any]
               ) -> tuple[dict[str, bytes], Manifest, tuple[dict[str, np.ndarray], np.ndarray] | None]:
    """The candidate bundle's files (all but the manifest), its manifest, and the health check's
    ``(sample feeds, expected outputs)``."""
    import hashlib

    from edgekiln.runtime.head_split import find_tail, tail_reference

    m, v, learner = base.manifest, base.variant, base.learner
    stem = PurePosixPath(v.file).name.split(".")[0]
    rel_model = f"models/{stem}.a{adaptation['n']}.onnx"
    files: dict[str, bytes] = {rel_model: candidate.SerializeToString()}
    tolerance, probe = m.health_tolerance, None
    if m.sample_inputs:
        with np.load(safe_member(base.root, m.sample_inputs), allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
        files[m.sample_inputs] = safe_member(base.root, m.sample_inputs).read_bytes()
        feats, _ = learner.features(feeds[m.inputs[0].name] if m.inputs[0].name in feeds else next(iter(feeds.values())))
        spec = find_tail(candidate, scope=learner.config.scope)
        # NOTE: expected outputs come from numpy (the file's own values, its QDQ emulated), not from
        # running the file: the health check then compares onnxruntime on the file against them.
        expected = tail_reference(candidate, spec, feats)
        if spec.quantized and spec.layers[-1].out_q is not None:
            tolerance = max(tolerance, 1.01 * float(np.asarray(spec.layers[-1].out_q.scale).max()))
        files[m.sample_outputs or "expected.npz"] = _npz(**{m.outputs[0].name: expected})
        probe = (feeds, expected)
    learn_entry = {}
    if learner.replay is not None:
        rd = PurePosixPath("learn") / v.name
        hx = np.concatenate([base.holdout[0], held_x]) if len(base.holdout[1]) else held_x
        hy = np.concatenate([base.holdout[1], held_y]) if len(base.holdout[1]) else held_y
        files[str(rd / "replay.npz")] = learner.replay.to_bytes()
        files[str(rd / "holdout.npz")] = _npz(x=hx.astype(np.float32), y=hy.astype(np.int16))
        learn_entry = {v.name: {"cut": learner.spec.cut, "scope": learner.config.scope, "replay": str(rd / "replay.npz"),
                                "holdout": str(rd / "holdout.npz"), "classes": learner.classes,
                                "storage": learner.replay.storage}}
    outputs = tuple(replace(o, shape=(*o.shape[:-1], learner.classes)) if i == 0 else o
                    for i, o in enumerate(m.outputs))
    new_v = replace(v, file=rel_model, sha256=hashlib.sha256(files[rel_model]).hexdigest(), metric=None,
                    size_bytes=len(files[rel_model]),
                    provenance=(*v.provenance, {"pass": "learn", "config": {"scope": learner.config.scope,
                                                                            "id": adaptation["id"]}}))
    manifest = replace(m, variants=(new_v,), outputs=outputs, placements={}, learn=learn_entry,
                       adaptation=dict(adaptation), health_tolerance=tolerance,
                       sample_outputs=(m.sample_outputs or "expected.npz") if m.sample_inputs else None)
    Manifest.from_dict(manifest.to_dict())
    return files, manifest, probe


def _probe(candidate: Any, probe: tuple[dict[str, np.ndarray], np.ndarray] | None) -> float | None:
    """The health check's max abs error, computed before anything is written (for the manifest)."""
    from edgekiln.execution.ort import ort_session

    if probe is None:
        return None
    feeds, expected = probe
    got = ort_session(candidate).run(None, feeds)[0]
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())


def _write(out: Path, rel: str, data: bytes, check: Callable[[str], None]) -> None:
    from edgekiln.fileio import atomic_write_bytes

    check(f"written:{rel}")
    atomic_write_bytes(safe_member(out, rel), data)   # NOTE: atomic_write_bytes fsyncs the file
    check(f"fsynced:{rel}")


def _fsync_tree(root: Path) -> None:
    from edgekiln.fileio import fsync_dir

    for d in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def _npz(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _tail(proto: Any, spec: Any) -> Any:
    """An onnxruntime session of the tail (the cut -> the output) of ``proto``."""
    import onnx
    from onnx.utils import Extractor

    from edgekiln.execution.ort import ort_session

    tail = Extractor(onnx.shape_inference.infer_shapes(proto)).extract_model([spec.cut], [spec.output])
    return ort_session(tail)


def _acc(sess: Any, feats: np.ndarray, y: np.ndarray) -> float:
    if not len(y):
        return 0.0
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: feats.astype(np.float32)})[0]
    return float((logits.reshape(len(y), -1).argmax(axis=1) == y).mean())


def _no_checkpoint(name: str) -> None:
    return None
