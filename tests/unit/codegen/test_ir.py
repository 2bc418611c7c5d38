"""QDQ ONNX -> integer IR: structure of the lowered ops and export-time errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekiln.codegen import testmodels as tm
from edgekiln.codegen.ir import load_qdq
from edgekiln.errors import EdgekilnError


def test_small_cnn_lowers_to_integer_ops(tmp_path):
    g = load_qdq(tm.small_cnn_qdq(tmp_path / "cnn.onnx"))
    assert [op.kind for op in g.ops] == ["conv2d", "max_pool", "conv2d", "max_pool", "reshape", "fully_connected"]
    conv1, conv2, fc = g.ops[0], g.ops[2], g.ops[5]
    assert conv1.arrays["weights"].shape == (8, 3, 3, 1) and conv1.arrays["weights"].dtype == np.int8  # OHWI
    assert conv2.arrays["mult"].shape == (16,) and conv2.arrays["bias"].dtype == np.int32  # per channel
    assert ((conv2.arrays["mult"] >= 2**23) & (conv2.arrays["mult"] < 2**24)).all()  # float32 significands
    assert fc.arrays["weights"].shape == (10, 784)
    assert g.tensors[g.input].shape == (1, 28, 28, 1) and g.tensors[g.output].shape == (1, 10)
    # ReLU became the output quantization range (zero point -128), i.e. the clamp is fused
    assert g.tensors[conv1.output].zero_point == -128


def test_mobilenet_style_has_depthwise_add_concat_pools(tmp_path):
    g = load_qdq(tm.mobilenet_style_qdq(tmp_path / "mb.onnx", softmax=True))
    kinds = [op.kind for op in g.ops]
    for k in ("add", "concat", "avg_pool", "softmax", "fully_connected"):
        assert k in kinds, k
    assert any(op.kind == "conv2d" and op.attrs["groups"] == op.attrs["in_c"] > 1 for op in g.ops)


def test_float_model_is_rejected_with_a_hint(tmp_path):
    with pytest.raises(EdgekilnError, match="edgekiln quantize --scheme int8"):
        load_qdq(tm.small_cnn_float(size=8))


def test_unsupported_op_names_op_and_node(tmp_path):
    model = tm.small_cnn_float(size=8)
    node = next(n for n in model.graph.node if n.name == "relu1")
    node.op_type, node.name = "Softsign", "soft1"  # NOTE: Sigmoid is supported since issue 20
    q = tm.quantize_qdq(model, tmp_path / "soft.onnx")
    with pytest.raises(EdgekilnError, match=r"Softsign \(node 'soft1'\) is not supported"):
        load_qdq(q)


def _hand_qdq_relu():
    """input -Q(0.05, 4)-> DQ -> Relu -> Q(0.03, -10) -> DQ -> output, written by hand (ORT folds lone Relus)."""
    c = onnx.numpy_helper.from_array
    inits = [c(np.array(0.05, np.float32), "s_in"), c(np.array(4, np.int8), "z_in"),
             c(np.array(0.03, np.float32), "s_out"), c(np.array(-10, np.int8), "z_out")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_in", "z_in"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xf"], name="dq_in"),
             helper.make_node("Relu", ["xf"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s_out", "z_out"], ["rq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["rq", "s_out", "z_out"], ["output"], name="dq_out")]
    g = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return m


def test_standalone_relu_becomes_a_requantizing_clamp():
    from edgekiln.codegen.reference import run_graph

    ir = load_qdq(_hand_qdq_relu())
    assert [op.kind for op in ir.ops] == ["requantize"]
    op = ir.ops[0]
    assert (op.attrs["act_min"], op.attrs["act_max"], op.attrs["output_zp"]) == (-10, 127, -10)
    x = np.arange(-128, 128, 16, dtype=np.int8)[None]
    expected = np.clip(np.rint(np.maximum((x.astype(float) - 4) * 0.05, 0) / 0.03) - 10, -128, 127)
    got = run_graph(ir, x)
    assert np.abs(got - expected).max() <= 1 and (got == expected).mean() >= 0.9, (got, expected)
