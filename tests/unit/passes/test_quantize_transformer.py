"""int8-dynamic on a tiny token-id encoder (two int64 inputs, embeddings, masked attention,
residual + LayerNorm): the shape of MiniLM at a few thousand parameters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.fileio import atomic_save_npz
from edgekiln.models.metrics import evaluate, run_outputs

VOCAB, SEQ, HID = 400, 16, 32


def _encoder(path, seed=0):
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    emb = (rng.standard_normal((VOCAB, HID)) * 0.5).astype(np.float32)
    emb[:, 5] *= 20.0   # an outlier channel, as BERT-family LayerNorm inputs and outputs have
    consts = {"one": np.array(1, np.int64), "zero": np.array(0.0, np.float32),
              "fill": np.array(np.finfo(np.float32).min, np.float32), "scale": np.array(HID ** -0.5, np.float32),
              "ln_g": np.ones(HID, np.float32), "ln_b": np.zeros(HID, np.float32), "axes": np.array([1], np.int64)}
    inits = [numpy_helper.from_array(emb, "emb"), w("wq", HID, HID), w("wk", HID, HID), w("wv", HID, HID),
             w("wo", HID, HID), *[numpy_helper.from_array(v, k) for k, v in consts.items() if k not in ("zero", "fill")]]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("LayerNormalization", ["e", "ln_g", "ln_b"], ["h"], name="ln0", axis=-1),
        *[helper.make_node("MatMul", ["h", f"w{k}"], [k], name=f"{k}_proj") for k in "qkv"],
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Equal", ["mask", "one"], ["keep"]),
        helper.make_node("Unsqueeze", ["keep", "axes"], ["keep3"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(consts["zero"])),
        helper.make_node("Constant", [], ["fill"], value=numpy_helper.from_array(consts["fill"])),
        helper.make_node("Where", ["keep3", "zero", "fill"], ["madd"]),
        helper.make_node("Add", ["s1", "madd"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="context"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="out_proj"),
        helper.make_node("Add", ["o", "h"], ["r"], name="residual"),
        helper.make_node("LayerNormalization", ["r", "ln_g", "ln_b"], ["y"], name="ln1", axis=-1),
        helper.make_node("ReduceMean", ["y", "axes"], ["pooled"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", SEQ]),
                                                 helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", SEQ])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", HID])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _tokens(seed, n):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n, SEQ)).astype(np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    for i, length in enumerate(rng.integers(3, SEQ, size=n)):
        mask[i, :length] = 1
    return {"ids": ids, "mask": mask}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder")
    _encoder(d / "model.onnx")
    atomic_save_npz(d / "calib.npz", **_tokens(1, 16))
    atomic_save_npz(d / "eval.npz", **_tokens(2, 24))
    return d


def test_int8_dynamic_encoder_structure_and_rewrites(encoder, tmp_path):
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    res = quantize_model(encoder / "model.onnx", QuantizeConfig(scheme="int8-dynamic"), tmp_path,
                         calib=encoder / "calib.npz")
    m = onnx.load(str(res.path))
    ops = [n.op_type for n in m.graph.node]
    int8_mm = ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul")
    assert int8_mm == 4, f"{int8_mm} int8 MatMuls (want q, k, v, out projections; activation x activation stay float)"
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    tables = [a for a in inits.values() if a.shape == (VOCAB, HID)]
    assert len(tables) == 1 and tables[0].dtype == np.int8, [(a.shape, a.dtype) for a in tables]
    assert any(a.shape == (VOCAB, 1) and a.dtype == np.float32 for a in inits.values()), "no per-row table scales"
    assert res.rewrites["mask_fills"] == 1 and res.rewrites["embedding_tables"] == ["emb"], res.rewrites
    assert res.rewrites["smoothed"], f"the outlier channel was not smoothed: {res.rewrites}"
    fills = [numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"]
    assert not any((f <= -1e30).all() for f in fills if f.dtype == np.float32 and f.size), "mask fill left at -3.4e38"


def test_int8_dynamic_encoder_keeps_the_embeddings(encoder, tmp_path):
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    res = quantize_model(encoder / "model.onnx", QuantizeConfig(scheme="int8-dynamic"), tmp_path,
                         calib=encoder / "calib.npz", eval_npz=encoder / "eval.npz", metric="cosine")
    data = _tokens(2, 24)
    y, yq = run_outputs(encoder / "model.onnx", data), run_outputs(res.path, data)
    cos = (y * yq).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(yq, axis=1)
    # Floor: measured mean 0.99985, min 0.99951 (seed 0); 1 - 0.995 leaves 10x that error, and
    # well-formed int8 cannot lose more on 4 projections of a 32-wide model.
    assert cos.min() >= 0.995, f"min cosine {cos.min():.5f} < 0.995 (seed 0, mean {cos.mean():.5f})"
    assert abs(res.metric - float(cos.mean())) <= 1e-6, f"reported {res.metric} vs recomputed {cos.mean()}"


def test_two_input_token_model_runs_in_a_strict_pipeline(encoder, tmp_path):
    from edgekiln.models.intake import load_model
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.quantize import QuantizeConfig
    from edgekiln.pipeline import Step, run_pipeline

    art = load_model(encoder / "model.onnx")
    ctx = PassContext(work_dir=tmp_path, calib_path=encoder / "calib.npz", eval_path=encoder / "eval.npz",
                      metric="cosine", strict=True, quiet=True)
    out = run_pipeline(art, [Step("quantize", QuantizeConfig(scheme="int8-dynamic"))], ctx)
    drop = evaluate(encoder / "model.onnx", encoder / "eval.npz", "cosine", reference_path=encoder / "model.onnx") - \
        evaluate(out.path, encoder / "eval.npz", "cosine", reference_path=encoder / "model.onnx")
    assert out.kind == "onnx-qdq" and drop <= 0.005, f"kind {out.kind}, cosine drop {drop:.5f}"


def test_optimize_searches_both_int8_schemes_for_matmul_models(encoder):
    from edgekiln.models.intake import load_model
    from edgekiln.search.recipe import Recipe
    from edgekiln.search.space import default_space

    recipe = Recipe.from_dict({"model": str(encoder / "model.onnx"), "metric": "cosine", "target": "host",
                               "constraints": {"max_drop": 0.005}})
    (space,) = default_space(load_model(encoder / "model.onnx"), recipe, ("int8", "fp16", "fp32"))
    assert space.name == "quantize" and space.options["scheme"] == ("int8-dynamic", "int8"), space
    assert space.options["outlier_rows"] == (False,), space
    assert space.options["max_drop"] == (0.005,) and len(space.options["smooth_alpha"]) > 1, space
