"""The architecture search: the space, cost estimates against the profile, the choice of
promising candidates, the Pareto set, and a tiny end-to-end search that must fit its budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekiln.errors import BudgetNotMet, EdgekilnError
from edgekiln.search.arch import (
    ArchBudget,
    ArchCandidate,
    ArchSearchConfig,
    ArchSpace,
    enumerate_space,
    estimate,
    front,
    promising,
    resize,
    search_architecture,
    split_validation,
)
from edgekiln.targets.profiles import load_profile


def _toy(path, n: int, seed: int) -> None:
    """A separable 12x12 task: the label is the quadrant holding a bright blob."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0, 0.3, (n, 1, 12, 12)).astype(np.float32)
    for i, q in enumerate(y):
        r, c = divmod(int(q), 2)
        x[i, 0, r * 6:r * 6 + 6, c * 6:c * 6 + 6] += 1.5
    np.savez(path, x=x, y=y.astype(np.int64))


def test_space_enumeration_deduplicates_and_covers_every_knob():
    space = ArchSpace(families=("ds_cnn", "mobilenet_v2_style"), width=(0.5, 1.0), depth=(4, 8), resolution=(20, 28),
                      kernel=(3, 5))
    cands = enumerate_space(space, (1, 1, 28, 28), 10)
    # ds_cnn takes any depth (2*2*2*2 = 16); mobilenet's depth 8 collapses onto its 6 blocks (2*2*2 = 8, once each)
    assert len(cands) == 16 + 8 + 8
    assert {c.resolution for c in cands} == {20, 28} and {c.kwargs["kernel_size"] for c in cands} == {3, 5}
    assert {c.kwargs["blocks"] for c in cands if c.family == "mobilenet_v2_style"} == {4, 6}
    with pytest.raises(EdgekilnError, match="unknown architecture family resnet"):
        ArchSpace(families=("resnet",))


def test_estimates_use_the_profile_and_flag_what_does_not_fit():
    prof = load_profile("cortex-m4")
    small, big = enumerate_space(ArchSpace(families=("ds_cnn",), width=(0.25, 1.0), depth=(2,), kernel=(3,)),
                                 (1, 1, 28, 28), 10)
    estimate(small, prof, ArchBudget())
    estimate(big, prof, ArchBudget(max_ram_bytes=small.ram_bytes + 1))
    assert small.fits and not big.fits
    assert big.ram_bytes > small.ram_bytes and big.macs > small.macs and big.latency_ms_target_est > 0
    assert any(v.startswith("RAM") for v in big.violations), big.violations
    # int8 on the M4: flash ~ one byte per weight (+ int32 biases), RAM includes the runtime's 8 KB
    assert small.params <= small.flash_bytes <= 2 * small.params
    assert small.ram_bytes >= prof.runtime_overhead_bytes


def test_front_and_promising_spread_over_latency():
    def cand(n: int, macs: int, lat: float, ram: int) -> ArchCandidate:
        return ArchCandidate(number=n, family="ds_cnn", kwargs={}, resolution=8, params=100, macs=macs,
                             latency_ms_target_est=lat, ram_bytes=ram, fits=True)

    cands = [cand(i, 1000 * (i + 1), float(i + 1), 10) for i in range(7)] + [cand(9, 500, 6.5, 10)]
    assert cands[-1] not in front(cands, key=lambda c: (-c.macs, c.latency_ms_target_est, c.ram_bytes))
    chosen = promising(cands, 3)
    assert [c.number for c in chosen] == [0, 3, 6], [c.number for c in chosen]
    assert promising(cands[:2], 5) == cands[:2]


def test_resize_and_validation_split():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    np.testing.assert_allclose(resize(x, 2)[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    y = np.repeat(np.arange(4), 25)
    tx, ty, vx, vy = split_validation(np.zeros((100, 1)), y, 0.2, seed=0)
    assert len(vy) == 20 and np.bincount(vy).tolist() == [5, 5, 5, 5] and len(ty) == 80


def test_tiny_search_returns_a_fitting_model_and_writes_the_run_folder(tmp_path):
    from edgekiln.models.metrics import evaluate
    from edgekiln.search.arch_report import write_arch_report

    _toy(tmp_path / "train.npz", 400, seed=0)
    _toy(tmp_path / "eval.npz", 200, seed=1)
    cfg = ArchSearchConfig(space=ArchSpace(families=("ds_cnn", "mobilenet_v1_style"), width=(0.25, 0.5), depth=(2,),
                                           resolution=(8, 12), kernel=(3,)),
                           budget=ArchBudget(target="cortex-m4", max_ram_bytes=14_000), candidates=3, epochs=2,
                           final_epochs=10, augment=False)
    out = tmp_path / "run"
    res = search_architecture(tmp_path / "train.npz", tmp_path / "eval.npz", out, cfg, quiet=True)
    assert len(res.candidates) == 8 and sum(c.trained for c in res.candidates) == 3
    assert all(c.fits for c in res.candidates if c.trained), "only fitting candidates may be trained"
    assert res.best in res.pareto and res.final["fits"], res.final["fit"]
    assert res.final["fit"]["ram"]["value"] <= 14_000
    rep = write_arch_report(out, res, cfg, None)
    acc = evaluate(out / "model.onnx", out / "eval.npz")
    assert acc == pytest.approx(rep["metric"]) and acc >= 0.9, f"quadrant task accuracy {acc:.3f} < 0.9 (seed 0)"
    saved = json.loads((out / "report.json").read_text())
    for key in ("metric", "params", "macs", "latency_ms", "pareto", "selected", "fits", "candidates"):
        assert key in saved, key
    assert np.load(out / "eval.npz")["x"].shape[-1] == res.best.resolution
    assert (out / "pareto.png").stat().st_size > 1000
    with pytest.raises(BudgetNotMet, match="no architecture in the space fits"):
        search_architecture(tmp_path / "train.npz", tmp_path / "eval.npz", tmp_path / "r2",
                            ArchSearchConfig(space=cfg.space, budget=ArchBudget(max_ram_bytes=1024)), quiet=True)
