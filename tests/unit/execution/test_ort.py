"""onnxruntime sessions: IR-version lowering, intermediate tensors, one-line runtime errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.errors import EdgekilnError
from edgekiln.execution import benchmark, load_session
from edgekiln.execution.ort import (
    error_line,
    lower_for_ort,
    lower_ir_version,
    max_ir_version,
    max_opset_version,
    ort_session,
    run_with_intermediates,
)


def _mlp(opset: int | None = 17) -> onnx.ModelProto:
    """x (1, 3) -> MatMul W -> "h" -> Relu -> Add b -> y: a hand-checkable model, IR version as
    the installed onnx writes it (14 for onnx 1.23)."""
    w = np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 3.0]], np.float32)
    b = np.array([0.25, -0.5], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Add", ["r", "b"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    if opset is None:
        return helper.make_model(graph)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


X = np.array([[1.0, 2.0, -1.0]], np.float32)
H = X @ np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 3.0]], np.float32)      # [[3.0, -3.0]]
Y = np.maximum(H, 0) + np.array([0.25, -0.5], np.float32)                # [[3.25, -0.5]]


@pytest.fixture
def ir14(tmp_path):
    model = _mlp()
    if model.ir_version <= max_ir_version():
        pytest.skip(f"onnxruntime reads IR {max_ir_version()}, the onnx package writes {model.ir_version}: "
                    "nothing to lower")
    path = tmp_path / "ir14.onnx"
    onnx.save(model, str(path))
    return path


def test_a_model_saved_by_the_installed_onnx_runs_everywhere(ir14):
    assert onnx.load(str(ir14)).ir_version > max_ir_version()
    np.testing.assert_allclose(ort_session(ir14).run(None, {"x": X})[0], Y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ort_session(onnx.load(str(ir14))).run(None, {"x": X})[0], Y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(load_session(ir14, "onnxruntime").run({"x": X})[0], Y, rtol=0, atol=1e-6)
    r = benchmark(ir14, runtime="onnxruntime", runs=5, warmup=1)
    assert len(r.samples_ms) == 5 and r.latency_ms["p50"] > 0, r.latency_ms


def test_the_default_opset_is_lowered_when_no_op_changed(tmp_path):
    model = _mlp(opset=None)          # make_model's default: the newest opset, which needs the newest IR
    onnx.save(model, str(tmp_path / "new.onnx"))
    np.testing.assert_allclose(ort_session(tmp_path / "new.onnx").run(None, {"x": X})[0], Y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ort_session(model).run(None, {"x": X})[0], Y, rtol=0, atol=1e-6)
    low = lower_for_ort(model)
    assert (low.ir_version, low.opset_import[0].version) <= (max_ir_version(), max_opset_version()), low.opset_import
    assert model.opset_import[0].version == onnx.defs.onnx_opset_version()       # the input is left alone


def test_an_op_changed_after_the_opsets_onnxruntime_opens_says_so_in_one_line(tmp_path):
    newest = onnx.defs.onnx_opset_version()
    if onnx.defs.get_schema("Cast", newest, "").since_version != newest or max_opset_version() >= newest:
        pytest.skip(f"onnx {onnx.__version__}: Cast did not change in opset {newest}, or onnxruntime opens it")
    vi = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT32)], "c",
                                                [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.INT32, [1])]))
    onnx.save(model, str(tmp_path / "cast.onnx"))
    with pytest.raises(EdgekilnError) as exc:
        ort_session(tmp_path / "cast.onnx")
    msg = str(exc.value)
    assert "\n" not in msg and f"cast.onnx: uses ai.onnx opset {newest}" in msg and "op 'Cast' changed" in msg, msg


def test_lowering_leaves_the_input_alone_unless_asked():
    model = _mlp()
    before = model.ir_version
    lowered = lower_ir_version(model, 8)
    assert (lowered.ir_version, model.ir_version) == (8, before)
    assert lower_ir_version(lowered, 8) is lowered          # nothing to do: the same object
    lower_ir_version(model, 8, copy=False)
    assert model.ir_version == 8


def test_run_with_intermediates_returns_the_named_tensor():
    got = run_with_intermediates(_mlp(), {"x": X}, ["h", "y"])
    assert sorted(got) == ["h", "y"]
    np.testing.assert_allclose(got["h"], H, rtol=0, atol=1e-6)   # [[3, -3]]: the value Relu clips
    np.testing.assert_allclose(got["y"], Y, rtol=0, atol=1e-6)


def test_run_with_intermediates_every_tensor_and_batches():
    got = run_with_intermediates(_mlp(), {"x": X})
    assert set(got) == {"h", "r", "y"}, sorted(got)
    two = run_with_intermediates(_mlp(), [{"x": X}, {"x": -X}], ["h", "x"])
    np.testing.assert_allclose(two["h"], np.concatenate([H, -H]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(two["x"], np.concatenate([X, -X]))   # a graph input comes back as fed


def _unknown_op_model(path):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")], "g", vi[:1], vi[1:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), str(path))
    return path


def test_openvino_refusal_is_one_line_with_the_reason(tmp_path):
    pytest.importorskip("openvino", reason="openvino is an optional runtime")
    path = _unknown_op_model(tmp_path / "bad.onnx")
    with pytest.raises(EdgekilnError) as exc:
        load_session(path, "openvino")
    msg = str(exc.value)
    assert "\n" not in msg and "Exception from" not in msg and "NoSuchOp" in msg, msg
    assert msg.startswith("openvino cannot"), msg


def test_onnxruntime_refusal_is_one_line_with_the_reason(tmp_path):
    with pytest.raises(EdgekilnError) as exc:
        load_session(_unknown_op_model(tmp_path / "bad.onnx"), "onnxruntime")
    msg = str(exc.value)
    assert "\n" not in msg and "NoSuchOp" in msg and ".cc:" not in msg, msg


def test_error_line_keeps_the_reason_of_a_cut_off_openvino_trace():
    raw = ("Exception from src/inference/src/cpp/core.cpp:117:\nCheck 'false' failed at "
           "src/frontends/common_translators/src/unconverted_ops_report.cpp:151:\nFrontEnd API failed with "
           "OpConversionFailure:\nModel wasn't fully converted.\nSummary:\n-- No conversion rule found for "
           "operations: com.example.NoSuchOp\n\n")
    assert error_line(RuntimeError(raw)) == ("FrontEnd API failed with OpConversionFailure: Model wasn't fully "
                                             "converted. Summary: -- No conversion rule found for operations: "
                                             "com.example.NoSuchOp")
    ort_raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
               "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&) Unsupported model "
               "IR version: 14, max supported IR version: 13")
    assert error_line(RuntimeError(ort_raw)) == "Unsupported model IR version: 14, max supported IR version: 13"
