"""Bias scales computed as input_scale * weight_scale in the graph instead of stored."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _qdq(tmp_path):
    from edgekiln.codegen.testmodels import mobilenet_style_qdq

    return mobilenet_style_qdq(tmp_path / "stored.onnx")


def _exact_products(model, *, nbytes: bool = False) -> int:
    """Convs whose stored bias scale is bit-for-bit input_scale * weight_scale, and longer than 6
    floats (below that a Mul node costs more than the tensor)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    count = size = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            x_s, w_s, b_s = (inits[producer[node.input[i]].input[1]] for i in range(3))
            if b_s.size > 6 and np.array_equal(np.float32(x_s) * w_s.astype(np.float32), b_s):
                count, size = count + 1, size + b_s.nbytes
    return size if nbytes else count


def _session(path, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_compaction_computes_bias_scales_and_runs_bit_exact_with_the_same_kernels(tmp_path):
    from edgekiln.codegen.testmodels import random_inputs
    from edgekiln.quant.compact import compact_qdq
    from edgekiln.quant.size import byte_breakdown

    stored = _qdq(tmp_path)
    shared = tmp_path / "shared.onnx"
    shutil.copy(stored, shared)
    compact_qdq(shared)
    model = onnx.load(str(shared))
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    expected = _exact_products(onnx.load(str(stored)))
    assert expected >= 4 and len(muls) == expected, f"{len(muls)} computed bias scales, {expected} convs qualify"
    before, after = byte_breakdown(stored)["per-channel scales"], byte_breakdown(shared)["per-channel scales"]
    computed = _exact_products(onnx.load(str(stored)), nbytes=True)
    assert before - after >= computed, f"per-channel scale bytes {before} -> {after}; {computed} bytes are computed"

    x = random_inputs((1, 1, 16, 16), 8)
    a, b = _session(stored, tmp_path / "a.opt.onnx"), _session(shared, tmp_path / "b.opt.onnx")
    for i in range(len(x)):
        ya, yb = a.run(None, {"input": x[i:i + 1]})[0], b.run(None, {"input": x[i:i + 1]})[0]
        assert np.array_equal(ya, yb), f"image {i}: max difference {np.abs(ya - yb).max()}"
    from collections import Counter

    kernels = [Counter(n.op_type for n in onnx.load(str(p)).graph.node if n.op_type != "Mul")
               for p in (tmp_path / "a.opt.onnx", tmp_path / "b.opt.onnx")]
    assert kernels[0]["QLinearConv"] > 0 and kernels[0] == kernels[1], \
        f"onnxruntime's optimized graphs differ: stored scales {kernels[0]}, computed {kernels[1]}"


def test_c_backend_and_support_table_fold_the_computed_scales(tmp_path):
    from edgekiln.codegen.ir import load_qdq
    from edgekiln.models.support import unsupported_ops
    from edgekiln.quant.compact import compact_qdq

    stored = _qdq(tmp_path)
    shared = tmp_path / "shared.onnx"
    shutil.copy(stored, shared)
    compact_qdq(shared)
    assert unsupported_ops(onnx.load(str(shared)))["c"] == []
    g1, g2 = load_qdq(stored), load_qdq(shared)
    assert [op.kind for op in g1.ops] == [op.kind for op in g2.ops]
    for o1, o2 in zip(g1.ops, g2.ops, strict=True):
        for key in o1.arrays:
            assert np.array_equal(o1.arrays[key], o2.arrays[key]), f"{o1.kind} {key} differs"


def test_a_scale_that_is_not_exactly_the_product_stays_stored(tmp_path):
    from onnx import numpy_helper

    from edgekiln.quant.bias_scale import share_bias_scales

    model = onnx.load(str(_qdq(tmp_path)))
    exact = _exact_products(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    biases = [producer[n.input[2]] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2
              and len(onnx.numpy_helper.to_array(next(i for i in model.graph.initializer
                                                      if i.name == producer[n.input[2]].input[1]))) > 6]
    inits = {i.name: i for i in model.graph.initializer}
    target = inits[biases[0].input[1]]
    off = numpy_helper.to_array(target).copy()
    off.view(np.uint32)[0] += 1                     # one ulp away from input_scale * weight_scale
    target.CopyFrom(numpy_helper.from_array(off, target.name))
    assert share_bias_scales(model) == exact - 1
    assert biases[0].input[1] == target.name
