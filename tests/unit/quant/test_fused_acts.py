"""Conv outputs left float before a float activation (for OpenVINO), and put back exactly for the
integer backends."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekiln.execution.ort import ort_session
from edgekiln.fileio import atomic_save_npz
from edgekiln.passes.quantize import QuantizeConfig, quantize_model
from edgekiln.quant.fused_acts import drop_output_qdq, integer_session, recorded_pairs, restore_output_qdq


def _conv_prelu(path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array(np.full((8, 1, 1), 0.25, np.float32), "slope"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c1", "slope"], ["a1"], name="prelu1"),
             helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_dropped_pairs_come_back_exactly(tmp_path):
    src = _conv_prelu(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((16, 3, 10, 10)).astype(np.float32)
    atomic_save_npz(tmp_path / "c.npz", x=x)
    res = quantize_model(src, QuantizeConfig(speed_rule="on", activations="int8"), tmp_path / "q", calib=tmp_path / "c.npz")
    on = onnx.load(str(res.path))
    fused = onnx.load(str(res.path))
    assert drop_output_qdq(fused), "no Q/DQ pair between conv1 and its float PRelu"
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
    assert restore_output_qdq(restored) and not recorded_pairs(restored)
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in on.graph.node]
