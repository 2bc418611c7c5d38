"""Cross-layer equalization keeps the float function and balances ranges; bias correction
removes the mean output shift that per-tensor weight quantization introduces."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekiln.execution.ort import ort_session, readable_file
from edgekiln.quant.correction import correct_bias, equalize_cross_layer


def _run(model, x):
    return ort_session(model).run(None, {"x": x})[0]


def _dw_pw(rng):
    """depthwise conv (channels with ranges spread 1000x) -> relu -> pointwise conv."""
    w1 = (rng.standard_normal((8, 1, 3, 3)) * np.geomspace(0.01, 10, 8).reshape(-1, 1, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    g = helper.make_graph([
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="dw", group=8, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="pw", kernel_shape=[1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return m


def test_equalization_preserves_the_function_and_balances_ranges():
    rng = np.random.default_rng(0)
    model = _dw_pw(rng)
    eq, report = equalize_cross_layer(model)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    y, y_eq = _run(model, x), _run(eq, x)
    rel = float(np.abs(y - y_eq).max() / np.abs(y).max())
    assert rel < 1e-4, f"equalized model differs by {rel:.2e} (relative)"
    before, after = report["spread_before"][0], report["spread_after"][0]
    assert after < before / 10, f"per-channel range spread {before:.1f} -> {after:.1f}; expected 10x better"


def test_bias_correction_removes_the_mean_shift(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(0)
    w = np.abs(rng.standard_normal((16, 32))).astype(np.float32) ** 3 * 0.2   # skewed weights: rounding is biased
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(16, np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "f.onnx"))
    feeds = [{"x": np.abs(rng.standard_normal((1, 32))).astype(np.float32)} for _ in range(64)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    # NOTE: onnxruntime's quantizer opens the file itself: it needs the IR/opset onnxruntime reads
    quantize_static(str(readable_file(tmp_path / "f.onnx")), str(tmp_path / "q.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=False)
    fixed, report = correct_bias(m, onnx.load(str(tmp_path / "q.onnx")), feeds)
    r = report["fc"]
    assert r["mean_error_after"] < 0.5 * r["mean_error_before"], \
        f"mean |error| {r['mean_error_before']:.4g} -> {r['mean_error_after']:.4g}"
