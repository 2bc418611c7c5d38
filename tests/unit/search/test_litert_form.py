"""LiteRT competes in the search as it does in `edgekiln quantize`: an int8 trial is also timed as
edgekiln's own .tflite, its metric is measured on that file, and the file travels with the model."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.codegen.testmodels import small_cnn_qdq
from edgekiln.execution.runtimes import available_runtimes
from edgekiln.execution.specs import TensorSpec
from edgekiln.models.metrics import evaluate_detailed
from edgekiln.search.litert_form import evaluation_file, tflite_form, timed_row, with_litert
from edgekiln.search.trial import Candidate, keep_artifact

pytestmark = pytest.mark.skipif(available_runtimes().get("litert") is not None, reason="LiteRT not installed")
INPUTS = [TensorSpec("input", (1, 1, 28, 28))]


def test_an_int8_trial_gets_a_litert_row_with_its_tflite(tmp_path):
    qdq = small_cnn_qdq(tmp_path / "q.onnx")
    assert tflite_form(qdq, "onnx", tmp_path, INPUTS) is None          # a float model: LiteRT does not compete
    form = tflite_form(qdq, "onnx-qdq", tmp_path / "trial", INPUTS)
    assert form and "path" in form, form
    row = timed_row(form, INPUTS, runs=5, warmup=1)
    assert row["runtime"] == "litert" and row["p50_ms"] > 0 and row["file"].endswith("model.tflite"), row
    rows = with_litert([{"runtime": "onnxruntime", "p50_ms": 1e9, "p90_ms": 1e9},
                        {"runtime": "litert", "skipped": "does not run .onnx files"}], row)
    assert [r["runtime"] for r in rows] == ["litert", "onnxruntime"], rows
    assert evaluation_file(rows, "litert", str(qdq)) == row["file"]
    assert evaluation_file(rows, "onnxruntime", str(qdq)) == str(qdq)

    # the metric on LiteRT reads the .tflite's int8 NHWC outputs as the ONNX model gives them
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    cos = evaluate_detailed(row["file"], tmp_path / "eval.npz", "cosine", reference_path=qdq, runtime="litert")
    assert cos["value"] > 0.99, f"LiteRT vs onnxruntime on the same int8 model: cosine {cos['value']:.4f}, want > 0.99"

    # the .tflite is copied with the model (trial work folders are deleted) and the row points at the copy
    cand = Candidate(number=0, label="q", steps=[], artifact=str(qdq), runtimes=rows)
    kept = keep_artifact(cand, tmp_path / "kept")
    assert (tmp_path / "kept" / "model.tflite").is_file() and kept.runtimes[0]["file"] == str(
        tmp_path / "kept" / "model.tflite"), kept.runtimes
