"""The corpus scoreboard compares every row the same way and draws its verdicts from the right rows."""

from __future__ import annotations

import doctest
import json
import os

import numpy as np
import pytest

from benchmarks import cases_scoreboard, scoreboard_measure, scoreboard_tools
from benchmarks.cases_scoreboard import NOT_CHOSEN, summary
from benchmarks.scoreboard_measure import class_output, open_runner, outputs
from benchmarks.scoreboard_tools import EDGEKILN, FP32, LITERT, NNCF, ORT_STATIC

SEED = 0


@pytest.mark.parametrize("module", [scoreboard_measure, scoreboard_tools])
def test_docstring_examples(module):
    failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failed == 0, f"{module.__name__}: {failed} of {tried} examples failed"


def test_litert_rows_come_back_in_onnx_layout_and_order(tmp_path):
    """The three outputs of an MTCNN-like model (two NCHW maps of different depth, one vector) as
    LiteRT returns them (int8, NHWC, its own order) must match onnxruntime's run of the same int8
    QDQ model output by output, in units of each output's int8 scale."""
    pytest.importorskip("ai_edge_litert", reason="LiteRT is an optional extra (pip install 'edgekiln[bench]')")
    from ai_edge_litert.interpreter import Interpreter

    from edgekiln.codegen.testmodels import multi_head_float, quantize_qdq, random_inputs
    from edgekiln.codegen.tflite import export_tflite

    qdq = quantize_qdq(multi_head_float(seed=SEED), tmp_path / "q.onnx", seed=SEED, extra_ops=("Sigmoid",))
    export_tflite(qdq, tmp_path / "tfl", measure_arena=False)
    x = {"input": random_inputs((1, 3, 12, 12), 6, seed=SEED + 1)}
    ref = outputs(open_runner(qdq, "onnxruntime", {}).run, x)
    shapes = [tuple(r.shape[1:]) for r in ref]
    got = outputs(open_runner(tmp_path / "tfl" / "model.tflite", "litert", {}, shapes).run, x)
    scales = sorted(float(d["quantization"][0]) for d in
                    Interpreter(model_path=str(tmp_path / "tfl" / "model.tflite")).get_output_details())
    assert [g.shape for g in got] == [r.shape for r in ref], ([g.shape for g in got], [r.shape for r in ref])
    for j, (r, g) in enumerate(zip(ref, got, strict=True)):
        # NOTE: LiteRT and onnxruntime may round an int8 value differently by 1 LSB (FIELD-NOTES);
        # a wrong layout or a swapped output is off by many LSB on most elements.
        off = np.abs(r - g) / min(s for s in scales if s > 0)
        assert off.max() <= 1.5, (f"output {j}: LiteRT differs from onnxruntime by up to {off.max():.2f} x the "
                                  f"smallest output scale (limit 1.5, seed {SEED})")


def _row(tool, runtime, p50, sqnr=20.0, note=""):
    return {"tool": tool, "runtime": runtime, "p50_ms": p50, "sqnr_db": sqnr, "note": note, "error": None,
            "chosen": tool == EDGEKILN and note != NOT_CHOSEN}


def test_verdicts_use_the_chosen_edgekiln_row_the_best_fp32_and_the_best_peer():
    rows = [_row(FP32, "onnxruntime", 1.2), _row(FP32, "openvino", 0.9),
            _row(EDGEKILN, "onnxruntime", 1.0, sqnr=25.0),
            _row(EDGEKILN, "openvino", 0.5, note=NOT_CHOSEN),        # faster, but not what the report chose
            _row(ORT_STATIC, "onnxruntime", 1.3, sqnr=20.0), _row(NNCF, "openvino", 0.95),
            {"tool": LITERT, "runtime": "litert", "error": "op X is not supported", "note": "", "chosen": False}]
    v = summary({"rows": rows})
    assert v["edgekiln"]["runtime"] == "onnxruntime", v
    assert v["vs_best_fp32"]["runtime"] == "openvino" and not v["vs_best_fp32"]["faster"], v
    assert v["vs_best_fp32"]["ratio"] == pytest.approx(1.0 / 0.9), v
    assert v["vs_best_peer_int8"]["tool"] == NNCF and v["vs_best_peer_int8"]["within_10pct"], v
    assert v["sqnr_vs_ort_db"] == pytest.approx(5.0), v


def test_litert_is_no_peer_when_the_report_chose_it():
    rows = [_row(FP32, "onnxruntime", 2.0), _row(EDGEKILN, "litert", 1.0), _row(LITERT, "litert", 0.99),
            _row(ORT_STATIC, "onnxruntime", 1.5)]
    v = summary({"rows": rows})["vs_best_peer_int8"]
    assert v["tool"] == ORT_STATIC and v["ratio"] == pytest.approx(1.0 / 1.5), v


def test_a_faster_peer_that_lost_the_function_is_named_not_the_reference():
    # NNCF's magika: 1.4x faster at 1.3 dB SQNR, edgekiln 27.3 dB; ORT at 12 dB still computes the model
    rows = [_row(FP32, "onnxruntime", 2.0), _row(EDGEKILN, "openvino", 1.0, sqnr=27.3),
            _row(NNCF, "openvino", 0.7, sqnr=1.3), _row(ORT_STATIC, "onnxruntime", 0.95, sqnr=12.0)]
    v = summary({"rows": rows})
    assert v["vs_best_peer_int8"]["tool"] == ORT_STATIC, v
    assert [p["tool"] for p in v["inaccurate_peers"]] == [NNCF], v
    # a peer below the floor but within 3 dB of edgekiln's (both low: random-weight deep nets) still counts
    rows[1], rows[2] = _row(EDGEKILN, "openvino", 1.0, sqnr=7.4), _row(NNCF, "openvino", 0.7, sqnr=5.0)
    assert summary({"rows": rows})["vs_best_peer_int8"]["tool"] == NNCF


def test_on_par_means_within_ten_percent_of_the_best_peer():
    def verdict(mine):
        return summary({"rows": [_row(FP32, "onnxruntime", 2.0), _row(EDGEKILN, "onnxruntime", mine),
                                 _row(NNCF, "openvino", 1.0)]})["vs_best_peer_int8"]["within_10pct"]

    assert verdict(1.099) and verdict(1.10) and not verdict(1.101), cases_scoreboard.PAR


def test_totals_count_a_failed_edgekiln_row_as_a_miss():
    fast = {"name": "a", "rows": [_row(FP32, "onnxruntime", 2.0), _row(EDGEKILN, "onnxruntime", 1.0),
                                  _row(ORT_STATIC, "onnxruntime", 1.05, sqnr=19.5),
                                  {"tool": LITERT, "runtime": "litert", "error": None, "note": "", "chosen": False}],
            "c_export": None}
    broken = {"name": "b", "rows": [_row(FP32, "onnxruntime", 2.0),
                                    {"tool": EDGEKILN, "runtime": "-", "error": "boom", "note": "", "chosen": False},
                                    {"tool": LITERT, "runtime": "litert", "error": "no model", "note": "",
                                     "chosen": False}],
              "c_export": {"ok": False, "error": "no model"}}
    for s in (fast, broken):
        s["summary"] = summary(s)
    lines = cases_scoreboard.tally([fast, broken])
    assert "faster than the best FP32 (wall time): 1 of 2 (not: b)" in lines[2], lines
    assert "function): 1 of 2 (not: b)" in lines[3], lines
    assert "(where both run): 1 of 1" in lines[4], lines           # b has no SQNR to compare
    assert lines[5].startswith("- C export ok, other models") and lines[5].endswith("0 of 1 (not: b)"), lines
    assert lines[6].startswith("- TFLite") and lines[6].endswith("1 of 2 (not: b)"), lines


def test_cpu_time_verdict_beside_wall_time_where_measured():
    # wall time says int8 is slower (another process took the core), CPU time per call says faster
    rows = [_row(FP32, "onnxruntime", 0.057), _row(EDGEKILN, "litert", 0.058),
            {"tool": LITERT, "runtime": "litert", "error": "LSTM", "note": "", "chosen": False}]
    rows[0]["cpu_p50_ms"], rows[1]["cpu_p50_ms"] = 0.060, 0.051
    s = {"name": "m", "rows": rows, "c_export": None, "params": 1000}
    s["summary"] = summary(s)
    b = s["summary"]["vs_best_fp32"]
    assert not b["faster"] and b["cpu_faster"] and b["cpu_ratio"] == pytest.approx(0.85), b
    old = {"name": "old", "rows": [_row(FP32, "onnxruntime", 2.0), _row(EDGEKILN, "onnxruntime", 1.0), rows[2]],
           "c_export": None}   # measured before CPU time was recorded: not counted on that line
    old["summary"] = summary(old)
    lines = cases_scoreboard.tally([s, old])
    assert "(wall time): 1 of 2 (not: m)" in lines[2] and "recorded): 1 of 1" in lines[3], lines
    assert "CPU time per call: 0.85x, faster" in cases_scoreboard.summary_line(s)


def test_a_subset_rerun_keeps_the_other_models(tmp_path):
    prev = tmp_path / "scoreboard.json"
    prev.write_text(json.dumps({"models": [{"name": "a", "rows": []}, {"name": "b", "rows": [], "x": 1}]}))
    out = cases_scoreboard.merged(prev, [{"name": "b", "rows": [], "x": 2}])
    assert [(s["name"], s.get("x"), s.get("alone")) for s in out] == [("a", None, None), ("b", 2, True)], out


def test_class_vectors_are_logits_of_classifiers_or_probabilities():
    rng = np.random.default_rng(SEED)
    logits = rng.standard_normal((4, 1, 10))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    boxes = rng.standard_normal((4, 1, 4))
    assert class_output([logits], "classification") == 0
    assert class_output([logits], "audio") is None                 # scores of no known meaning
    assert class_output([boxes, probs], "face") == 1               # MTCNN: box regression, then face probability
    assert class_output([rng.standard_normal((4, 1, 8, 3, 3))], "classification") is None   # a feature map


@pytest.mark.skipif(os.environ.get("EDGEKILN_CORPUS") != "all",
                    reason="builds and runs a corpus model under five tools (~50 s): EDGEKILN_CORPUS=all")
def test_one_corpus_model_end_to_end(tmp_path):
    """DS-CNN through every tool: every row present and measured, the chosen row the report's,
    and the LiteRT run of edgekiln's .tflite as close to FP32 as the same int8 model in onnxruntime."""
    pytest.importorskip("torch")
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("ai_edge_litert")
    from benchmarks.cases_scoreboard import score_model
    from benchmarks.scoreboard_tools import chosen_runtime

    s = score_model("ds_cnn", tmp_path, quick=True)
    rows = {(r["tool"], r["runtime"]): r for r in s["rows"]}
    failed = {k: r["error"] for k, r in rows.items() if r["error"]}
    assert not failed, failed
    for key in [(FP32, "onnxruntime"), (FP32, "openvino"), (EDGEKILN, "onnxruntime"), (EDGEKILN, "openvino"),
                (ORT_STATIC, "onnxruntime"), (NNCF, "openvino"), (LITERT, "litert")]:
        assert key in rows and rows[key]["p50_ms"] > 0, (key, sorted(rows))
    report = json.loads((tmp_path / "edgekiln-int8" / "report.json").read_text())
    [mine] = [r for r in s["rows"] if r["chosen"]]
    assert mine["runtime"] == chosen_runtime(report, tmp_path / "edgekiln-int8")[0], (mine["runtime"], report)
    # f32 on both runtimes: only summation order differs (130.6 dB measured).
    assert rows[(FP32, "openvino")]["sqnr_db"] >= 80.0, rows[(FP32, "openvino")]["sqnr_db"]
    # the same integer model: LiteRT and onnxruntime agreed to 0.01 dB when written.
    lit, ort = rows[(LITERT, "litert")]["sqnr_db"], rows[(EDGEKILN, "onnxruntime")]["sqnr_db"]
    assert abs(lit - ort) <= 1.0, f"LiteRT {lit:.2f} dB vs onnxruntime {ort:.2f} dB on the same int8 model (limit 1 dB)"
    assert s["c_export"]["ok"] and s["c_export"]["arena_bytes"] > 0, s["c_export"]
