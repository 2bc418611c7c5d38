"""Quantization primitives, exact against an independent formula written with Python fractions."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from edgekiln.quant.qparams import QParams, compute_qparams, dequantize, quantize


def _reference(x: float, scale: float, zp: int, qmin: int = -128, qmax: int = 127) -> int:
    """round-half-to-even(x / scale) + zp, saturated; exact rational arithmetic."""
    r = Fraction(x) / Fraction(scale)
    floor = r.numerator // r.denominator
    frac = r - floor
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and floor % 2 == 1):
        floor += 1
    return max(qmin, min(qmax, floor + zp))


@pytest.mark.parametrize("zp", [-10, 0, 4, 13, -128, 127])
def test_quantize_matches_exact_formula_with_awkward_zero_points(zp):
    scale = np.float32(0.0625)  # a power of two: x / scale is exact in float32, so ties are exact ties
    xs = np.array([-9.0, -8.03125, -0.09375, -0.03125, 0.0, 0.03125, 0.09375, 0.15625, 1.0, 7.96875, 8.0, 100.0],
                  np.float32)
    qp = QParams(np.array(scale), np.array(zp, np.int32), -128, 127)
    got = quantize(xs, qp)
    expected = [_reference(float(x), float(scale), zp) for x in xs]
    assert got.tolist() == expected, f"zp={zp}: {got.tolist()} != {expected}"


def test_exact_half_ties_round_to_even():
    qp = QParams(np.array(np.float32(1.0)), np.array(0, np.int32), -128, 127)
    assert quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32), qp).tolist() == [0, 2, 2, 0, -2, -2]


def test_saturation_at_both_ends():
    qp = QParams(np.array(np.float32(0.1)), np.array(-10, np.int32), -128, 127)
    assert quantize(np.array([-1e6, 1e6], np.float32), qp).tolist() == [-128, 127]


def test_per_channel_axis():
    scale = np.array([0.5, 0.25], np.float32)
    qp = QParams(scale, np.array([0, 3], np.int32), -128, 127, axis=0)
    x = np.array([[1.0, 1.25], [1.0, 1.25]], np.float32)
    assert quantize(x, qp).tolist() == [[2, 2], [7, 8]]  # 2.5 -> 2 (even); 1.25/0.25 = 5 + 3 = 8
    np.testing.assert_allclose(dequantize(quantize(x, qp), qp), [[1.0, 1.0], [1.0, 1.25]])


def test_qparams_include_zero_and_match_onnxruntime_quantizelinear():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekiln.execution.ort import ort_session

    qp = compute_qparams(0.4, 3.0)  # range widened to [0, 3]: zero stays representable
    assert float(dequantize(quantize(np.array([0.0], np.float32), qp), qp)[0]) == 0.0
    x = np.linspace(-1, 4, 97, dtype=np.float32)
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [97])],
                          [helper.make_tensor_value_info("y", TensorProto.INT8, [97])],
                          [numpy_helper.from_array(qp.scale.astype(np.float32), "s"),
                           numpy_helper.from_array(qp.zero_point.astype(np.int8), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    got = ort_session(m).run(None, {"x": x})[0]
    assert got.astype(np.int32).tolist() == quantize(x, qp).tolist()


def test_symmetric_narrow_range_weights():
    qp = compute_qparams(-2.0, 1.0, symmetric=True, narrow_range=True)
    assert int(qp.zero_point) == 0 and qp.qmin == -127
    assert float(qp.scale) == pytest.approx(2.0 / 127)  # narrow range: absmax maps to +-127
