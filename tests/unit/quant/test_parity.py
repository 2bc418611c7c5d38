"""Parity localization: the first layer where a runtime's integers leave the QDQ simulation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekiln.passes.quantize import QuantizeConfig, quantize_model
from edgekiln.quant import parity
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    fp32 = tiny_conv_onnx(tmp / "tiny.onnx", batch=1)
    calib = random_npz(tmp / "calib.npz", (1, 1, 8, 8), n=64)
    res = quantize_model(fp32, QuantizeConfig(activations="int8"), tmp / "q", calib=calib)
    x = np.load(calib)["x"][:8]
    return res.path, [{"input": x[i:i + 1]} for i in range(len(x))]


def _faulty_runner(layer_weight: str, factor: float):
    """A "runtime" that runs onnxruntime but scales one layer's int8 weights (a miscompiled kernel)."""
    def load(prefix):
        m = onnx.load(str(prefix))
        for init in m.graph.initializer:
            if init.name == layer_weight:
                w = numpy_helper.to_array(init).astype(np.float32) * factor
                init.CopyFrom(numpy_helper.from_array(np.clip(np.rint(w), -127, 127).astype(np.int8), init.name))
        onnx.save(m, str(prefix))
        return parity.ort_runner(prefix)
    return load


def _weight_of(model, op):
    node = next(n for n in model.graph.node if n.op_type == op)
    dq = next(n for n in model.graph.node if n.output[0] == node.input[1])
    return node.name, dq.input[0]


def test_checkpoints_are_the_quantized_activations_in_order(qdq):
    points = parity.checkpoints(onnx.load(str(qdq[0])))
    ops = [p.op for p in points]
    # input, conv1 (through its Relu: one fused kernel), flatten, fc
    assert ops == ["input", "Conv", "Flatten", "Gemm"], ops
    assert all((p.qmin, p.qmax) == (-128, 127) for p in points)


def test_onnxruntime_agrees_with_the_simulation_on_every_checkpoint(qdq):
    path, feeds = qdq
    res = parity.first_divergence(path, feeds, parity.ort_runner)
    assert res["first"] is None, res
    assert res["checked"] == res["checkpoints"] == 4
    assert max(res["max_lsb"].values()) <= 1, res["max_lsb"]


def test_a_runtime_that_saturates_one_layer_is_named_at_that_layer(qdq):
    path, feeds = qdq
    layer, weight = _weight_of(onnx.load(str(path)), "Gemm")
    res = parity.first_divergence(path, feeds, _faulty_runner(weight, 8.0))
    first = res["first"]
    assert first is not None and first["layer"] == layer and first["op"] == "Gemm", res
    assert first["max_lsb"] > 1 and first["cause"].startswith("saturation"), first
    assert res["max_lsb"][parity.checkpoints(onnx.load(str(path)))[1].tensor] <= 1   # conv1 before it is fine


def test_a_wrong_kernel_is_named_with_its_error_size(qdq):
    path, feeds = qdq
    layer, weight = _weight_of(onnx.load(str(path)), "Conv")
    res = parity.first_divergence(path, feeds, _faulty_runner(weight, 1.06))
    first = res["first"]
    assert first is not None and first["layer"] == layer and first["index"] == 1, res
    assert first["max_lsb"] > parity.ROUNDING_LSB and first["cause"].startswith(("kernel error", "u8s8")), first


def test_one_lsb_off_after_an_integer_kernel_is_called_rounding(qdq):
    model = onnx.load(str(qdq[0]))
    conv = parity.checkpoints(model)[1]
    want = np.zeros((1, 4, 6, 6), np.int32)
    got = want.copy()
    got[0, 0, 0, :3] = 1
    cause = parity.likely_cause(model, conv, got, want, "openvino")
    assert cause.startswith("rounding") and "max 1 LSB" in cause, cause
    flatten = parity.checkpoints(model)[2]
    assert parity.likely_cause(model, flatten, got, want, "openvino").startswith("float op")


def test_bisection_finds_the_first_true_index():
    calls = []

    def diverged(i):
        calls.append(i)
        return i >= 37

    assert parity._bisect(diverged, 100) == 37
    assert len(calls) <= 8, calls
    assert parity._bisect(lambda i: False, 100) is None


def test_dynamic_models_have_no_checkpoints(tmp_path):
    fp32 = tiny_conv_onnx(tmp_path / "tiny.onnx", batch=1)
    res = quantize_model(fp32, QuantizeConfig(scheme="int8-dynamic", smooth_alpha=None), tmp_path / "d")
    out = parity.first_divergence(res.path, [{"input": np.zeros((1, 1, 8, 8), np.float32)}], parity.ort_runner)
    assert out["first"] is None and out["checkpoints"] == 0 and "dynamic" in out["note"]
