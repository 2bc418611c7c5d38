"""`edgekiln optimize` end to end on the digits example (small enough for CI)."""

from __future__ import annotations

import json

import pytest

from edgekiln.errors import BudgetNotMet
from edgekiln.search.optimize import optimize
from edgekiln.search.recipe import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from edgekiln.models.examples import train_example

    out = tmp_path_factory.mktemp("digits")
    train_example("digits", out, seed=0, quiet=True)
    return out


def _recipe(digits, **search):
    # The ONNX file (not the run folder) so the space is quantization only: fast and torch-free.
    return Recipe.from_dict({
        "model": str(digits / "model.onnx"), "calib": str(digits / "calib.npz"), "eval": str(digits / "eval.npz"),
        "target": "cortex-m7", "constraints": {"max_drop": 0.03},
        "search": {"trials": 4, "seed": 0, "bench_runs": 20, "mcu_library": False, **search},
    })


def test_selected_model_fits_and_its_accuracy_holds_on_disk(digits, tmp_path):
    from edgekiln.models.metrics import evaluate

    result = optimize(_recipe(digits), tmp_path / "opt", quiet=True)
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    for key in ("target", "constraints", "selected", "pareto", "baseline", "trials"):
        assert key in report, f"report.json lacks {key}"
    sel = report["selected"]
    for key in ("metric", "model_bytes", "peak_ram_bytes", "latency_ms_host", "latency_ms_target_est", "passes",
                "artifact"):
        assert key in sel, f"selected lacks {key}"
    assert result.selected is not None and result.selected.feasible
    # Re-evaluate independently from the file on disk.
    acc = evaluate(tmp_path / "opt" / sel["artifact"], digits / "eval.npz", "accuracy")
    base = report["baseline"]["metric"]
    assert base - acc <= 0.03 + 1e-9, f"re-evaluated drop {base - acc:.4f} > budget 0.03 (acc {acc:.4f}, base {base:.4f})"
    assert sel["model_bytes"] < report["baseline"]["model_bytes"]
    assert (tmp_path / "opt" / "report.html").is_file() and (tmp_path / "opt" / "report.md").is_file()


def test_impossible_budget_names_the_binding_constraint(digits, tmp_path):
    rec = Recipe.from_dict({**_recipe(digits).to_dict(), "constraints": {"max_drop": 0.03, "max_ram_bytes": 64}})
    with pytest.raises(BudgetNotMet) as err:
        optimize(rec, tmp_path / "opt", quiet=True)
    assert "binding constraint: RAM" in str(err.value), str(err.value)
    assert (tmp_path / "opt" / "report.json").is_file()


def test_interrupted_search_resumes_without_losing_completed_trials(digits, tmp_path):
    seen = []

    def stop_after_two(cand):
        seen.append(cand.number)
        if len(seen) == 2:
            raise KeyboardInterrupt

    first = optimize(_recipe(digits), tmp_path / "opt", quiet=True, on_trial=stop_after_two)
    assert first.interrupted
    done = {c.number: c.metric for c in first.candidates}
    assert len(done) == 2
    second = optimize(_recipe(digits), tmp_path / "opt", quiet=True, resume=True)
    again = {c.number: c.metric for c in second.candidates}
    assert len(second.candidates) == 4
    assert all(again[n] == m for n, m in done.items()), f"completed trials changed: {done} vs {again}"
    # Serial trials run (and are recorded) one at a time: the resumed search adds new pipelines only.
    labels = [c.label for c in second.candidates]
    assert len(set(labels)) == 4, f"a resumed search repeated a pipeline: {labels}"


def test_resume_is_required_to_reuse_an_output_folder(digits, tmp_path):
    from edgekiln.errors import EdgekilnError

    optimize(_recipe(digits, trials=1), tmp_path / "opt", quiet=True)
    with pytest.raises(EdgekilnError, match="pass --resume"):
        optimize(_recipe(digits, trials=1), tmp_path / "opt", quiet=True)


def test_ray_executor_matches_the_serial_run(digits, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (edgekiln[search])")
    import ray

    serial = optimize(_recipe(digits), tmp_path / "serial", quiet=True)
    try:
        parallel = optimize(_recipe(digits, executor="ray", workers=2), tmp_path / "ray", quiet=True)
    finally:
        ray.shutdown()
    key = [(c.number, c.label, c.metric, c.model_bytes) for c in serial.candidates]
    assert key == [(c.number, c.label, c.metric, c.model_bytes) for c in parallel.candidates]


def test_host_target_picks_the_fastest_runtime(digits, tmp_path):
    rec = Recipe.from_dict({**_recipe(digits).to_dict(), "target": "host", "search": {"trials": 2, "bench_runs": 20}})
    optimize(rec, tmp_path / "opt", quiet=True)
    sel = json.loads((tmp_path / "opt" / "report.json").read_text())["selected"]
    measured = [r for r in sel["runtimes"] if "p50_ms" in r]
    assert {r["runtime"] for r in measured} >= {"onnxruntime"}
    assert sel["runtime"] == min(measured, key=lambda r: r["p50_ms"])["runtime"]
    assert sel["final_round"], "the selected model was not timed in the final round"
    # every trial is timed on each installed runtime, and its host latency is the fastest one's
    trials = json.loads((tmp_path / "opt" / "report.json").read_text())["trials"]
    for t in [t for t in trials if t["state"] == "complete"]:
        timed = [r for r in t["runtimes"] if "p50_ms" in r]
        assert {r["runtime"] for r in timed} >= {"onnxruntime"}, t["runtimes"]
        assert t["latency_ms_host"] == min(r["p50_ms"] for r in timed), (t["latency_ms_host"], t["runtimes"])
