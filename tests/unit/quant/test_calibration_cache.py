"""Calibration is remembered per (graph, samples, settings): the accuracy-budget search quantizes the
same graph once per layer, and collecting statistics each time was most of its run time."""

from __future__ import annotations

import numpy as np
import onnx

from edgekiln.quant import calibration
from edgekiln.testing.tiny import tiny_conv_onnx


def test_same_graph_and_samples_calibrate_once(tmp_path, monkeypatch):
    model = onnx.load(str(tiny_conv_onnx(tmp_path / "m.onnx")))
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(4)]
    calls = []
    real = calibration.collect
    monkeypatch.setattr(calibration, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(calibration, "_RANGES", type(calibration._RANGES)())
    first = calibration.choose_ranges(model, feeds, "percentile")
    again = calibration.choose_ranges(onnx.load(str(tmp_path / "m.onnx")), feeds, "percentile")
    assert again == first and len(calls) == 1, f"{len(calls)} collections for the same graph and samples, want 1"
    again["input"] = None   # a caller's edits do not reach the remembered ranges
    assert calibration.choose_ranges(model, feeds, "percentile") == first
    # other samples, another method, another graph: calibrated anew
    other = [{"input": f["input"] * 2} for f in feeds]
    assert calibration.choose_ranges(model, other, "percentile") != first
    calibration.choose_ranges(model, feeds, "minmax")
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    calibration.choose_ranges(model, feeds, "percentile")
    assert len(calls) == 4, f"{len(calls)} collections, want 4 (1 + other samples + other method + other weights)"
