"""The peers run the way edgekiln's own models run: the same runtime adapters, the same timing loop."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import peers
from edgekiln.execution import calibration_feeds
from edgekiln.testing.tiny import tiny_conv_onnx

SEED = 0
# NOTE: onnxruntime's per-tensor int8 defaults on the tiny conv net, calibrated on 8 samples, gave
# 36.8 dB here; 25 dB leaves room for another onnxruntime version and still fails on a wrong scale.
SQNR_FLOOR_DB = 25.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("peers")
    x = np.random.default_rng(SEED).standard_normal((16, 1, 8, 8)).astype(np.float32)
    return tiny_conv_onnx(d / "m.onnx"), x, d


def test_ort_static_peer_is_calibrated_through_the_public_reader(tiny):
    src, x, d = tiny
    feeds = calibration_feeds(src, x, limit=8)
    q = peers.ort_static_default(src, feeds, d / "q.onnx")
    y = peers.predict(peers.onnxruntime_session(src), {"input": x})
    yq = peers.predict(peers.onnxruntime_session(q), {"input": x})
    sqnr = 20 * np.log10(np.linalg.norm(y) / np.linalg.norm(y - yq))
    assert sqnr >= SQNR_FLOOR_DB, f"ORT quantize_static peer: SQNR {sqnr:.1f} dB < {SQNR_FLOOR_DB} dB (seed {SEED})"


def test_openvino_peer_session_with_a_fixed_shape_matches_onnxruntime(tiny):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install 'edgekiln[bench]')")
    src, x, _ = tiny
    ort = peers.onnxruntime_session(src)
    ov = peers.openvino_session(src, fixed_shape={"input": [1, 1, 8, 8]})
    y, y_ov = peers.predict(ort, {"input": x}), peers.predict(ov, {"input": x})
    scale = float(np.abs(y).max())
    diff = float(np.abs(y - y_ov).max())
    # f32 on both sides: only summation order differs (a few float32 ulps of the output's scale).
    assert diff <= 1e-5 * scale, f"OpenVINO vs onnxruntime: max |diff| {diff:.3g} > 1e-5 x {scale:.3g}"


def test_time_interleaved_times_every_model_in_the_same_rounds(tiny):
    src, x, _ = tiny
    run = peers.onnxruntime_session(src)
    calls = {"a": 0, "b": 0}

    def counting(name):
        def call(feeds):
            calls[name] += 1
            return run(feeds)
        return call

    feeds = {"input": x[:1]}
    lat = peers.time_interleaved({"a": counting("a"), "b": counting("b")}, {"a": feeds, "b": feeds},
                                 warmup=2, rounds=3, per_round=4)
    assert calls == {"a": 2 + 3 * 4, "b": 2 + 3 * 4}, calls
    for name, stats in lat.items():
        assert 0 < stats["min"] <= stats["p50"] <= stats["p90"] <= stats["max"], (name, stats)
