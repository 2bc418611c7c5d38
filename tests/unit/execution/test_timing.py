"""Timing: statistics, runtimes, thread settings, skips and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.execution.runtimes import available_runtimes, load_session
from edgekiln.execution.timing import benchmark, compare, latency_stats
from edgekiln.testing.tiny import tiny_conv_onnx


def test_latency_stats_use_linear_interpolation():
    s = latency_stats(np.arange(1, 101, dtype=float))
    assert (s["min"], s["max"], s["mean"]) == (1.0, 100.0, 50.5)
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)


def test_null_runtime_exercises_the_harness(tmp_path):
    path = tiny_conv_onnx(tmp_path / "m.onnx")
    r = benchmark(path, runtime="null", warmup=2, runs=25)
    assert r.runs == 25 and len(r.samples_ms) == 25 and r.model_bytes == path.stat().st_size
    assert set(r.to_dict()) >= {"runtime", "latency_ms", "model_bytes", "peak_rss_bytes", "throughput", "threads"}
    assert set(r.to_dict()["latency_ms"]) >= {"min", "mean", "p50", "p90", "p99"}


def test_onnxruntime_session_runs_and_honours_threads(tmp_path):
    path = tiny_conv_onnx(tmp_path / "m.onnx")
    sess = load_session(path, "onnxruntime", threads=1)
    assert sess.options.intra_op_num_threads == 1 and sess.options.inter_op_num_threads == 1
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    out = sess.run({"input": x})[0]
    # Independent check of the first logit: conv -> relu -> flatten -> gemm written out in numpy.
    import onnx
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    conv = np.zeros((4, 6, 6), np.float32)
    for c in range(4):
        for i in range(6):
            for j in range(6):
                conv[c, i, j] = (x[0, 0, i:i + 3, j:j + 3] * w["w1"][c, 0]).sum() + w["b1"][c]
    ref = np.maximum(conv, 0).reshape(-1) @ w["w2"].T + w["b2"]
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)


def test_openvino_fp32_hint_is_set(tmp_path):
    if available_runtimes()["openvino"]:
        pytest.skip(f"openvino unavailable: {available_runtimes()['openvino']}")
    sess = load_session(tiny_conv_onnx(tmp_path / "m.onnx"), "openvino", threads=1)
    assert sess.config["INFERENCE_PRECISION_HINT"] == "f32" and sess.config["INFERENCE_NUM_THREADS"] == 1


def test_unavailable_or_incompatible_runtime_is_skipped_with_reason(tmp_path, monkeypatch):
    path = tiny_conv_onnx(tmp_path / "m.onnx")
    results = compare(path, ["null", "litert"], warmup=1, runs=3)
    assert results[1] == {"runtime": "litert", "skipped": "does not run .onnx files"}
    with pytest.raises(EdgekilnError, match="unknown runtime 'tvm'"):
        load_session(path, "tvm")


def test_cli_json_and_bad_path(tmp_path, capsys):
    from edgekiln.cli.app import main

    path = tiny_conv_onnx(tmp_path / "m.onnx")
    main(["bench", str(path), "--runtime", "null", "--runs", "5", "--warmup", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["runtime"] == "null" and "p99" in data["latency_ms"]
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(tmp_path / "nope.onnx")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.onnx'}: file not found"


def test_cli_out_writes_report_and_histogram(tmp_path):
    from edgekiln.cli.app import main

    path = tiny_conv_onnx(tmp_path / "m.onnx")
    main(["bench", str(path), "--runs", "20", "--warmup", "2", "--out", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["command"] == "bench" and report["results"][0]["runtime"] == "onnxruntime"
    assert (tmp_path / "run" / "latency.png").stat().st_size > 1000


def test_round_robin_interleaves_the_calls():
    from edgekiln.execution.timing import time_round_robin

    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    samples = time_round_robin(calls, rounds=2, warmup=1, per_turn=2)
    assert order == ["a", "b", "c"] + ["a", "a", "b", "b", "c", "c"] * 2, order
    assert {k: v.shape for k, v in samples.items()} == {"a": (4,), "b": (4,), "c": (4,)}
    assert all((v >= 0).all() for v in samples.values()), samples


def test_time_calls_counts_runs_after_warmup():
    from edgekiln.execution.timing import time_calls

    n = []
    samples = time_calls(lambda: n.append(1), runs=7, warmup=3)
    assert (len(n), samples.shape) == (10, (7,)), (len(n), samples.shape)


def test_importing_execution_does_not_import_the_runtimes():
    import subprocess
    import sys

    code = ("import sys, edgekiln.execution as e; e.TensorSpec; "
            "print(sorted(m for m in ('onnxruntime', 'openvino', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"imported by edgekiln.execution: {out}"
