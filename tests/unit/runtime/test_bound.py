"""BoundSession: a session whose batch-1 input and outputs live in numpy buffers bound once."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")


def _model(path, op: str, *, inputs: int = 1):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["N", 3]) for i in range(inputs)]
    nodes = [helper.make_node(op, ["x0", "three"], ["y"]), helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0)]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"])]
    model = helper.make_model(helper.make_graph(nodes, "m", ins, outs, [three]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    from edgekiln.execution.ort import ort_session

    return ort_session(path)


def test_chained_sessions_match_plain_runs_and_see_each_new_input(tmp_path):
    from edgekiln.runtime.bound import BoundSession

    mul, add = _model(tmp_path / "mul.onnx", "Mul"), _model(tmp_path / "add.onnx", "Add")
    first = BoundSession(mul, np.zeros((1, 3), np.float32))
    second = BoundSession(add, first.outputs[0])          # chained: no copy between the two
    for x in (np.array([[1.0, 2.0, 3.0]], np.float32), np.array([[-4.0, 0.5, 7.0]], np.float32)):
        np.copyto(first.input, x)
        y1, s1 = (o.copy() for o in first())
        y2, s2 = second()
        ref1 = mul.run(None, {"x0": x})
        ref2 = add.run(None, {"x0": ref1[0]})
        assert np.allclose(y1, ref1[0]) and np.allclose(s1, ref1[1]), (y1, s1, ref1)
        assert np.allclose(y2, ref2[0]) and np.allclose(s2, ref2[1]), (y2, s2, ref2)


def test_refuses_what_it_cannot_bind(tmp_path):
    from edgekiln.runtime.bound import BoundSession

    two = _model(tmp_path / "two.onnx", "Mul", inputs=2)
    with pytest.raises(ValueError, match="single-input model, this one has 2 inputs"):
        BoundSession(two, np.zeros((1, 3), np.float32))
    one = _model(tmp_path / "one.onnx", "Mul")
    with pytest.raises(ValueError, match="C-contiguous"):
        BoundSession(one, np.zeros((3, 2), np.float32).T)
