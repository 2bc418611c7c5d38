"""A batch that proposes the same pipeline twice runs it once; both trials get the result."""

from __future__ import annotations

from edgekiln.search import executors
from edgekiln.search.optimize import optimize
from edgekiln.search.recipe import Recipe
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx


def test_identical_trials_in_a_batch_run_once(tmp_path, monkeypatch):
    model = tiny_conv_onnx(tmp_path / "m.onnx")
    random_npz(tmp_path / "calib.npz", (1, 1, 8, 8), n=16, seed=1)
    random_npz(tmp_path / "eval.npz", (1, 1, 8, 8), n=16, seed=2)
    ran: list[int] = []
    real = executors.run_batch

    def counting(payloads, settings):
        ran.append(len(payloads))
        return real(payloads, settings)

    monkeypatch.setattr(executors, "run_batch", counting)
    recipe = Recipe.from_dict({
        "model": str(model), "calib": str(tmp_path / "calib.npz"), "eval": str(tmp_path / "eval.npz"),
        "target": "cortex-m7", "passes": [{"pass": "quantize", "optional": False, "options": {"calibration": "minmax"}}],
        "search": {"trials": 3, "bench_runs": 5}})
    result = optimize(recipe, tmp_path / "opt", quiet=True)
    assert ran == [1], f"run_batch calls (payloads each): {ran}; the 3 trials are one pipeline"
    assert [c.number for c in result.candidates] == [0, 1, 2]
    assert len({c.metric for c in result.candidates}) == 1 and [c.cached for c in result.candidates] == \
        [False, True, True], [(c.number, c.metric, c.cached) for c in result.candidates]
