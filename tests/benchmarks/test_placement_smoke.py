"""The `placement` benchmark case on its small model (the conv + transformer hybrid at 32x32, 5 runs):
it writes its tables, and the chosen plan is never slower than the best single runtime beyond noise.
It does not assert a speed-up (that is the benchmark's to report)."""

from __future__ import annotations

from pathlib import Path

import onnx

from benchmarks.cases_placement import HOST_RUNTIMES, conv_transformer, markdown, run
from edgekiln.targets.place_measure import Settings


def test_placement_case_writes_its_tables_and_never_loses(tmp_path: Path) -> None:
    path = tmp_path / "convtx.onnx"
    onnx.save(conv_transformer(32), str(path))
    raw = run([("hybrid", path, "smoke", None)], tmp_path, Settings(warmup=2, runs=5, block_runs=3))
    text = markdown(raw)
    for title in ("Table 1", "Table 2", "Table 3", "Placements on NPU/GPU profiles"):
        assert title in text, f"{title!r} missing from the case's markdown:\n{text}"
    m = raw["models"][0]["measured"]
    singles = {c["label"]: c["p50_ms"] for c in m["candidates"] if c["label"] in HOST_RUNTIMES}
    best = min(singles.values())
    assert m["chosen_p50_ms"] <= best * 1.10, (
        f"chosen {m['chosen']} p50 {m['chosen_p50_ms']:.4f} ms > 1.10 x best single {best:.4f} ms ({singles})")
    assert len(m["segments"]) >= 1 and all(s["in_chain_ms"] > 0 for s in m["segments"]), m["segments"]
