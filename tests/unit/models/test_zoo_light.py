"""The lightweight family: each builder keeps its output shape, exports to ONNX matching PyTorch,
and goes through the int8 quantize pass (weights really int8, outputs close to FP32)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekiln.models import zoo
from edgekiln.models.support import unsupported_ops
from edgekiln.models.torch_export import export_to_onnx
from edgekiln.passes.quantize import QuantizeConfig, quantize_model

# name -> (builder kwargs at tiny sizes, classes, runs on the integer C backend)
CASES = {
    "mobilenet_v1_style": ({"width_mult": 0.25, "blocks": 4, "kernel_size": 5}, 10, True),
    "mobilenet_v2_style": ({"width_mult": 0.5, "blocks": 4, "kernel_size": 5}, 10, True),
    "squeezenet_style": ({"width_mult": 0.5, "blocks": 3}, 10, True),
    "ds_cnn": ({"channels": 16, "blocks": 2, "kernel_size": 5, "input_size": (49, 10)}, 10, True),
    "cnn1d": ({"channels": 8, "blocks": 3}, 6, True),
    "rnn_classifier": ({"cell": "gru", "hidden": 16}, 6, False),
    "lstm_classifier": ({"cell": "lstm", "hidden": 16}, 6, False),
}
# SQNR floor for int8 vs FP32 logits: these are untrained, seeded models calibrated on the same 64
# random inputs; measured 44-50 dB here, so 30 dB leaves room for other CPUs and ORT versions but
# catches a wrong scale or zero point on any layer (that gives < 10 dB).
SQNR_FLOOR_DB = 30.0


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(CASES))
def test_builder_exports_and_quantizes_to_int8(tmp_path, name):
    kwargs, classes, c_backend = CASES[name]
    torch.manual_seed(0)
    model = zoo.build(name.replace("lstm_classifier", "rnn_classifier"), **kwargs).eval()
    shape = model.input_shape
    x = np.random.default_rng(0).standard_normal((64, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert ref.shape == (64, classes)
    path = tmp_path / "m.onnx"
    export_to_onnx(model, shape, path)
    proto = onnx.load(str(path))
    assert (unsupported_ops(proto)["c"] == []) == c_backend, unsupported_ops(proto)["c"]
    got = _session(path).run(None, {"input": x})[0]
    bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got - ref).max()) <= bound, f"{name}: ORT vs torch {np.abs(got - ref).max():.3g} > {bound:.3g}"

    np.savez(tmp_path / "calib.npz", x=x)
    q = quantize_model(path, QuantizeConfig(), tmp_path / "q", calib=tmp_path / "calib.npz").path
    qproto = onnx.load(str(q))
    int8_weights = [i for i in qproto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert int8_weights, f"{name}: no int8 weight tensors after the int8 pass"
    out = _session(q).run(None, {"input": x})[0]
    sqnr = 20 * np.log10(np.linalg.norm(ref) / max(np.linalg.norm(ref - out), 1e-12))
    assert sqnr >= SQNR_FLOOR_DB, f"{name}: int8 SQNR {sqnr:.1f} dB < {SQNR_FLOOR_DB} dB (seed 0)"


def test_new_builders_are_in_the_zoo_and_deterministic():
    assert {"mobilenet_v1_style", "squeezenet_style", "cnn1d", "rnn_classifier"} <= set(zoo.BUILDERS)

    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(zoo.build("squeezenet_style").state_dict().values())

    assert all(torch.equal(a, b) for a, b in zip(weights(1), weights(1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(1), weights(2), strict=True))


def test_knobs_change_the_architecture_and_bad_values_are_refused():
    base = zoo.count_params(zoo.build("mobilenet_v1_style"))
    assert zoo.count_params(zoo.build("mobilenet_v1_style", width_mult=0.5)) < base
    assert zoo.count_params(zoo.build("mobilenet_v1_style", blocks=3)) < base
    assert zoo.count_params(zoo.build("mobilenet_v1_style", kernel_size=5)) > base
    # the existing builders keep their documented defaults
    assert zoo.count_params(zoo.mobilenet_v2_style()) == 39_082 and zoo.count_params(zoo.ds_cnn()) == 21_066
    with pytest.raises(ValueError, match="kernel_size odd"):
        zoo.build("mobilenet_v1_style", kernel_size=4)
    with pytest.raises(ValueError, match="cell must be gru or lstm"):
        zoo.build("rnn_classifier", cell="rnn")
