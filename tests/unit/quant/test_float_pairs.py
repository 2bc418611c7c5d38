"""Conv outputs left float before a float activation (for OpenVINO), and put back exactly for the
integer backends."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekiln.execution.ort import ort_session
from edgekiln.fileio import atomic_save_npz
from edgekiln.models.qdq_pairs import recorded_pairs, restore_qdq_pairs
from edgekiln.passes.quantize import QuantizeConfig, quantize_model
from edgekiln.quant.float_pairs import drop_activation_pairs, integer_session, keep_weighted_inputs


def _save(path, nodes, inits, out_shape):
    """The graph x (1x3x10x10) -> ``nodes`` -> y (``out_shape``), saved at ``path``."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _conv_prelu(path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array(np.full((8, 1, 1), 0.25, np.float32), "slope"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c1", "slope"], ["a1"], name="prelu1"),
             helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2")]
    return _save(path, nodes, inits, [1, 4, 10, 10])


def test_dropped_pairs_come_back_exactly(tmp_path):
    src = _conv_prelu(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((16, 3, 10, 10)).astype(np.float32)
    atomic_save_npz(tmp_path / "c.npz", x=x)
    res = quantize_model(src, QuantizeConfig(speed_rule="on", activations="int8"), tmp_path / "q", calib=tmp_path / "c.npz")
    on = onnx.load(str(res.path))
    fused = onnx.load(str(res.path))
    assert drop_activation_pairs(fused), "no Q/DQ pair between conv1 and its float PRelu"
    onnx.checker.check_model(fused, full_check=True)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("QuantizeLinear") == [n.op_type for n in on.graph.node].count("QuantizeLinear") - 1, ops
    assert len(recorded_pairs(fused)) == 1
    fused_path = tmp_path / "fused.onnx"
    onnx.save(fused, str(fused_path))
    a, b = ort_session(res.path), integer_session(fused_path)
    for i in range(4):
        feed = {"x": x[i:i + 1]}
        ya, yb = a.run(None, feed)[0], b.run(None, feed)[0]
        assert np.array_equal(ya, yb), f"sample {i}: restored differs by {np.abs(ya - yb).max()} (must be 0)"
    restored = onnx.load(str(fused_path))
    assert restore_qdq_pairs(restored) and not recorded_pairs(restored)
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in on.graph.node]


def _conv_pool_conv(path):
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["y"], name="gate")]
    return _save(path, nodes, inits, [1, 4, 5, 5])


def test_inputs_form_quantizes_only_what_convs_read_and_comes_back_exactly(tmp_path):
    """NNCF's placement: Q/DQ only where a Conv reads; the graph output float; restored exactly."""
    from edgekiln.models.analysis import analyze

    src = _conv_pool_conv(tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((16, 3, 10, 10)).astype(np.float32)
    atomic_save_npz(tmp_path / "c.npz", x=x)
    res = quantize_model(src, QuantizeConfig(speed_rule="off", activations="int8"), tmp_path / "q", calib=tmp_path / "c.npz")
    on = onnx.load(str(res.path))
    form = onnx.load(str(res.path))
    left_float = keep_weighted_inputs(form)
    onnx.checker.check_model(form, full_check=True)
    producer = {o: n for n in form.graph.node for o in n.output}
    readers = {i: n.op_type for n in form.graph.node for i in n.input}
    # every activation DequantizeLinear left feeds a Conv; the output is written by the float Sigmoid
    act_dq = [n for n in form.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in producer]
    assert act_dq and all(readers.get(n.output[0]) == "Conv" for n in act_dq), [(n.output[0], readers.get(n.output[0])) for n in act_dq]
    assert producer["y"].op_type == "Sigmoid", producer["y"].op_type
    assert "y" in {r["dq"] for r in recorded_pairs(form).values()}, left_float
    path = tmp_path / "inputs.onnx"
    onnx.save(form, str(path))
    a, b = ort_session(res.path), integer_session(path)
    for i in range(4):
        feed = {"x": x[i:i + 1]}
        ya, yb = a.run(None, feed)[0], b.run(None, feed)[0]
        assert np.array_equal(ya, yb), f"sample {i}: restored differs by {np.abs(ya - yb).max()} (must be 0)"
    restored = onnx.load(str(path))
    restore_qdq_pairs(restored)
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in on.graph.node]
    assert {i.name for i in restored.graph.initializer} == {i.name for i in on.graph.initializer}
    # onnxruntime's quantizer folds the Relu into conv1's output pair (zero point at -128): removing
    # that pair must keep the clamp (a Clip), else the form computes another function
    assert "Relu" not in [n.op_type for n in on.graph.node] and "Clip" in [n.op_type for n in form.graph.node]
    ref, q_on, q_in = ort_session(src), ort_session(res.path), ort_session(path)
    held = [{"x": x[i:i + 1]} for i in range(8, 16)]

    def sqnr(sess):
        y = np.concatenate([ref.run(None, f)[0].ravel() for f in held])
        e = y - np.concatenate([sess.run(None, f)[0].ravel() for f in held])
        return 20 * np.log10(np.linalg.norm(y) / np.linalg.norm(e))

    assert sqnr(q_in) >= sqnr(q_on) - 0.5, f"inputs form SQNR {sqnr(q_in):.1f} dB < on form's {sqnr(q_on):.1f} - 0.5"
    # deployed as int8 (C, TFLite), the float-left activations are int8 too: the analysis counts them so
    want, got = analyze(res.path, precision="int8").peak_activation_bytes, analyze(path, precision="int8").peak_activation_bytes
    assert got == want, f"int8 peak activations of the inputs form {got} B != the integer model's {want} B"


def test_kernel_kinds_of_a_form_without_its_pairs_match_the_int8_analysis(tmp_path):
    """`fits --target cortex-m7` on a quantize folder whose timed form left a pair out crashed
    (zip of the file's nodes with the int8 analysis, which puts the pair back): the form is chosen by
    timing, so the crash came and went with machine load."""
    from edgekiln.models.analysis import analyze
    from edgekiln.targets.kernel_kinds import macs_by_kernel_kind

    src = _conv_prelu(tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((8, 3, 10, 10)).astype(np.float32)
    atomic_save_npz(tmp_path / "c.npz", x=x)
    res = quantize_model(src, QuantizeConfig(speed_rule="on", activations="int8"), tmp_path / "q", calib=tmp_path / "c.npz")
    fused = onnx.load(str(res.path))
    assert drop_activation_pairs(fused)
    fused_path = tmp_path / "fused.onnx"
    onnx.save(fused, str(fused_path))
    want = macs_by_kernel_kind(res.path, analyze(res.path, precision="int8").layers)
    got = macs_by_kernel_kind(fused_path, analyze(fused_path, precision="int8").layers)
    assert got == want and want.get("conv"), (got, want)
