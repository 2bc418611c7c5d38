"""Model analysis: exact MACs/params per op family, QDQ parity, dynamic dims, compatibility.

Every expected number is derived by hand next to the assertion.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.errors import EdgekilnError
from edgekiln.models.analysis import analyze
from edgekiln.models.analysis_report import render_markdown
from edgekiln.models.support import unsupported_ops

SEED = 0


def _model(nodes, inputs, outputs, inits=(), opset=17):
    rng = np.random.default_rng(SEED)
    tensors = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in inits]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return m


def _conv_model(batch="N"):
    return _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3])],
                  [("x", [batch, 1, 28, 28])], ["y"], [("w", (8, 1, 3, 3)), ("b", (8,))])


def _layer(a, name):
    return next(layer for layer in a.layers if layer.name == name)


def test_conv_macs_params_and_activation_bytes():
    a = analyze(_conv_model())
    # 8 out channels * 26*26 * 1*3*3 = 48672
    assert a.macs == 48672, a.macs
    # weights 8*1*3*3 = 72 + bias 8
    assert a.params == 80, a.params
    conv = _layer(a, "conv")
    assert conv.output_shape == (1, 8, 26, 26)
    # 8*26*26 floats * 4 bytes = 21632
    assert conv.activation_bytes == 21632
    # io: input 28*28*4 = 3136 + output 21632
    assert a.io_bytes == 3136 + 21632
    # weights: 80 floats * 4 bytes
    assert a.weight_bytes == 320
    assert a.model_bytes == a.to_dict()["model_bytes"] > 320


def test_batch_from_input_shapes_scales_macs():
    # batch 4: 4 * 48672 = 194688; without a shape the dynamic batch is 1.
    assert analyze(_conv_model(), {"x": (4, 1, 28, 28)}).macs == 194688
    assert analyze(_conv_model(batch=3)).macs == 3 * 48672


@pytest.mark.parametrize(("x_shape", "w_shape", "group", "expected"), [
    # depthwise: 8 channels * 10*10 outputs (pad 1) * (8/8)*3*3 = 7200
    ((1, 8, 10, 10), (8, 1, 3, 3), 8, 7200),
    # grouped: 16 out * 4*4 outputs * (8/2)*3*3 = 9216
    ((1, 8, 6, 6), (16, 4, 3, 3), 2, 9216),
])
def test_grouped_and_depthwise_conv(x_shape, w_shape, group, expected):
    pads = [1, 1, 1, 1] if group == 8 else [0, 0, 0, 0]
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=group, pads=pads)],
               [("x", list(x_shape))], ["y"], [("w", w_shape)])
    assert analyze(m).macs == expected


@pytest.mark.parametrize(("group", "w_shape", "out_channels"), [(1, (4, 3, 3, 3), 3), (2, (4, 3, 3, 3), 6)])
def test_conv_transpose(group, w_shape, out_channels):
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", strides=[2, 2], group=group)],
               [("x", [1, 4, 5, 5])], ["y"], [("w", w_shape)])
    a = analyze(m)
    # (5-1)*2 + 3 = 11; each of the 4*5*5 inputs is scattered into (Cout/group)*3*3 = 27 outputs: 100*27 = 2700
    assert _layer(a, "ct").output_shape == (1, out_channels, 11, 11)
    assert a.macs == 2700


def test_gemm_trans_b_and_trans_a():
    m = _model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="fc", transB=1),
                helper.make_node("Gemm", ["t", "u"], ["z"], name="ta", transA=1)],
               [("a", [1, 20]), ("t", [20, 3])], ["y", "z"], [("b", (30, 20)), ("c", (30,)), ("u", (20, 5))])
    a = analyze(m)
    # fc: M=1, N=30, K=20 -> 600; ta: A^T is 3x20, B 20x5 -> 3*5*20 = 300
    assert (_layer(a, "fc").macs, _layer(a, "ta").macs) == (600, 300)
    # fc reads 30*20 + 30 = 630 params; ta reads 20*5 = 100
    assert (_layer(a, "fc").params, a.params) == (630, 730)


def test_matmul_with_broadcast_batch_dims():
    m = _model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm"),
                helper.make_node("MatMul", ["p", "q"], ["z"], name="bmm")],
               [("a", [2, 3, 4, 5]), ("p", [4, 1, 3, 5])], ["y", "z"], [("w", (5, 6)), ("q", (2, 5, 7))])
    a = analyze(m)
    # mm: out 2x3x4x6, K=5 -> 2*3*4*6*5 = 720; bmm: out 4x2x3x7 (broadcast), K=5 -> 4*2*3*7*5 = 840
    assert _layer(a, "bmm").output_shape == (4, 2, 3, 7)
    assert (_layer(a, "mm").macs, _layer(a, "bmm").macs) == (720, 840)


def test_shared_initializer_counts_once_in_total():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="m1"),
                helper.make_node("MatMul", ["h", "w"], ["y"], name="m2")], [("x", [1, 4])], ["y"], [("w", (4, 4))])
    a = analyze(m)
    assert [layer.params for layer in a.layers] == [16, 16]
    assert a.params == 16


def test_qdq_model_keeps_float_macs_and_params(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgekiln.execution.ort import readable_file
    from edgekiln.testing.tiny import tiny_conv_onnx

    float_path = tiny_conv_onnx(tmp_path / "f.onnx", batch=1)
    rng = np.random.default_rng(SEED)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    qdq_path = tmp_path / "q.onnx"
    # NOTE: onnxruntime's quantizer opens the file itself: it needs the IR/opset onnxruntime reads
    quantize_static(str(readable_file(float_path)), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    f, q = analyze(float_path), analyze(qdq_path)
    # conv 4*6*6*1*3*3 = 1296 + gemm 144*10 = 1440
    assert f.macs == q.macs == 2736, (f.macs, q.macs)
    # 36 + 4 + 1440 + 10 = 1490 (scales and zero points are not parameters)
    assert f.params == q.params == 1490, (f.params, q.params)
    conv = next(layer for layer in q.layers if layer.op == "Conv")
    assert (conv.params, conv.macs) == (40, 1296)
    # Weight DequantizeLinear nodes are folded constants, not activations.
    weight_dq = [layer for layer in q.layers if layer.constant]
    assert len(weight_dq) == 4 and all(layer.op == "DequantizeLinear" and layer.activation_bytes == 0
                                       for layer in weight_dq)
    # int8 weights (1476 B) + int32 biases (56 B) + per-channel scales < the float 5960 B
    assert 1476 + 56 < q.weight_bytes < f.weight_bytes == 5960, (q.weight_bytes, f.weight_bytes)


def test_residual_liveness_peak_by_hand():
    # x 1x4x8x8 (1024 B) -> conv1 (4->8) a 2048 B -> relu b 2048 -> conv2 (8->4) c 1024 -> add(x, c) s 1024 -> relu y
    m = _model([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["x", "c"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu2"),
    ], [("x", [1, 4, 8, 8])], ["y"], [("w1", (8, 4, 3, 3)), ("w2", (4, 8, 3, 3))])
    a = analyze(m)
    # step 0: x+a = 3072; 1: x+a+b = 5120; 2: x+b+c = 4096; 3: x+c+s = 3072; 4: s+y = 2048
    assert a.live_bytes_per_step == (3072, 5120, 4096, 3072, 2048)
    assert (a.peak_activation_bytes, a.peak_step) == (5120, 1)


def test_non_topological_order_is_rejected():
    m = _model([helper.make_node("Relu", ["h"], ["y"], name="second"), helper.make_node("Relu", ["x"], ["h"], name="first")],
               [("x", [1, 4])], ["y"])
    with pytest.raises(EdgekilnError, match="not topological"):
        analyze(m)


def test_dynamic_dim_without_shape_names_the_input():
    m = _model([helper.make_node("Relu", ["img"], ["y"])], [("img", ["N", 3, "H", "W"])], ["y"])
    with pytest.raises(EdgekilnError) as info:
        analyze(m)
    msg = str(info.value)
    assert "'img'" in msg and "pass a shape" in msg and "\n" not in msg, msg
    assert analyze(m, {"img": (1, 3, 4, 4)}).io_bytes == 2 * 48 * 4


def test_onnxruntime_fallback_for_shapes_onnx_cannot_infer():
    g = helper.make_graph([helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft", name="gelu"),
                           helper.make_node("Relu", ["g"], ["y"], name="relu")], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    a = analyze(m, {"x": (2, 3, 5)})
    assert a.shape_source == "onnxruntime"
    assert [layer.output_shape for layer in a.layers] == [(2, 3, 5), (2, 3, 5)]
    assert a.unsupported["c"] == ["Gelu (gelu)"] and a.unsupported["onnxruntime"] == []


def test_unsupported_ops_and_trivial_transpose():
    m = _model([helper.make_node("Transpose", ["x"], ["t"], name="flat", perm=[0, 2, 3, 1]),
                helper.make_node("Transpose", ["z"], ["u"], name="real", perm=[0, 2, 3, 1]),
                helper.make_node("Erf", ["u"], ["v"], name="erf"),
                helper.make_node("Constant", [], ["k"], name="k", value_float=1.0)],
               [("x", [1, 8, 1, 1]), ("z", [1, 3, 4, 5])], ["t", "v", "k"])
    a = analyze(m)
    # (1,8,1,1) -> (1,1,1,8) moves no data; (1,3,4,5) -> (1,4,5,3) does.
    assert a.unsupported["tflite"] == ["Transpose (real)", "Erf (erf)"]
    assert a.unsupported["c"] == ["Erf (erf)"]  # C lowers any permutation (a gather)
    assert a.unsupported["int8-qdq"] == ["Erf (erf)"]
    # Without shapes, only identity permutations are trusted.
    assert unsupported_ops(m)["tflite"] == ["Transpose (flat)", "Transpose (real)", "Erf (erf)"]


def test_to_dict_is_json_and_markdown_has_sections(tmp_path):
    a = analyze(_conv_model())
    d = json.loads(json.dumps(a.to_dict()))
    for key in ("params", "macs", "model_bytes", "weight_bytes", "io_bytes", "peak_activation_bytes", "peak_step",
                "layers", "op_counts", "unsupported"):
        assert key in d, key
    assert d["layers"][0] == {"name": "conv", "op": "Conv", "output_shape": [1, 8, 26, 26], "params": 80,
                              "macs": 48672, "activation_bytes": 21632, "constant": False}
    md = render_markdown(a)
    assert "48,672" in md and "## Layers" in md and "## Compatibility" in md
    from edgekiln.testing.tiny import tiny_conv_onnx

    path = tiny_conv_onnx(tmp_path / "c.onnx")
    assert analyze(path).model_bytes == path.stat().st_size
