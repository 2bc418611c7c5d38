"""The simplify pass: fewer nodes, the same function, portable ops only at the basic level."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.errors import EdgekilnError
from edgekiln.execution.ort import ort_session
from edgekiln.execution.specs import TensorSpec
from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact
from edgekiln.passes.base import PassContext
from edgekiln.passes.simplify import SimplifyConfig, run


def _conv_bn_model(path):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Identity", ["n"], ["i"], name="id"),
        helper.make_node("Relu", ["i"], ["y"], name="relu"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return ModelArtifact(kind=ONNX_FLOAT, path=path, inputs=(TensorSpec("x", (1, 1, 8, 8)),))


def _outputs(path, x):
    sess = ort_session(path, optimize=False)
    return sess.run(None, {"x": x})[0]


def test_basic_level_fuses_bn_and_keeps_the_function(tmp_path):
    art = _conv_bn_model(tmp_path / "m.onnx")
    out = run(art, SimplifyConfig(), PassContext(work_dir=tmp_path / "w", quiet=True))
    model = onnx.load(str(out.path))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and "Identity" not in ops, f"not simplified: {ops}"
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "basic level must keep standard ONNX ops"
    rec = out.provenance[-1]
    assert (rec["nodes_before"], rec["nodes_after"]) == (4, 2), rec
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
    ref, got = _outputs(art.path, x), _outputs(out.path, x)
    rel = float(np.abs(ref - got).max() / np.abs(ref).max())
    assert rel < 1e-5, f"relative error {rel:.3g} >= 1e-5 (seed 3)"
    assert not list((tmp_path / "w").glob("*.tmp")), "temporary file left behind"


def test_bad_level_is_refused_and_unloadable_model_names_the_file(tmp_path):
    with pytest.raises(EdgekilnError, match="level must be one of basic, extended"):
        SimplifyConfig.from_dict({"level": "max"})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    art = ModelArtifact(kind=ONNX_FLOAT, path=bad, inputs=(TensorSpec("x", (1, 4)),))
    with pytest.raises(EdgekilnError, match=r"simplify: onnxruntime cannot load .*bad.onnx"):
        run(art, SimplifyConfig(), PassContext(work_dir=tmp_path / "w", quiet=True))
