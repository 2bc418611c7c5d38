"""Golden: data movement lowered to ``gather``/``reshape`` (codegen/lower_movement.py) and Pad, on hand-built
QDQ models ``input -> Q -> DQ -> op(s) -> Q -> DQ -> output`` with an awkward zero point (-10). Moving
int8 values is exact, so the integer reference must equal onnxruntime on every element, and the generated
C (host gcc) must equal the reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.codegen.fuse import lower_for_c
from edgekiln.codegen.reference import run_graph
from edgekiln.codegen.verify import ort_int8_outputs, quantize_inputs

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
SEED = 0
SCALE, ZP = 0.05, -10


def _qdq_model(ops, in_shape, inits=()):
    """``ops``: node builders ``(src, dst) -> node`` applied in a chain between a Q/DQ pair and another."""
    t = [numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
         numpy_helper.from_array(np.array(ZP, np.int8), "z"), *inits]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["v0"])]
    for k, build in enumerate(ops):
        nodes.append(build(f"v{k}", f"v{k + 1}"))
    last = f"v{len(ops)}"
    nodes += [helper.make_node("QuantizeLinear", [last, "s", "z"], ["q1"]),
              helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["output"])]
    graph = helper.make_graph(nodes, "moves", [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], t)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


CASES = {
    # name: (ops, input shape, extra initializers)
    "transpose_nhwc": ([lambda a, b: helper.make_node("Transpose", [a], [b], perm=[0, 2, 3, 1])], [1, 3, 4, 5], ()),
    "channel_shuffle": ([lambda a, b: helper.make_node("Reshape", [a, "r5"], [b]),
                         lambda a, b: helper.make_node("Transpose", [a], [b], perm=[0, 2, 1, 3, 4]),
                         lambda a, b: helper.make_node("Reshape", [a, "r4"], [b])], [1, 6, 3, 2],
                        (_i64("r5", [1, 3, 2, 3, 2]), _i64("r4", [1, 6, 3, 2]))),
    "slice_steps": ([lambda a, b: helper.make_node("Slice", [a, "st", "en", "ax", "sp"], [b])], [1, 8, 6, 5],
                    (_i64("st", [1, -1]), _i64("en", [8, 0]), _i64("ax", [1, 2]), _i64("sp", [2, -2]))),
    "split_second": ([lambda a, b: helper.make_node("Split", [a, "sz"], ["unused", b], axis=2)], [1, 4, 6, 3],
                     (_i64("sz", [2, 4]),)),
    "squeeze_unsqueeze": ([lambda a, b: helper.make_node("Unsqueeze", [a, "u"], [b]),
                           lambda a, b: helper.make_node("Squeeze", [a, "u"], [b]),
                           lambda a, b: helper.make_node("Slice", [a, "s0", "s5", "u"], [b])], [1, 7],
                          (_i64("u", [1]), _i64("s0", [0]), _i64("s5", [5]))),
    "gather_const": ([lambda a, b: helper.make_node("Gather", [a, "idx"], [b], axis=1)], [1, 5, 2, 2],
                     (_i64("idx", [4, 0, 0, 2]),)),
    "pad_hw": ([lambda a, b: helper.make_node("Pad", [a, "pads", "pv"], [b])], [1, 2, 3, 4],
               (_i64("pads", [0, 0, 2, 0, 0, 0, 1, 3]), numpy_helper.from_array(np.array(0.5, np.float32), "pv"))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_movement_equals_onnxruntime_and_c(tmp_path, name):
    from test_cnn_ops_exact import _check_c_exact

    ops, shape, inits = CASES[name]
    model = _qdq_model(ops, shape, inits)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    graph = lower_for_c(path)
    rng = np.random.default_rng(SEED)
    q = quantize_inputs(graph, rng.uniform(-7, 7, (12, *shape[1:])).astype(np.float32))
    q[0], q[1] = -128, 127
    ref = _check_c_exact(tmp_path, graph, q, name)
    ort = ort_int8_outputs(path, graph, q).reshape(len(q), -1)
    bad = int((ref != ort).sum())
    assert bad == 0, f"{name}: {bad}/{ref.size} elements differ from onnxruntime (threshold 0, seed {SEED})"
    kinds = {op.kind for op in graph.ops}
    assert kinds <= {"gather", "reshape", "pad"}, kinds


def test_channel_shuffle_composes_to_one_per_pixel_table(tmp_path):
    ops, shape, inits = CASES["channel_shuffle"]
    path = tmp_path / "shuffle.onnx"
    path.write_bytes(_qdq_model(ops, shape, inits).SerializeToString())
    graph = lower_for_c(path)
    assert [op.kind for op in graph.ops] == ["gather"], [op.kind for op in graph.ops]
    op = graph.ops[0]
    assert op.attrs == dict(pixels=6, in_c=6, out_c=6) and op.arrays["index"].tolist() == [0, 2, 4, 1, 3, 5]


def test_views_compose_away(tmp_path):
    """Unsqueeze then Squeeze move nothing (``reshape`` views); with the Slice after them the chain is one
    ``gather`` reading the first 5 of 7 values."""
    ops, shape, inits = CASES["squeeze_unsqueeze"]
    path = tmp_path / "view.onnx"
    path.write_bytes(_qdq_model(ops, shape, inits).SerializeToString())
    graph = lower_for_c(path)
    assert [op.kind for op in graph.ops] == ["gather"], [op.kind for op in graph.ops]
    assert graph.ops[0].arrays["index"].tolist() == [0, 1, 2, 3, 4]
    x = np.arange(-3, 4, dtype=np.int8)[None]
    assert run_graph(graph, x).reshape(-1).tolist() == [-3, -2, -1, 0, 1]
