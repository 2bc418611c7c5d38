"""Byte breakdown of quantized files: categories add up to the file and name what is left float."""

from __future__ import annotations

import numpy as np

from edgekiln.fileio import atomic_save_npz
from edgekiln.passes.quantize import QuantizeConfig, quantize_model
from edgekiln.quant.size import byte_breakdown, per_channel_overhead
from edgekiln.testing.tiny import tiny_conv_onnx


def test_breakdown_of_an_int8_model_adds_up_and_has_no_float_weights(tmp_path):
    src = tiny_conv_onnx(tmp_path / "m.onnx")
    atomic_save_npz(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    res = quantize_model(src, QuantizeConfig(), tmp_path / "q", calib=tmp_path / "c.npz")
    parts = byte_breakdown(res.path)
    assert sum(parts.values()) == res.path.stat().st_size, parts
    # conv 4x1x3x3 + gemm 10x144 int8 weights (plus tensor headers)
    assert 36 + 1440 <= parts["int8 weights"] <= 36 + 1440 + 64, parts
    assert parts["float tensors"] == 0, f"float weights left in the int8 file: {parts}"
    fp32 = byte_breakdown(src)
    assert fp32["float tensors"] >= 4 * (36 + 1440), fp32
    rows = {r["layer"]: r for r in per_channel_overhead(res.path)}
    # per output channel: float32 weight scale + int32 bias + float32 bias scale = 12 bytes
    assert rows["conv1"]["channels"] == 4 and 4 * 12 <= rows["conv1"]["per_channel_bytes"] <= 4 * 12 + 64, rows
    assert not rows["conv1"]["depthwise"]
