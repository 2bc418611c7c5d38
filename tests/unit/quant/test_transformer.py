"""Transformer rewrites for dynamic int8: each keeps the float function; smoothing and per-row
embedding tables make int8 more accurate. Tiny hand-built graphs, seeded."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekiln.execution.ort import ort_session
from edgekiln.fileio import atomic_save_npz
from edgekiln.models.metrics import run_outputs
from edgekiln.passes.quantize import QuantizeConfig, quantize_model
from edgekiln.quant import transformer as tr


def _model(nodes, inputs, outputs, inits):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _run(model, feeds):
    sess = ort_session(model, threads=1)
    return sess.run(None, feeds)[0]


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _masked_softmax_model():
    """scores + Where(mask, 0, finfo.min) -> Softmax: how exporters write attention masks."""
    nodes = [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
             helper.make_node("Constant", [], ["fill"],
                              value=numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32))),
             helper.make_node("Where", ["mask", "zero", "fill"], ["add_mask"]),
             helper.make_node("Add", ["scores", "add_mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1)]
    return _model(nodes, [_vi("scores", [1, 4, 16, 16]), _vi("mask", [1, 1, 1, 16], TensorProto.BOOL)],
                  [_vi("p", [1, 4, 16, 16])], [])


def test_soft_mask_fill_keeps_the_softmax_and_changes_only_the_fill():
    rng = np.random.default_rng(0)
    model = _masked_softmax_model()
    mask = np.zeros((1, 1, 1, 16), bool)
    mask[..., :5] = True   # 11 of 16 keys are padding
    feeds = {"scores": (4 * rng.standard_normal((1, 4, 16, 16))).astype(np.float32), "mask": mask}
    before = _run(model, feeds)
    assert tr.soften_mask_fills(model) == 1
    fills = [numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"]
    assert sorted(float(f) for f in fills) == [tr.MASK_FILL, 0.0]
    after = _run(model, feeds)
    # masked keys get weight exp(-40 + spread) ~ 1e-14 instead of 0: below float32 resolution of 1
    err = float(np.abs(after - before).max())
    assert err <= 1e-7, f"softmax changed by {err:.3g} (> 1e-7, seed 0)"
    assert np.allclose(after[..., 5:], 0.0, atol=1e-12)


def test_soft_mask_fill_leaves_constants_that_feed_no_softmax():
    nodes = [helper.make_node("Constant", [], ["c"],
                              value=numpy_helper.from_array(np.array(-3e38, np.float32))),
             helper.make_node("Max", ["x", "c"], ["y"])]
    model = _model(nodes, [_vi("x", [4])], [_vi("y", [4])], [])
    assert tr.soften_mask_fills(model) == 0


def _residual_ln_model(rng):
    g = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "g")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    nodes = [helper.make_node("Add", ["x", "r"], ["s"], name="residual"),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["n"], axis=-1),
             helper.make_node("Add", ["n", "x"], ["y"], name="other")]
    return _model(nodes, [_vi("x", [1, 8, 32]), _vi("r", [1, 8, 32])], [_vi("y", [1, 8, 32])], [g, b])


def test_residual_adds_before_layernorm_become_sum_with_identical_outputs():
    rng = np.random.default_rng(1)
    model = _residual_ln_model(rng)
    feeds = {k: rng.standard_normal((1, 8, 32)).astype(np.float32) for k in ("x", "r")}
    before = _run(model, feeds)
    assert tr.residual_adds_as_sum(model) == 1
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["residual"] == "Sum" and ops["other"] == "Add", ops
    # the "before" model ran onnxruntime's fused SkipLayerNormalization, which rounds differently:
    # equal to float32 rounding of the output range, not bit for bit
    err = float(np.abs(_run(model, feeds) - before).max() / np.abs(before).max())
    assert err <= 1e-6, f"outputs differ by {err:.3g} of their range (> 1e-6, seed 1)"


def test_embedding_table_rows_are_int8_with_their_own_scale():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((300, 64)).astype(np.float32) * np.geomspace(1e-3, 10, 300)[:, None].astype(np.float32)
    model = _model([helper.make_node("Gather", ["emb", "ids"], ["y"], name="embed")],
                   [_vi("ids", [1, 12], TensorProto.INT64)], [_vi("y", [1, 12, 64])],
                   [numpy_helper.from_array(table, "emb")])
    ids = np.array([[0, 1, 5, 17, 150, 299, 298, 2, 3, 100, 200, 299]], np.int64)
    assert tr.embedding_tables_per_row(model, min_elements=1000) == ["emb"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q, scale = inits["emb_int8"], inits["emb_row_scale"]
    assert q.dtype == np.int8 and scale.shape == (300, 1) and "emb" not in inits
    # independent formula: symmetric, one scale per row = max|row| / 127, round half to even
    expect_scale = np.abs(table.astype(np.float64)).max(1, keepdims=True) / 127
    np.testing.assert_allclose(scale, expect_scale, rtol=1e-6)
    np.testing.assert_array_equal(q, np.clip(np.round(table / expect_scale), -127, 127).astype(np.int8))
    got = _run(model, {"ids": ids})
    ref = table[ids]
    # error in units of each row's own step: rounding gives at most half a step
    steps = np.abs(got - ref) / expect_scale[ids].astype(np.float32)
    assert steps.max() <= 0.5 + 1e-3, f"max error {steps.max():.4f} steps > 0.5 (seed 2)"


def _outlier_matmul_model(path, rng):
    """x (tokens x 32, channel 3 is a 40x outlier as in BERT's LayerNorm outputs) -> MatMul -> MatMul."""
    w1 = (rng.standard_normal((32, 48)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((48, 16)) * 0.2).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                    helper.make_node("Relu", ["h"], ["a"], name="relu"),
                    helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2")],
                   [_vi("x", ["N", 16, 32])], [_vi("y", ["N", 16, 16])],
                   [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(model, str(path))
    return path


def _outlier_inputs(rng, n, where=(Ellipsis, 3)):
    """(n, 16, 32) normal samples, 40x larger at ``where`` (default: channel 3)."""
    x = rng.standard_normal((n, 16, 32)).astype(np.float32)
    x[where] *= 40.0
    return x


def _calibrated(tmp_path, build, inputs, seed):
    """The model ``build`` writes, 16 calibration samples (seed), 16 test samples (seed + 1) and
    the float outputs on them."""
    rng = np.random.default_rng(seed)
    src = build(tmp_path / "m.onnx", rng)
    atomic_save_npz(tmp_path / "calib.npz", x=inputs(rng, 16))
    x = inputs(np.random.default_rng(seed + 1), 16)
    return src, x, run_outputs(src, {"x": x})


def _quantized_sqnr(src, cfg, work, x, y):
    """SQNR (dB) of the quantized model's outputs on ``x`` against the float ones ``y``; calibrated
    on ``work/../calib.npz``."""
    res = quantize_model(src, cfg, work, calib=work.parent / "calib.npz")
    yq = run_outputs(res.path, {"x": x})
    return float(20 * np.log10(np.linalg.norm(y) / np.linalg.norm(y - yq))), res


def test_smoothing_keeps_the_float_function(tmp_path):
    rng = np.random.default_rng(3)
    model = onnx.load(str(_outlier_matmul_model(tmp_path / "m.onnx", rng)))
    x = _outlier_inputs(rng, 8)
    before = _run(model, {"x": x[:1]})
    report = tr.smooth_activations(model, [{"x": x[i:i + 1]} for i in range(8)], alpha=0.7)
    assert "x" in report and report["x"] >= 1.5, report
    after = _run(model, {"x": x[:1]})
    err = float(np.abs(after - before).max() / np.abs(before).max())
    assert err <= 1e-5, f"smoothing changed the float output by {err:.3g} of its range (seed 3)"


def test_smoothing_raises_dynamic_int8_sqnr_on_outlier_channels(tmp_path):
    src, x, y = _calibrated(tmp_path, _outlier_matmul_model, _outlier_inputs, seed=4)

    def sqnr(alpha):
        return _quantized_sqnr(src, QuantizeConfig(scheme="int8-dynamic", smooth_alpha=alpha), tmp_path / f"q{alpha}",
                               x, y)

    plain, _ = sqnr(None)
    smooth, res = sqnr(0.7)
    assert "x" in res.rewrites["smoothed"], res.rewrites
    # Without smoothing the 40x channel sets the step for the other 31 (measured 31.9 dB, seed 4);
    # with it 41.2 dB. Asking for +3 dB leaves room for other seeds and still fails a no-op.
    assert smooth >= plain + 3.0, f"SQNR with smoothing {smooth:.1f} dB vs {plain:.1f} dB without (need +3 dB, seed 4)"



def _massive_row_model(path, rng):
    """x (1, 16, 32) -> MatMul W -> LayerNormalization -> Softmax: an attention-like graph whose
    MatMul input carries a massive first row (as BERT's [CLS] token does)."""
    w = numpy_helper.from_array((rng.standard_normal((32, 24)) / 6).astype(np.float32), "w")
    g = numpy_helper.from_array(np.ones(24, np.float32), "g")
    b = numpy_helper.from_array(np.zeros(24, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], axis=-1),
             helper.make_node("Softmax", ["n"], ["y"], axis=-1)]
    onnx.save(_model(nodes, [_vi("x", ["N", 16, 32])], [_vi("y", ["N", 16, 24])], [w, g, b]), str(path))
    return path


def _massive_row_inputs(rng, n):
    return _outlier_inputs(rng, n, where=(slice(None), 0))


def test_massive_first_row_is_split_off_and_the_float_function_kept(tmp_path):
    rng = np.random.default_rng(6)
    model = onnx.load(str(_massive_row_model(tmp_path / "m.onnx", rng)))
    x = _massive_row_inputs(rng, 8)
    before = _run(model, {"x": x[:1]})
    assert tr.split_outlier_rows(model, [{"x": x[i:i + 1]} for i in range(8)]) == {"dense": 1}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 and "Concat" in ops, ops
    after = _run(model, {"x": x[:1]})
    err = float(np.abs(after - before).max())
    assert err <= 1e-6, f"splitting rows changed the float output by {err:.3g} (seed 6)"


def test_no_row_is_split_without_a_massive_one():
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((32, 24)).astype(np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="dense")], [_vi("x", [1, 16, 32])],
                   [_vi("y", [1, 16, 24])], [w])
    x = rng.standard_normal((8, 16, 32)).astype(np.float32)
    x[:, 0, :] *= 2.0   # larger, not massive
    assert tr.split_outlier_rows(model, [{"x": x[i:i + 1]} for i in range(8)]) == {}
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_static_int8_on_an_attention_graph_quantizes_only_the_weighted_layers(tmp_path):
    src, x, y = _calibrated(tmp_path, _massive_row_model, _massive_row_inputs, seed=8)

    def quantize(rewrites):
        return _quantized_sqnr(src, QuantizeConfig(scheme="int8", transformer_rewrites=rewrites),
                               tmp_path / f"q{rewrites}", x, y)

    plain, _ = quantize(False)
    sqnr, res = quantize(True)
    assert res.rewrites.get("outlier_rows") == {"dense": 1}, res.rewrites
    q = onnx.load(str(res.path))
    producers = {o: n for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert producers[n.input[0]].op_type != "DequantizeLinear", f"{n.op_type} reads a quantized tensor"
    # One static scale for the 40x first row sets the step for every row: 9.0 dB whole-graph, and
    # the same with only the MatMul quantized; with that row in float 37.4 dB (seed 8; seeds 10-12:
    # 9.4-9.8 -> 37.6-38.2 dB). +6 dB fails if the split is lost.
    assert sqnr >= plain + 6.0, f"SQNR {sqnr:.1f} dB with transformer rewrites vs {plain:.1f} dB without (need +6)"


def _two_layer_attention_model(path, rng):
    """x -> MatMul -> Relu -> MatMul -> LayerNormalization -> Softmax: the second layer reads a
    one-sided tensor (as an FFN down-projection reads GELU outputs), the first a two-sided one."""
    w1 = numpy_helper.from_array((rng.standard_normal((32, 48)) / 6).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((48, 24)) / 6).astype(np.float32), "w2")
    g = numpy_helper.from_array(np.ones(24, np.float32), "g")
    b = numpy_helper.from_array(np.zeros(24, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["d"], name="down"),
             helper.make_node("LayerNormalization", ["d", "g", "b"], ["n"], axis=-1),
             helper.make_node("Softmax", ["n"], ["y"], axis=-1)]
    onnx.save(_model(nodes, [_vi("x", ["N", 16, 32])], [_vi("y", ["N", 16, 24])], [w1, w2, g, b]), str(path))
    return path


def test_static_int8_on_transformers_keeps_layer_outputs_float_and_zero_points_follow_the_range(tmp_path):
    src, x, y = _calibrated(tmp_path, _two_layer_attention_model, _massive_row_inputs, seed=5)
    sqnr, res = _quantized_sqnr(src, QuantizeConfig(scheme="int8"), tmp_path / "q", x, y)
    q = onnx.load(str(res.path))
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in producers:
            assert producers[n.input[0]].op_type not in ("MatMul", "Gemm"), \
                f"output of {producers[n.input[0]].name} is quantized: int8 rounding before the bias add"

    def input_zero_point(layer):
        (node,) = [n for n in q.graph.node if n.name == layer]
        quant = producers[producers[node.input[0]].input[0]]   # MatMul <- DequantizeLinear <- QuantizeLinear
        assert quant.op_type == "QuantizeLinear", f"{layer} input is not quantized"
        return int(inits[quant.input[2]]) if len(quant.input) > 2 else 0

    zp_up, zp_down = input_zero_point("up"), input_zero_point("down")
    assert zp_up == 0, f"two-sided input of 'up' should be symmetric (zero point 0), got {zp_up}"
    assert zp_down <= -100, f"one-sided (Relu) input of 'down' should be asymmetric, zero point {zp_down}"
    assert sqnr >= 30.0, f"SQNR {sqnr:.1f} dB (need >= 30, seed 5)"


def test_outlier_rows_switch_off_keeps_every_row_quantized(tmp_path):
    src, x, y = _calibrated(tmp_path, _massive_row_model, _massive_row_inputs, seed=8)
    on, res_on = _quantized_sqnr(src, QuantizeConfig(scheme="int8"), tmp_path / "on", x, y)
    off, res_off = _quantized_sqnr(src, QuantizeConfig(scheme="int8", outlier_rows=False), tmp_path / "off", x, y)
    assert res_on.rewrites.get("outlier_rows") and not res_off.rewrites.get("outlier_rows"), \
        (res_on.rewrites, res_off.rewrites)
    assert not any(n.name.endswith("/head_rows") for n in onnx.load(str(res_off.path)).graph.node)
    assert on >= off + 6.0, f"SQNR {on:.1f} dB with the massive row float vs {off:.1f} dB without (need +6)"
