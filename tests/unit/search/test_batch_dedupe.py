"""A search never spends a trial re-running a pipeline it has tried; a space smaller than the
trial budget is tried exhaustively and the report says so."""

from __future__ import annotations

import json

import pytest

from edgekiln.search import executors
from edgekiln.search.optimize import optimize
from edgekiln.search.recipe import Recipe
from edgekiln.search.space import enumerate_points
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx


@pytest.fixture
def tiny(tmp_path):
    model = tiny_conv_onnx(tmp_path / "m.onnx")
    random_npz(tmp_path / "calib.npz", (1, 1, 8, 8), n=16, seed=1)
    random_npz(tmp_path / "eval.npz", (1, 1, 8, 8), n=16, seed=2)
    return model


def _recipe(tmp_path, model, options, trials, sampler="tpe"):
    return Recipe.from_dict({
        "model": str(model), "calib": str(tmp_path / "calib.npz"), "eval": str(tmp_path / "eval.npz"),
        "target": "cortex-m7", "passes": [{"pass": "quantize", "optional": False, "options": options}],
        "search": {"trials": trials, "bench_runs": 5, "sampler": sampler, "seed": 0, "mcu_library": False}})


def test_a_one_pipeline_space_runs_once_and_says_it_is_exhausted(tiny, tmp_path, monkeypatch):
    ran: list[int] = []
    real = executors.run_batch

    def counting(payloads, settings):
        ran.append(len(payloads))
        return real(payloads, settings)

    monkeypatch.setattr(executors, "run_batch", counting)
    result = optimize(_recipe(tmp_path, tiny, {"calibration": "minmax"}, trials=3), tmp_path / "opt", quiet=True)
    assert ran == [1], f"run_batch calls (payloads each): {ran}; the space holds one pipeline"
    assert len(result.candidates) == 1 and result.exhausted, (len(result.candidates), result.exhausted)
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert report["space_exhausted"] is True
    assert "holds 1 distinct pipeline" in (tmp_path / "opt" / "report.md").read_text()


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_every_trial_is_a_distinct_pipeline(tiny, tmp_path, sampler):
    options = {"calibration": ["minmax", "percentile", "entropy", "mse"]}
    result = optimize(_recipe(tmp_path, tiny, options, trials=4, sampler=sampler), tmp_path / "opt", quiet=True)
    labels = [c.label for c in result.candidates]
    # NOTE: before, seeded TPE drew 4 trials of 3 pipelines on MiniLM (two re-runs from the cache).
    assert len(labels) == 4 and len(set(labels)) == 4, labels
    assert not result.exhausted


def test_a_resumed_search_does_not_repeat_finished_pipelines(tiny, tmp_path):
    options = {"calibration": ["minmax", "percentile", "entropy"]}
    optimize(_recipe(tmp_path, tiny, options, trials=2), tmp_path / "opt", quiet=True)
    again = optimize(_recipe(tmp_path, tiny, options, trials=5), tmp_path / "opt", quiet=True, resume=True)
    labels = [c.label for c in again.candidates]
    assert sorted(labels) == sorted(set(labels)) and len(labels) == 3, labels
    assert again.exhausted


def test_enumerate_points_lists_optional_passes_switched_off():
    from edgekiln.search.recipe import PassSpace

    spaces = [PassSpace(name="prune", optional=True, options={"ratio": (0.3, 0.5), "mode": ("structured",)}),
              PassSpace(name="quantize", optional=False, options={"calibration": ("minmax", "mse")})]
    points = enumerate_points(spaces)
    assert points is not None and len(points) == 6, points
    assert {"prune.enabled": False, "quantize.calibration": "mse"} in points
    assert {"prune.enabled": True, "prune.ratio": 0.5, "quantize.calibration": "minmax"} in points
    assert enumerate_points(spaces, limit=5) is None
