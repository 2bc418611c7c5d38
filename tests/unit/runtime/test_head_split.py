"""Finding and rewriting the trainable tail: which graphs are read how, that a rewrite with the
same values changes nothing, that the output grows, and that the int8 re-quantization is exactly
the formula (checked against an independent one)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.errors import EdgekilnError
from edgekiln.execution.ort import expose_tensors, ort_session
from edgekiln.runtime.head_split import (
    activation_qparams,
    find_tail,
    quantize_bias,
    quantize_weight,
    read_params,
    write_params,
)
from edgekiln.testing.streams import class_clusters
from edgekiln.testing.tiny import tiny_head_onnx


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("heads")
    return {q: onnx.load(str(tiny_head_onnx(d / f"m{q}.onnx", int8=q))) for q in (False, True)}


def _run(proto, x, names=()):
    sess = ort_session(expose_tensors(proto, list(names)) if names else proto)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x}),
                    strict=True))


def _matmul_model(*, layernorm=False):
    """[N, 2, 3] -> Flatten -> Gemm(transB=0) -> Relu [-> LayerNormalization] -> MatMul + Add -> Softmax."""
    rng = np.random.default_rng(4)
    w1, b1 = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    w2, b2 = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["g"], name="fc1"),
             helper.make_node("Relu", ["g"], ["r"], name="relu")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    h = "r"
    if layernorm:
        nodes.append(helper.make_node("LayerNormalization", ["r", "ln_s", "ln_b"], ["ln"], name="norm"))
        inits += [numpy_helper.from_array(np.ones(5, np.float32), "ln_s"),
                  numpy_helper.from_array(np.zeros(5, np.float32), "ln_b")]
        h = "ln"
    nodes += [helper.make_node("MatMul", [h, "w2"], ["m"], name="fc2"),
              helper.make_node("Add", ["b2", "m"], ["z"], name="fc2_bias"),
              helper.make_node("Softmax", ["z"], ["prob"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), (w1, b1, w2, b2)


def test_find_tail_fp32_and_int8(models):
    fp, q = models[False], models[True]
    head = find_tail(fp)
    assert (head.cut, head.output, head.num_classes, head.quantized) == ("h1", "logits", 8, False)
    assert [(d.node, d.weight, d.transposed, d.relu_after, d.in_dim) for d in head.layers] == [
        ("fc2", "w2", True, False, 24)]
    block = find_tail(fp, scope="last-block")
    assert block.cut == "features" and [d.relu_after for d in block.layers] == [True, False]
    qblock = find_tail(q, scope="last-block")
    assert qblock.quantized and qblock.cut == "features_DequantizeLinear_Output"
    assert [d.weight for d in qblock.layers] == ["w1_quantized", "w2_quantized"]
    # the Relu after fc1 was fused into its QuantizeLinear (zero point -128) and is read so
    assert qblock.layers[0].relu_after and int(qblock.layers[0].out_q.zero_point) == -128
    assert qblock.layers[0].wq.axis == 0 and qblock.layers[0].wq.scale.shape == (24,)
    assert qblock.layers[1].bq.zero_point.dtype == np.int32 and qblock.cut_q.scale_name == "r1_scale"
    for proto in (fp, q):   # float32, dequantized, [out, in]
        p = read_params(proto, find_tail(proto, scope="last-block"))
        assert {k: v.shape for k, v in p.items()} == {
            block.layers[0].weight if proto is fp else "w1_quantized": (24, 16),
            block.layers[0].bias if proto is fp else "b1_quantized": (24,),
            "w2" if proto is fp else "w2_quantized": (8, 24), "b2" if proto is fp else "b2_quantized": (8,)}
        assert all(v.dtype == np.float32 for v in p.values())


def test_gemm_transb0_and_matmul_add_with_a_trailing_softmax():
    proto, (w1, b1, w2, b2) = _matmul_model()
    spec = find_tail(proto, scope="last-block")
    assert spec.cut == "f" and spec.output == "prob" and spec.num_classes == 4
    assert [(d.node, d.weight, d.bias, d.transposed, d.relu_after) for d in spec.layers] == [
        ("fc1", "w1", "b1", False, True), ("fc2", "w2", "b2", False, False)]
    p = read_params(proto, spec)
    assert np.array_equal(p["w1"], w1.T) and np.array_equal(p["w2"], w2.T) and np.array_equal(p["b2"], b2)
    x = np.random.default_rng(5).standard_normal((3, 2, 3)).astype(np.float32)
    same = write_params(proto, spec, p)
    assert np.array_equal(_run(same, x)["prob"], _run(proto, x)["prob"])
    grown = write_params(proto, spec, {**p, "w2": np.vstack([p["w2"], p["w2"][:2]]), "b2": np.r_[p["b2"], 0, 0]})
    assert _run(grown, x)["prob"].shape == (3, 6)


def test_unsupported_tail_op_is_refused_by_name():
    proto, _ = _matmul_model(layernorm=True)
    assert find_tail(proto).layers[0].node == "fc2"   # the head alone is fine
    with pytest.raises(EdgekilnError, match=r"after fc2 has a LayerNormalization \(norm\); learning supports "
                                            r"Gemm/MatMul/Relu tails"):
        find_tail(proto, scope="last-block", model_name="model.onnx")
    with pytest.raises(EdgekilnError, match="scope must be"):
        find_tail(proto, scope="all")


def test_write_same_params_fp32_bit_identical_int8_within_one_lsb(models):
    x, _ = class_clusters(40, seed=1000)   # the data tiny_head_onnx calibrated its int8 variant on
    for int8, proto in models.items():
        for scope in ("head", "last-block"):
            spec = find_tail(proto, scope=scope)
            feats = _run(proto, x, [spec.cut])[spec.cut]
            out = write_params(proto, spec, read_params(proto, spec), calib_features=feats)
            before, after = _run(proto, x)["logits"], _run(out, x)["logits"]
            if not int8:
                assert np.array_equal(before, after), np.abs(before - after).max()
                continue
            lsb = float(spec.layers[-1].out_q.scale)
            err = float(np.abs(before - after).max())
            bound = lsb
            if scope == "last-block":
                # NOTE: the hidden QDQ is re-calibrated on the int8 features (onnxruntime calibrated
                # it on float ones): its scale moves ~1%, each hidden value may round to the other
                # side, and that half step of the hidden scale reaches a logit through |w2| row sums.
                s_h = max(float(spec.layers[0].out_q.scale), float(find_tail(out, scope=scope).layers[0].out_q.scale))
                bound += 0.5 * s_h * float(np.abs(read_params(proto, spec)["w2_quantized"]).sum(axis=1).max())
            assert err <= bound * 1.001, f"{scope}: max error {err:.5f} > {bound / lsb:.2f} LSB ({bound:.5f})"
            agree = float((before.argmax(1) == after.argmax(1)).mean())
            assert agree >= 0.99, f"{scope}: top-1 agreement {agree:.3f} < 0.99"


def test_growing_gives_the_new_output_width(models):
    x, _ = class_clusters(3, seed=2)
    for proto in models.values():
        spec = find_tail(proto)
        p = read_params(proto, spec)
        w, b = spec.layers[-1].weight, spec.layers[-1].bias
        feats = _run(proto, x, [spec.cut])[spec.cut]
        out = write_params(proto, spec, {w: np.vstack([p[w], -p[w][:2]]), b: np.r_[p[b], 0.5, -0.5]},
                           calib_features=feats)
        onnx.checker.check_model(out)
        assert _run(out, x)["logits"].shape == (24, 10)
        assert out.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10


def _indep_weight(w):
    """Per row: s = max|w|/127 in float32; q = round-half-even of the float32 quotient, in Python."""
    qs, ss = [], []
    for row in w:
        s = np.float32(max(abs(float(v)) for v in row)) / np.float32(127.0)
        ss.append(s)
        qs.append([max(-127, min(127, round(float(np.float32(v) / s)))) for v in row])
    return np.array(qs), np.array(ss, np.float32)


def test_weight_and_bias_quantization_match_an_independent_formula():
    # scale 0.125 exactly (max 15.875): w / s lands on .5 ties, which round to even
    w = np.array([[15.875, 0.3125, 0.4375, -0.3125, -15.875, 0.0625],
                  [0.0371, -0.9999, 0.5, 0.25, -0.1234567, 0.013]], np.float32)
    q, s = quantize_weight(w, True)
    qi, si = _indep_weight(w)
    assert np.array_equal(q, qi) and np.array_equal(s, si), (q, qi, s, si)
    assert q[0].tolist() == [127, 2, 4, -2, -127, 0]            # 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, 0.5 -> 0
    assert q.min() >= -127                                       # symmetric: -128 is never used
    qt, st = quantize_weight(w, False)
    assert st.shape == () and np.array_equal(qt, np.clip(np.round(w / np.float32(15.875 / 127)), -127, 127))
    assert quantize_weight(np.zeros((1, 3), np.float32), True)[1].tolist() == [1.0]
    scale = np.array([0.0037, 1e-12, 0.5], np.float32)
    b = np.array([0.01295, 1.0, -0.25], np.float32)   # the last is an exact tie: -0.5 -> 0
    want = [int(round(Fraction(float(v)) / Fraction(float(sc)))) for v, sc in zip(b, scale, strict=True)]
    want[1] = 2**31 - 1                                  # saturates at the int32 maximum
    assert quantize_bias(b, scale).tolist() == want, (quantize_bias(b, scale).tolist(), want)


@pytest.mark.parametrize(("lo", "hi", "qmin", "qmax"), [(-1.3, 2.7, -128, 127), (0.0, 4.1, -128, 127),
                                                        (-0.07, 0.0, -128, 127), (-2.0, 3.0, 0, 255)])
def test_activation_qparams_cover_the_range(lo, hi, qmin, qmax):
    s, zp = activation_qparams(lo, hi, qmin, qmax)
    assert float(s) == pytest.approx((hi - lo) / (qmax - qmin), rel=1e-6)
    assert zp == max(qmin, min(qmax, round(qmin - lo / float(s))))
    covered = ((qmin - zp) * float(s), (qmax - zp) * float(s))
    assert covered[0] <= lo + float(s) / 2 and covered[1] >= hi - float(s) / 2, (covered, lo, hi, float(s))


def test_int8_rewrite_writes_the_formula_and_recalibrates(models):
    proto = models[True]
    spec = find_tail(proto, scope="last-block")
    x, _ = class_clusters(10, classes=tuple(range(10)), seed=3)
    feats = _run(proto, x, [spec.cut])[spec.cut]
    p = read_params(proto, spec)
    rng = np.random.default_rng(7)
    new = {k: (v * np.float32(1.37) + rng.standard_normal(v.shape).astype(np.float32) * 0.05) for k, v in p.items()}
    new["w2_quantized"] = np.vstack([new["w2_quantized"], new["w2_quantized"][:2] * 3])
    new["b2_quantized"] = np.r_[new["b2_quantized"], 2.0, -3.0].astype(np.float32)
    out = write_params(proto, spec, new, calib_features=feats)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    a_s = np.float32(inits["r1_scale"])   # the cut's activation scale is not touched
    for d in spec.layers:
        qi, si = _indep_weight(new[d.weight])
        assert np.array_equal(inits[d.weight], qi) and np.array_equal(inits[d.wq.scale_name], si), d.node
        bscale = (a_s * si).astype(np.float32)
        want = [int(round(Fraction(float(v)) / Fraction(float(sc)))) for v, sc in zip(new[d.bias], bscale,
                                                                                     strict=True)]
        assert inits[d.bias].tolist() == want and np.array_equal(inits[d.bq.scale_name], bscale), d.node
        a_s = np.float32(inits[d.out_q.scale_name])
    h = np.maximum(feats @ new["w1_quantized"].T + new["b1_quantized"], 0)
    z = h @ new["w2_quantized"].T + new["b2_quantized"]
    for name, lo, hi in (("h1", 0.0, h.max()), ("logits", min(z.min(), 0), max(z.max(), 0))):
        s, zp = float(inits[f"{name}_scale"]), int(inits[f"{name}_zero_point"])
        covered = ((-128 - zp) * s, (127 - zp) * s)
        assert covered[0] <= lo + s / 2 and covered[1] >= hi - s / 2, (name, covered, lo, hi)
    assert int(inits["h1_zero_point"]) == -128   # the fused Relu keeps its zero point at qmin
    assert _run(out, x)["logits"].shape == (100, 10)


def _backbone(proto, cut):
    """The nodes ``cut`` depends on (everything upstream of the tail), as (op, inputs) and their
    initializers' values: what a rewrite of the tail must leave as it was."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    seen, todo = {}, [cut]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in seen:
            seen[id(n)] = n
            todo.extend(n.input)
    nodes = [(n.op_type, tuple(n.input)) for n in proto.graph.node if id(n) in seen]
    return nodes, {x: inits[x] for _, ins in nodes for x in ins if x in inits}


def test_compacted_int8_file_is_read_and_rewritten_without_touching_shared_initializers(tmp_path):
    from edgekiln.quant.compact import compact_qdq

    # hidden == classes: compaction shares fc1's and fc2's weight zero points, the Relu chain's
    # zero point, and the cut's scale with fc2's bias-scale Mul (the forms `edgekiln quantize` writes)
    path = tiny_head_onnx(tmp_path / "m.onnx", int8=True, hidden=8)
    compact_qdq(path)
    proto = onnx.load(str(path))
    assert any(n.op_type == "Mul" for n in proto.graph.node)
    x, _ = class_clusters(40, seed=1000)
    for scope in ("head", "last-block"):
        spec = find_tail(proto, scope=scope)
        assert spec.quantized and spec.layers[-1].bq.zero_point.dtype == np.int32   # left out: 0 of int32
        feats = _run(proto, x, [spec.cut])[spec.cut]
        p = read_params(proto, spec)
        same = write_params(proto, spec, p, calib_features=feats)
        before, after = _run(proto, x)["logits"], _run(same, x)["logits"]
        lsb, err = float(spec.layers[-1].out_q.scale), float(np.abs(before - after).max())
        bound = lsb if scope == "head" else lsb + 0.5 * float(find_tail(same, scope=scope).layers[0].out_q.scale) \
            * float(np.abs(p[spec.layers[-1].weight]).sum(axis=1).max())   # the hidden QDQ re-calibrated
        assert err <= bound * 1.001, f"{scope}: max error {err:.5f} > {bound / lsb:.2f} LSB ({bound:.5f})"
        w, b = spec.layers[-1].weight, spec.layers[-1].bias
        grown = write_params(proto, spec, {**p, w: np.vstack([p[w], -p[w][:2]]), b: np.r_[p[b], 0.5, -0.5]},
                             calib_features=feats)
        onnx.checker.check_model(grown)
        assert _run(grown, x)["logits"].shape == (len(x), 10)
        again = find_tail(grown, scope=scope)
        got = read_params(grown, again)[again.layers[-1].weight]
        step = float(np.asarray(again.layers[-1].wq.scale).max())
        assert np.abs(got[8:] + p[w][:2]).max() <= step / 2 * 1.001, (np.abs(got[8:] + p[w][:2]).max(), step / 2)
        for out in (same, grown):   # the backbone reads the same tensors, with the same values
            nodes, values = _backbone(proto, spec.cut)
            nodes_after, values_after = _backbone(out, spec.cut)
            assert nodes_after == nodes, scope
            changed = [k for k, v in values.items()
                       if v.dtype != values_after[k].dtype or not np.array_equal(v, values_after[k])]
            assert not changed, f"{scope}: shared initializers changed in place: {changed}"
