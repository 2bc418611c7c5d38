"""export_tflite end to end: QDQ ONNX + eval.npz -> model.tflite, LiteRT/TFLM checks, arena, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tflite_micro", reason="tflite-micro is an optional extra (pip install tflite-micro)")
pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is an optional extra")

from edgekiln.codegen.tflite import export_tflite  # noqa: E402
from edgekiln.codegen.tflite.testmodels import build_qdq  # noqa: E402
from edgekiln.errors import EdgekilnError  # noqa: E402
from edgekiln.fileio import atomic_save_npz  # noqa: E402

SEED = 3


def test_export_tflite_writes_model_report_and_measures_the_arena(tmp_path):
    qdq, x = build_qdq("tiny", tmp_path, seed=SEED, n_eval=32)
    y = np.random.default_rng(SEED).integers(0, 10, size=len(x))
    npz = atomic_save_npz(tmp_path / "eval.npz", x=x, y=y)
    out = tmp_path / "out"
    rep = export_tflite(qdq, out, eval_npz=npz)
    model = out / "model.tflite"
    assert model.read_bytes()[4:8] == b"TFL3"
    assert rep["tflite_bytes"] == model.stat().st_size
    saved = json.loads((out / "report.json").read_text())
    for key in ("artifact", "tflite_bytes", "litert", "tflm", "arena"):
        assert key in saved, f"report.json lacks {key!r}"
    for rt in ("litert", "tflm"):
        r = saved[rt]
        assert r["n_inputs"] == 32 and r["top1_agreement_clear_margin"] == 1.0, (rt, r, SEED)
        assert r["max_abs_diff_lsb"] <= 1, f"{rt}: max {r['max_abs_diff_lsb']} LSB (need <= 1), seed {SEED}"
        assert 0.0 <= r["accuracy"] <= 1.0 and "onnxruntime_accuracy" in r
    a = saved["arena"]
    assert a["smallest_running_bytes"] >= a["reported_bytes"] > 0, a
    md = (out / "report.md").read_text()
    assert "TFLite Micro arena" in md and str(a["reported_bytes"]) in md


def test_export_tflite_rejects_a_float_model_and_a_bad_npz(tmp_path):
    qdq, _ = build_qdq("tiny", tmp_path, seed=SEED, n_eval=4)
    with pytest.raises(EdgekilnError, match="float model"):
        export_tflite(tmp_path / "tiny_float.onnx", tmp_path / "o1", measure_arena=False)
    bad = atomic_save_npz(tmp_path / "bad.npz", inputs=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(EdgekilnError, match="no array 'x'"):
        export_tflite(qdq, tmp_path / "o2", eval_npz=bad, measure_arena=False)


def test_export_cli_to_tflite_writes_a_model_that_litert_runs(tmp_path):
    pytest.importorskip("ai_edge_litert", reason="LiteRT is the optional [mcu] extra")
    from edgekiln.cli.app import main
    from edgekiln.codegen.testmodels import tiny_qdq_model

    model = tiny_qdq_model(tmp_path / "t.onnx")
    main(["export", str(model), "--to", "tflite", "--out", str(tmp_path / "o")])  # raises SystemExit on failure
    assert (tmp_path / "o" / "model.tflite").stat().st_size > 0
