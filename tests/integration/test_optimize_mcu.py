"""`optimize` for a microcontroller target ships edgekiln's C library: only int8 pipelines are
searched, each candidate is judged by its C library (run on the emulated CPU), and the run folder
holds the library, its verify-c result and its measured numbers; `export O --to c` works on it."""

from __future__ import annotations

import json

import pytest
from cli_run import run_cli

from edgekiln.errors import BudgetNotMet
from edgekiln.search.optimize import optimize
from edgekiln.search.recipe import Recipe
from edgekiln.targets.profiles import load_profile
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx
from tests.mcu_tools import require_mcu_tools


def _recipe(tmp_path, **fields):
    model = tiny_conv_onnx(tmp_path / "m.onnx")
    random_npz(tmp_path / "calib.npz", (1, 1, 8, 8), n=16, seed=1)
    random_npz(tmp_path / "eval.npz", (1, 1, 8, 8), n=16, seed=2)
    return Recipe.from_dict({"model": str(model), "calib": str(tmp_path / "calib.npz"),
                             "eval": str(tmp_path / "eval.npz"), "target": "cortex-m7",
                             "constraints": {"max_drop": 1.0}, "search": {"trials": 2, "bench_runs": 5, "seed": 0},
                             **fields})


def test_the_run_folder_holds_the_c_library_its_verification_and_the_measured_numbers(tmp_path):
    require_mcu_tools()
    out = tmp_path / "opt"
    rec = _recipe(tmp_path)
    result = optimize(Recipe.from_dict({**rec.to_dict(), "search": {**rec.search.to_dict(), "trials": 1}}), out,
                      quiet=True)
    sel = result.selected
    assert sel is not None and sel.kind == "onnx-qdq", sel
    assert all(c.kind == "onnx-qdq" for c in result.candidates), [(c.label, c.kind) for c in result.candidates]
    report = json.loads((out / "report.json").read_text())
    dep = report["deployment"]
    v, m = dep["verify_c"], dep["measured"]
    assert v["passed"] and v["identical_fraction"] == 1.0 and v["n_inputs"] == 16, v
    assert m["outputs_match"] and m["arena_bytes"] == dep["arena_bytes"], m
    # the trial judged the same library on the same inputs: the count that ranked it is the one reported
    assert m["instructions_per_inference"] == sel.mcu["instructions"] > 0, (m["instructions_per_inference"], sel.mcu)
    prof = load_profile("cortex-m7")
    want = m["instructions_per_inference"] * m["cycles_per_instruction"] / prof.clock_hz * 1e3
    assert sel.latency_ms_target_est == pytest.approx(want, rel=1e-12) == m["latency_ms_est"], \
        (sel.latency_ms_target_est, want, m["latency_ms_est"])
    # flash: the linked library (code, constants, data) and the libgcc helpers it pulls in
    flash = report["selected"]["flash_bytes"]
    assert flash == sel.mcu["code_bytes"] + sel.mcu["const_bytes"] >= m["text"] + m["data"], (flash, sel.mcu, m)
    md = (out / "report.md").read_text()
    assert "## Deployment" in md and f"{m['instructions_per_inference']:,}" in md, md[:2000]
    assert (out / "measure-mcu" / "report.json").is_file()
    # the folder exports as it is, to the very library the search measured
    assert run_cli(["export", out, "--to", "c", "--out", tmp_path / "again"]) == 0
    assert (tmp_path / "again" / "model.c").read_bytes() == (out / "c" / "model.c").read_bytes()
    # `fits` on the folder uses the measured count, not the per-kind estimate
    from edgekiln.api import fits

    fit = fits(out, "cortex-m7")
    assert fit.latency_source == "measured instructions (emulated CPU)", fit.latency_source
    assert fit.metrics["latency_ms"].value == pytest.approx(m["latency_ms_est"], rel=1e-9), \
        (fit.metrics["latency_ms"].value, m["latency_ms_est"])
    assert fits(out, "cortex-m4").latency_source == "estimate from measured instructions"   # measured on an M7


def test_a_float_pipeline_is_not_deployable_on_a_microcontroller(tmp_path):
    rec = _recipe(tmp_path, passes=[{"pass": "quantize", "optional": False, "options": {"scheme": "fp16"}}])
    with pytest.raises(BudgetNotMet, match="not deployable") as err:
        optimize(rec, tmp_path / "opt", quiet=True)
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert report["selected"] is None and report["deployment"] is None, report["selected"]
    (trial,) = report["trials"]
    assert any(v.startswith("not deployable: a fp16 model") for v in trial["violations"]), (trial["violations"], err)
    assert any(v.startswith("not deployable: a fp32 model") for v in report["baseline"]["violations"])
    assert not (tmp_path / "opt" / "c").exists()


def test_without_the_mcu_library_option_the_estimates_decide_and_no_library_is_written(tmp_path):
    rec = _recipe(tmp_path, passes=[{"pass": "quantize", "optional": False, "options": {"scheme": ["fp16", "int8"]}}])
    rec = Recipe.from_dict({**rec.to_dict(), "search": {**rec.search.to_dict(), "mcu_library": False}})
    result = optimize(rec, tmp_path / "opt", quiet=True)
    by_kind = {c.kind: c for c in result.candidates}
    assert set(by_kind) == {"onnx-fp16", "onnx-qdq"}, [(c.label, c.kind) for c in result.candidates]
    assert not by_kind["onnx-fp16"].feasible and by_kind["onnx-fp16"].violations[-1].startswith("not deployable"), \
        by_kind["onnx-fp16"].violations
    assert result.selected is not None and result.selected.kind == "onnx-qdq" and result.selected.mcu is None, \
        result.selected
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert report["deployment"] is None and not (tmp_path / "opt" / "c").exists(), report["deployment"]


def test_the_default_space_on_a_microcontroller_is_int8_only(tmp_path):
    from edgekiln.models.intake import load_model
    from edgekiln.search.space import default_space, enumerate_points, point_steps

    rec = _recipe(tmp_path)
    (quant,) = default_space(load_model(rec.model), rec, ("int8", "fp16", "fp32"), target_kind="mcu")
    pipelines = [point_steps(p, (quant,)) for p in enumerate_points((quant,))]
    schemes = {s.config.scheme for steps in pipelines for s in steps}
    assert not quant.optional and schemes == {"int8"} and all(pipelines), (quant, schemes)


def test_without_the_tools_a_candidate_keeps_its_estimates_and_says_why(tmp_path, monkeypatch):
    import edgekiln.codegen.mcu as mcu_tools
    from edgekiln.search.mcu import measure_candidate
    from edgekiln.search.report import deployment_lines

    monkeypatch.setattr(mcu_tools, "tools_missing", lambda: "qemu-system-arm not installed")
    rec = _recipe(tmp_path)
    record = measure_candidate(rec.model, load_profile("cortex-m7"), tmp_path / "w", eval_path=rec.eval)
    assert record == {"skipped": "qemu-system-arm not installed"}, record
    assert measure_candidate(rec.model, load_profile("raspberry-pi-4"), tmp_path / "w", eval_path=rec.eval) == \
        {"skipped": "no emulated CPU for profile raspberry-pi-4 (measure-mcu has cortex-m4, cortex-m7)"}
    dep = {"library": "c", "requant": "float32-exact", "arena_bytes": 1, "ram_bytes": 2, "flash_bytes_estimate": 3,
           "verify_c": {"skipped": "no evaluation data"}, "measured": record}
    text = "\n".join(deployment_lines(dep, "cortex-m7"))
    assert "not measured: qemu-system-arm not installed" in text and "verify-c | not run" in text, text
