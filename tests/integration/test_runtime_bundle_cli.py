"""`edgekiln bundle` from real quantize and optimize run folders, `edgekiln run` on the result,
and bad bundles refused on the command line with a one-line reason (exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgekiln.runtime.bundle import health_check
from edgekiln.runtime.manifest import load_manifest
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx

pytestmark = pytest.mark.slow


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "edgekiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from edgekiln.search.optimize import optimize
    from edgekiln.search.recipe import Recipe

    d = tmp_path_factory.mktemp("bundle-cli")
    tiny_conv_onnx(d / "m.onnx")
    random_npz(d / "calib.npz", (1, 1, 8, 8), n=32, seed=1)
    random_npz(d / "eval.npz", (1, 1, 8, 8), n=32, seed=2)
    q = _cli("quantize", d / "m.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "--bench-runs", 5,
             "--out", d / "Q", cwd=d)
    assert q.returncode == 0, q.stderr[-2000:]
    optimize(Recipe.from_dict({"model": str(d / "m.onnx"), "calib": str(d / "calib.npz"), "eval": str(d / "eval.npz"),
                               "target": "cortex-m7", "constraints": {"max_drop": 1.0},
                               "search": {"trials": 2, "seed": 0, "bench_runs": 10, "mcu_library": False}}), d / "O",
             quiet=True)
    np.save(d / "x.npy", np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32))
    return d


@pytest.fixture(scope="module")
def bundle(runs):
    out = _cli("bundle", runs / "Q", runs / "O", "--out", runs / "B", "--name", "tiny", "--version", "2", cwd=runs)
    assert out.returncode == 0, out.stderr[-2000:]
    return runs / "B"


def test_bundle_from_quantize_and_optimize_run_folders(runs, bundle):
    m = load_manifest(bundle)
    assert (m.name, m.version) == ("tiny", "2")
    assert [v.precision for v in m.variants][0] == "int8", [v.precision for v in m.variants]
    q_report = json.loads((runs / "Q" / "report.json").read_text())
    o_report = json.loads((runs / "O" / "report.json").read_text())
    int8, opt = m.variants
    assert int8.metric == pytest.approx(q_report["metric"]) and int8.latency_ms["onnxruntime"] == pytest.approx(
        q_report["latency_ms"])
    assert set(int8.latency_ms) >= {r["runtime"] for r in q_report["latency_by_runtime"]}, int8.latency_ms
    assert opt.metric == pytest.approx(o_report["selected"]["metric"])
    assert opt.latency_ms["onnxruntime"] == pytest.approx(o_report["selected"]["latency_ms_host"])
    assert opt.provenance, "the optimize run's provenance is carried into the bundle"
    assert health_check(bundle)["ok"] or m.sample_inputs is None


def test_run_command_on_each_variant(runs, bundle):
    for variant in [v.name for v in load_manifest(bundle).variants]:
        out = _cli("run", bundle, "--input", runs / "x.npy", "--variant", variant, "--repeat", 4,
                   "--output", runs / f"y-{variant}.npy", cwd=runs)
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads(out.stdout)
        assert summary["variants"][variant]["count"] == 4 and summary["output_shape"] == [1, 10], summary
        assert np.load(runs / f"y-{variant}.npy").shape == (1, 10)


@pytest.mark.parametrize("tamper,reason", [
    (lambda b: (b / "models" / "int8.onnx").write_bytes(b"junk"), "does not match its SHA-256"),
    (lambda b: (b / "models" / "int8.onnx").unlink(), "is missing"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda b: (b / "manifest.json").unlink(), "not a bundle (no manifest.json)"),
])
def test_run_refuses_a_broken_bundle_with_the_reason(runs, bundle, tmp_path, tamper, reason):
    broken = tmp_path / "B"
    shutil.copytree(bundle, broken)
    tamper(broken)
    out = _cli("run", broken, "--input", runs / "x.npy", cwd=runs)
    assert out.returncode == 2 and reason in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_bundle_refuses_a_folder_that_is_not_a_run(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    out = _cli("bundle", tmp_path / "empty", "--out", tmp_path / "B", cwd=runs)
    assert out.returncode == 2 and "not an edgekiln run folder (no report.json)" in out.stderr, out.stderr
    assert not (tmp_path / "B").exists()
