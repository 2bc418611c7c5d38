"""The `learn` benchmark case on the tiny head model and seeded clusters, 1 seed, every device job in
one torch-blocked subprocess: it writes its three tables with every method row, the step times and
peaks are positive, the replay buffers stay within their stated bytes, a gated adaptation of a
bundle ran, and no device job imported torch. It asserts no accuracy (that is the benchmark's to report)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.cases_learn import CLASS_METHODS, SHIFT_METHODS, markdown, run, write_data
from edgekiln.testing.streams import class_clusters
from edgekiln.testing.tiny import tiny_head_onnx


def test_learn_case_writes_its_tables_on_the_tiny_model(tmp_path: Path) -> None:
    fp32 = tiny_head_onnx(tmp_path / "fp32.onnx", seed=0)
    int8 = tiny_head_onnx(tmp_path / "int8.onnx", int8=True, seed=0)
    train = class_clusters(40, classes=tuple(range(10)), seed=1)
    evals = class_clusters(10, classes=tuple(range(10)), seed=2)
    cls, shift = write_data(tmp_path, train, evals, seed=0)
    base = {"seed": 0, "fp32": fp32, "int8": int8, "class": cls, "shift": shift}
    raw = run([base], tmp_path / "device", isolate=False, steps=10, timing_runs=20)
    text = markdown(raw)
    for title in ("Table 1", "Table 2", "Table 3"):
        assert title in text, f"{title!r} missing from the case's markdown:\n{text}"
    for m in (*CLASS_METHODS, *SHIFT_METHODS):
        assert f"| {m.label} |" in text, f"row {m.label!r} missing:\n{text}"
    assert {r["variant"] for r in raw["class"]} == {"fp32", "int8"}, raw["class"]
    refused = [(r["variant"], r["method"], r["refused"]) for r in raw["class"] + raw["shift"] if "refused" in r]
    assert not refused, refused
    trained = [r for r in raw["class"] + raw["shift"] if "step_ms_p50" in r]
    assert len(trained) == 2 * (len(CLASS_METHODS) - 1) + len(SHIFT_METHODS) - 1, len(trained)
    for r in trained:
        assert r["step_ms_p50"] > 0 and r["tracemalloc_peak_bytes"] > 0, (r["method"], r["variant"], r)
        assert r["replay_bytes"] <= r["replay_capacity"], (
            f"{r['method']}: replay holds {r['replay_bytes']} B > stated {r['replay_capacity']} B")
    assert raw["federated"][0]["uplink_int8_bytes"] < raw["federated"][0]["uplink_float_bytes"], raw["federated"]
    act = raw["activation"][0]
    assert act.get("adapt_s", 0) > 0 and isinstance(act["accepted"], bool), act
    assert raw["torch_loaded"] and not any(r["torch"] for r in raw["torch_loaded"]), raw["torch_loaded"]
