"""Domain shift: the numpy rotation is exact where it can be, and an adaptation to rotated data is
gated on both the shifted device samples and the original held-out data."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_save_npz, atomic_write_json
from edgekiln.runtime.adapt import adapt_bundle, split_holdout
from edgekiln.runtime.bundle import LearnData, build_bundle
from edgekiln.runtime.engine import Runtime
from edgekiln.runtime.learner import GateConfig, LearnConfig
from edgekiln.testing.streams import class_clusters, rotate_shift
from edgekiln.testing.tiny import tiny_head_onnx

SHIFT = {"degrees": (25.0, 35.0), "shift": 2.0}


def test_rotate_shift_is_exact_at_90_and_0_degrees():
    x = np.random.default_rng(0).standard_normal((3, 2, 8, 8)).astype(np.float32)
    assert np.array_equal(rotate_shift(x, 90.0), np.rot90(x, axes=(-2, -1)))
    assert np.array_equal(rotate_shift(x, 0.0), x)
    moved = rotate_shift(x, 0.0, 1.0)   # one pixel right and down, zeros coming in
    assert np.array_equal(moved[..., 1:, 1:], x[..., :-1, :-1]) and not moved[..., 0, :].any()
    a, b = rotate_shift(x, (25.0, 35.0), 2.0, seed=4), rotate_shift(x, (25.0, 35.0), 2.0, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, rotate_shift(x, (25.0, 35.0), 2.0, seed=5))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("shift")
    run = d / "run"
    run.mkdir()
    tiny_head_onnx(run / "model.onnx")
    atomic_save_npz(run / "eval.npz", **dict(zip("xy", class_clusters(30, seed=21), strict=True)))
    atomic_save_npz(d / "train.npz", **dict(zip("xy", class_clusters(60, seed=22), strict=True)))
    atomic_write_json(run / "report.json", {"artifact": "model.onnx", "metric": 0.9, "latency_ms": 0.1})
    build_bundle([run], d / "bundle", learn=LearnData(data=d / "train.npz", replay_bytes=1 << 18))
    return d


def test_adapting_to_rotated_data_raises_shifted_accuracy_and_reports_both(bundle):
    x, y = class_clusters(12, seed=8)
    x = rotate_shift(x, SHIFT["degrees"], SHIFT["shift"], seed=3)
    res = adapt_bundle(bundle / "bundle", x, y, learn=LearnConfig(steps=300, lr=1e-2),
                       gate=GateConfig(budget_old_drop=0.02), out=bundle / "adapted")
    m = res.metrics
    assert res.accepted, res.reasons
    assert m["shift"] and m["n_new"] == 8 * 3 and m["n_old"] == 8 * 25, m   # 3 held out per class; bundle holdout
    assert m["new_after"] > m["new_before"] + 0.2, f"shifted held-out {m['new_before']:.3f} -> {m['new_after']:.3f}"
    assert m["old_drop"] <= 0.02, f"original data dropped {m['old_drop']:.3f} > 0.02"
    # on fresh samples neither side saw: the adapted bundle is better on shifted data
    xt, yt = class_clusters(30, seed=9)
    xs = rotate_shift(xt, SHIFT["degrees"], SHIFT["shift"], seed=4)
    before = float((Runtime(bundle / "bundle").infer(xs).argmax(1) == yt).mean())
    after = float((Runtime(res.out).infer(xs).argmax(1) == yt).mean())
    assert after > before + 0.15, f"fresh shifted accuracy {before:.3f} -> {after:.3f} (seed 4)"


def test_a_gate_that_cannot_be_met_rejects_and_deletes_the_candidate(bundle):
    x, y = class_clusters(8, seed=8)
    x = rotate_shift(x, SHIFT["degrees"], SHIFT["shift"], seed=3)
    res = adapt_bundle(bundle / "bundle", x, y, learn=LearnConfig(steps=5), gate=GateConfig(min_new_gain=1.0),
                       out=bundle / "never")
    assert not res.accepted and res.out is None and not (bundle / "never").exists()
    assert any("did not rise by more than 1" in r for r in res.reasons), res.reasons


def test_too_few_samples_per_class_is_refused():
    with pytest.raises(EdgekilnError, match="class 1 has 3 samples; .* give at least 4"):
        split_holdout(np.array([0] * 8 + [1] * 3), 0.25)
