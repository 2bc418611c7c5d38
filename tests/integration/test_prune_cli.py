"""`edgekiln prune`, `edgekiln distill` and `edgekiln search-arch` end to end on the digits example:
run folders with the promised report keys and plots, chaining into the next command, and
one-line errors."""

from __future__ import annotations

import json

import pytest
from cli_run import run_cli as _run

pytestmark = pytest.mark.slow
KEYS = ("metric_before", "metric", "params_before", "params", "macs_before", "macs", "latency_ms_before", "latency_ms")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from edgekiln.models.examples import train_example

    out = tmp_path_factory.mktemp("digits")
    train_example("digits", out, seed=0, quiet=True)
    return out




def _report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_structured_prune_with_scan_and_schedule_then_quantize_the_run_folder(digits, tmp_path):
    from edgekiln.models.intake import load_model
    from edgekiln.models.metrics import evaluate

    out = tmp_path / "pruned"
    code = _run(["prune", str(digits), "--ratio", "0.5", "--steps", "2", "--finetune-epochs", "6", "--scan",
                 "--importance", "taylor", "--bench-runs", "50", "--quiet", "--out", str(out)])
    assert code == 0
    rep = _report(out)
    assert rep["command"] == "prune" and all(rep[k] is not None for k in KEYS), {k: rep.get(k) for k in KEYS}
    assert rep["macs"] < 0.5 * rep["macs_before"] and rep["params"] < rep["params_before"]
    acc = evaluate(out / "model.onnx", digits / "eval.npz")
    assert acc == pytest.approx(rep["metric"]) and acc >= rep["metric_before"] - 0.05, \
        f"pruned accuracy {acc:.4f} vs {rep['metric_before']:.4f} (2 steps x 6 epochs, seed 0)"
    assert {"comparison.png", "sensitivity.png"} <= set(rep["plots"]) and (out / "sensitivity.png").is_file()
    assert rep["sensitivity"]["points"] and "## " not in (out / "report.md").read_text()[:2]
    art = load_model(out)               # the run folder feeds the next command
    assert art.torch is not None and art.input_shape == (1, 1, 8, 8)
    assert _run(["quantize", str(out), "--adaround", "--out", str(tmp_path / "q"), "--bench-runs", "20"]) == 0
    assert _report(tmp_path / "q")["config"]["adaround"] is True


def test_unstructured_prune_reports_the_honest_sparse_size(digits, tmp_path):
    out = tmp_path / "sparse"
    assert _run(["prune", str(digits), "--mode", "unstructured", "--ratio", "0.8", "--finetune-epochs", "2",
                 "--bench-runs", "20", "--quiet", "--out", str(out)]) == 0
    rep = _report(out)
    assert rep["sparse_compressed_bytes"] < 0.5 * rep["dense_bytes"], rep
    assert "does not speed up dense runtimes" in rep["note"] and "does not speed up" in (out / "report.md").read_text()
    assert rep["macs"] == rep["macs_before"], "zeroed weights are still multiplied"


def test_distill_into_a_zoo_student_with_the_no_kd_comparison(digits, tmp_path):
    out = tmp_path / "kd"
    assert _run(["distill", str(digits), "--student", "ds_cnn", "--student-arg", "channels=16",
                 "--student-arg", "blocks=2", "--student-arg", "input_size=8", "--epochs", "12", "--lr", "5e-3",
                 "--compare-no-kd", "--bench-runs", "20", "--quiet", "--out", str(out)]) == 0
    rep = _report(out)
    assert all(rep[k] is not None for k in KEYS) and rep["metric_no_kd"] is not None
    assert rep["params"] < rep["params_before"] / 2, (rep["params"], rep["params_before"])
    assert rep["metric"] >= 0.5, f"distilled ds_cnn(16) accuracy {rep['metric']:.3f} < 0.5 (seed 0)"
    assert rep["model"]["torch"]["factory"] == "edgekiln.models.zoo:ds_cnn" and (out / "comparison.png").is_file()


def test_search_arch_cli_fits_the_budget(digits, tmp_path):
    out = tmp_path / "arch"
    code = _run(["search-arch", "--data", str(digits), "--target", "cortex-m4", "--max-ram", "24KB",
                 "--families", "ds_cnn", "--width", "0.25,0.5", "--depth", "2", "--kernel", "3", "--candidates", "2",
                 "--epochs", "3", "--final-epochs", "8", "--baseline", str(digits), "--quiet", "--out", str(out)])
    assert code == 0
    rep = _report(out)
    assert rep["command"] == "search-arch" and rep["fits"] and rep["ram_bytes"] <= 24 * 1024
    assert all(rep[k] is not None for k in KEYS), {k: rep.get(k) for k in KEYS}
    assert rep["pareto"] and (out / "pareto.png").is_file() and (out / "int8" / "model.onnx").is_file()


@pytest.mark.parametrize("argv, message", [
    (["prune", "{d}", "--importance", "random"], "importance must be l1|l2|taylor|bn-scale"),
    (["prune", "{d}/model.onnx", "--train", "{d}/train.npz"], "'prune' needs the model's PyTorch source"),
    (["prune", "{d}", "--target-macs-reduction", "0.5", "--target-latency-reduction", "0.5"], "at most one of"),
    (["distill", "{d}", "--student", "resnet"], "unknown student 'resnet'"),
    (["search-arch", "--data", "{d}", "--families", "resnet"], "unknown architecture family resnet"),
])
def test_bad_input_is_one_line_and_exit_2(digits, tmp_path, capsys, argv, message):
    args = [a.replace("{d}", str(digits)) for a in argv] + ["--out", str(tmp_path / "o")]
    assert _run(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
