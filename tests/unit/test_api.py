"""The Python API (``edgekiln.quantize`` ...) and the CLI share one code path; ``import edgekiln`` is cheap."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import edgekiln
from edgekiln.fileio import sha256_file
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx

HEAVY = ("torch", "onnxruntime", "onnx", "numpy")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().replace("'", '"'))


def test_import_edgekiln_loads_no_heavy_library():
    assert _loaded_after("import edgekiln\nedgekiln.__version__") == []


def test_names_resolve_on_first_use_only():
    # NOTE: RunFolder lives in models/, which reads ONNX headers; resolving it must not pull torch in.
    assert "torch" not in _loaded_after("import edgekiln\nedgekiln.RunFolder\nedgekiln.quantize")
    assert edgekiln.quantize is edgekiln.api.quantize
    assert {"load", "quantize", "prune", "distill", "optimize", "inspect", "bench", "RunFolder"} <= set(dir(edgekiln))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edgekiln.nope  # noqa: B018


def test_api_and_cli_quantize_give_the_same_run_folder(tmp_path):
    from edgekiln.cli.app import main

    model = tiny_conv_onnx(tmp_path / "m.onnx")
    calib = random_npz(tmp_path / "calib.npz", (1, 1, 8, 8), n=16, seed=1)
    ev = random_npz(tmp_path / "eval.npz", (1, 1, 8, 8), n=16, seed=2)
    # NOTE: the int8 form is chosen by timing (the one input that is not the seed): pinned on both sides
    main(["quantize", str(model), "--calib", str(calib), "--eval", str(ev), "--bench-runs", "5",
          "--speed-rule", "on", "--activations", "int8", "--out", str(tmp_path / "cli")])
    from edgekiln.passes.quantize import QuantizeConfig

    run = edgekiln.quantize(model, "int8", calib=calib, eval=ev, bench_runs=5, out=tmp_path / "api",
                            config=QuantizeConfig(speed_rule="on", activations="int8"))
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    api = run.report()
    assert sorted(cli) == sorted(api), set(cli) ^ set(api)
    for key in ("scheme", "metric_fp32", "metric", "model_bytes", "kept_float", "calibration", "config"):
        assert cli[key] == api[key], (key, cli[key], api[key])
    assert sha256_file(tmp_path / "cli" / "model.onnx") == sha256_file(run.read().path)
    assert [p["pass"] for p in api["provenance"]][-1] == "quantize"
    assert [p["pass"] for p in api["provenance"]] == [p["pass"] for p in cli["provenance"]]


def test_quantize_runs_through_the_pipeline_checks(tmp_path, monkeypatch):
    """A quantize pass that returns another kind than its spec declares is stopped by the pipeline."""
    from edgekiln.passes import registry as reg

    spec = reg.get_pass("quantize")
    liar = dataclasses.replace(spec, run=lambda a, c, ctx: dataclasses.replace(spec.run(a, c, ctx), kind="onnx"))
    monkeypatch.setattr(reg, "_REGISTRY", {**reg.registry(), "quantize": liar})
    calib = random_npz(tmp_path / "calib.npz", (1, 1, 8, 8), n=8)
    with pytest.raises(edgekiln.EdgekilnError, match="step 1 'quantize' produced a 'onnx' model, but its pass "
                                                      "declares 'onnx-qdq'"):
        edgekiln.quantize(tiny_conv_onnx(tmp_path / "m.onnx"), calib=calib, out=tmp_path / "q", bench_runs=2)


def test_cli_help_comes_from_the_config_field():
    from typer.testing import CliRunner

    from edgekiln.cli.app import app
    from edgekiln.passes.quantize import QuantizeConfig

    help_text = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "400"}).output
    field = next(f for f in dataclasses.fields(QuantizeConfig) if f.name == "calibration")
    assert field.metadata["help"] in help_text, help_text
