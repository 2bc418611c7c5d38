"""The TFLite writer's issue-20 kinds, one op at a time in LiteRT and TFLite Micro against the
integer reference (``codegen/reference.py``).

* ``lut`` is written as CAST -> ADD -> GATHER from the op's own table, so both runtimes must give
  the reference's output exactly, for every one of the 256 int8 inputs.
* Pooling whose pads TFLite SAME/VALID cannot express gets an explicit pad: max pooling is exact
  (a comparison moves no value); an average over an explicitly padded window divides by the full
  window like ONNX's count_include_pad=1, and TFLite rounds the quotient its own way, so it may
  differ by 1 LSB on exact .5 ties (at most 1 LSB; identical share floor 0.8 as for the other
  average pools in test_tflite_writer.py).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tflite_micro", reason="tflite-micro is an optional extra (pip install tflite-micro)")
pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is an optional extra")

from edgekiln.codegen import reference  # noqa: E402
from edgekiln.codegen import testmodels as tm  # noqa: E402
from edgekiln.codegen.ir import IntGraph, Op, QTensor, load_qdq  # noqa: E402
from edgekiln.codegen.tflite import schema  # noqa: E402
from edgekiln.codegen.tflite.check import run_litert_int8, run_tflm_int8  # noqa: E402
from edgekiln.codegen.tflite.writer import to_tflite_bytes, write_tflite  # noqa: E402
from edgekiln.errors import EdgekilnError  # noqa: E402
from edgekiln.quant.fixed_point import quantize_multiplier  # noqa: E402

SEED = 5


def _one_op(tensors: dict[str, QTensor], op: Op) -> IntGraph:
    return IntGraph(tensors=tensors, ops=[op], input=op.inputs[0], output=op.output, onnx_input_name="x",
                    onnx_input_shape=(), onnx_output_shape=())


def _run_both(path, xq):
    return {"litert": run_litert_int8(path, xq)[0], "tflm": run_tflm_int8(path, xq)[0]}


@pytest.fixture(scope="module")
def cnn_ops_graph(tmp_path_factory):
    d = tmp_path_factory.mktemp("tflite_ops")
    return load_qdq(tm.quantize_qdq(tm.cnn_ops_float(seed=SEED, avg_pool=False), d / "cnn_ops.onnx",
                                    extra_ops=tm.CNN_OPS_EXTRA, seed=SEED))


def test_every_lut_op_is_bit_exact_in_litert_and_tflm_on_all_256_inputs(cnn_ops_graph, tmp_path):
    g = cnn_ops_graph
    luts = [op for op in g.ops if op.kind == "lut"]
    assert [op.name for op in luts] == ["sigmoid", "hardswish", "hardsigmoid", "tanh", "leakyrelu", "elu"]
    for op in luts:
        shape = g.tensors[op.inputs[0]].shape
        every = np.resize(np.arange(-128, 128, dtype=np.int8), int(np.prod(shape))).reshape(shape)
        xq = np.stack([every, np.roll(every, 7)])
        path = write_tflite(_one_op(g.tensors, op), tmp_path / f"{op.name}.tflite")
        assert schema.op_names(schema.read_model(path.read_bytes())) == ["CAST", "ADD", "GATHER"]
        ref = np.stack([reference.run_op(op, [q]) for q in xq]).reshape(xq.shape)
        for rt, y in _run_both(path, xq).items():
            n_diff = int(np.sum(y.reshape(ref.shape) != ref))
            assert n_diff == 0, f"{op.name} in {rt}: {n_diff} of {ref.size} outputs differ from the table (need 0)"


def _pool_op(kind: str, *, h: int, k: int, s: int, pad: int, out: int, scale_out: float = 0.05,
             include_pad: int = 0) -> tuple[dict[str, QTensor], Op]:
    x, y = QTensor("x", (1, h, h, 3), 0.05, -7), QTensor("y", (1, out, out, 3), scale_out, -7 if kind == "max_pool" else 4)
    attrs = dict(in_h=h, in_w=h, channels=3, out_h=out, out_w=out, k_h=k, k_w=k, stride_h=s, stride_w=s,
                 pad_top=pad, pad_left=pad)
    if kind == "avg_pool":
        m, sh = quantize_multiplier(x.scale / y.scale)
        attrs.update(count_include_pad=include_pad, input_zp=x.zero_point, output_zp=y.zero_point, mult=m, shift=sh)
    return {"x": x, "y": y}, Op(kind, f"{kind}_p{pad}", ["x"], "y", attrs=attrs)


@pytest.mark.parametrize("kind", ["max_pool", "avg_pool"])
def test_pool_pads_tflite_cannot_express_become_an_explicit_pad(kind, tmp_path):
    # 8x8, k3 s2, pads 1 with ceil_mode: 5x5 outputs; SAME would give 4x4 and VALID 3x3
    tensors, op = _pool_op(kind, h=8, k=3, s=2, pad=1, out=5, include_pad=1)
    path = write_tflite(_one_op(tensors, op), tmp_path / f"{kind}.tflite")
    names = schema.op_names(schema.read_model(path.read_bytes()))
    assert names[0] == ("PADV2" if kind == "max_pool" else "PAD"), names
    xq = np.random.default_rng(SEED).integers(-128, 128, size=(16, 1, 8, 8, 3), dtype=np.int8)
    ref = np.stack([reference.run_op(op, [q]) for q in xq]).astype(np.int32).reshape(16, 1, 5, 5, 3)
    floor = 1.0 if kind == "max_pool" else 0.8
    for rt, y in _run_both(path, xq).items():
        d = np.abs(y.astype(np.int32).reshape(ref.shape) - ref)
        assert d.max() <= (0 if kind == "max_pool" else 1) and np.mean(d == 0) >= floor, (
            f"{kind} in {rt}: max {d.max()} LSB, identical {np.mean(d == 0):.3f} (need >= {floor}), seed {SEED}")


def test_an_average_that_excludes_non_same_pads_is_a_named_error():
    tensors, op = _pool_op("avg_pool", h=8, k=3, s=2, pad=1, out=5, include_pad=0)
    with pytest.raises(EdgekilnError, match=r"node 'avg_pool_p1': padding .* is neither TFLite SAME nor VALID"):
        to_tflite_bytes(_one_op(tensors, op))


@pytest.mark.parametrize("hwc", [(5, 5, 6), (17, 16, 24)])
def test_per_channel_tables_are_bit_exact_in_litert_and_tflm(hwc, tmp_path):
    rng = np.random.default_rng(SEED)
    h, w, c = hwc
    shape = (1, h, w, c)
    tensors = {"x": QTensor("x", shape, 0.05, -3), "y": QTensor("y", shape, 0.02, 9)}
    op = Op("lut_channel", "prelu", ["x"], "y", attrs=dict(channels=c, size=h * w * c),
            arrays=dict(table=rng.integers(-128, 128, size=c * 256, dtype=np.int8)))
    path = write_tflite(_one_op(tensors, op), tmp_path / "lut_channel.tflite")
    names = schema.op_names(schema.read_model(path.read_bytes()))
    # a map of 6528 elements goes through in 8 row bands (2 or 3 rows each): the int32 temporaries shrink 8x
    want = ["CAST", "ADD", "GATHER"] if h * w * c < 4096 else ["SPLIT_V", *["CAST", "ADD", "GATHER"] * 8, "CONCATENATION"]
    assert names == want, names
    every = np.resize(np.arange(-128, 128, dtype=np.int8), h * w * c).reshape(shape)
    xq = np.stack([every, np.roll(every, 11), rng.integers(-128, 128, size=shape, dtype=np.int8)])
    ref = np.stack([reference.run_op(op, [q]) for q in xq]).reshape(xq.shape)
    for rt, y in _run_both(path, xq).items():
        n_diff = int(np.sum(y.reshape(ref.shape) != ref))
        assert n_diff == 0, f"lut_channel {hwc} in {rt}: {n_diff} of {ref.size} outputs differ (need 0), seed {SEED}"


@pytest.mark.parametrize("case", ["channel_shuffle", "channel_slice", "full_table"])
def test_gather_moves_exactly_the_bytes_of_its_index_table(case, tmp_path):
    rng = np.random.default_rng(SEED)
    h, w, c = 3, 4, 8
    if case == "channel_shuffle":  # groups of 2: [0, 4, 1, 5, 2, 6, 3, 7]
        attrs, index, out_shape = dict(pixels=h * w, in_c=c, out_c=c), np.arange(c).reshape(2, 4).T.ravel(), (1, h, w, c)
    elif case == "channel_slice":
        attrs, index, out_shape = dict(pixels=h * w, in_c=c, out_c=3), np.array([5, 6, 7]), (1, h, w, 3)
    else:  # e.g. a spatial Transpose: one entry per output element
        index = rng.permutation(h * w * c)[:40]
        attrs, out_shape = dict(pixels=1, in_c=h * w * c, out_c=40), (1, 40)
    tensors = {"x": QTensor("x", (1, h, w, c), 0.1, 2), "y": QTensor("y", out_shape, 0.1, 2)}
    op = Op("gather", case, ["x"], "y", attrs=attrs, arrays=dict(index=index.astype(np.int32)))
    path = write_tflite(_one_op(tensors, op), tmp_path / f"{case}.tflite")
    xq = rng.integers(-128, 128, size=(3, 1, h, w, c), dtype=np.int8)
    ref = np.stack([reference.run_op(op, [q]).reshape(out_shape) for q in xq])
    for rt, y in _run_both(path, xq).items():
        n_diff = int(np.sum(y.reshape(ref.shape) != ref))
        assert n_diff == 0, f"gather {case} in {rt}: {n_diff} of {ref.size} outputs differ (need 0), seed {SEED}"


@pytest.mark.parametrize("hwc", [(4, 4, 8), (20, 20, 16)])
def test_requantization_is_exact_in_both_runtimes_also_in_bands(hwc, tmp_path):
    # NOTE: scales with no short binary ratio, so no exact .5 tie exists where float32 (ties to even)
    # and the reference's fixed point (ties up) could round apart; measured exact on the corpus too.
    h, w, c = hwc
    x, y = QTensor("x", (1, h, w, c), 0.0371, -5), QTensor("y", (1, h, w, c), 0.0219, 12)
    m, sh = quantize_multiplier(x.scale / y.scale)
    op = Op("requantize", "rq", ["x"], "y", attrs=dict(size=h * w * c, input_zp=x.zero_point, output_zp=y.zero_point,
                                                       mult=m, shift=sh, act_min=-128, act_max=127))
    path = write_tflite(_one_op({"x": x, "y": y}, op), tmp_path / "rq.tflite")
    names = schema.op_names(schema.read_model(path.read_bytes()))
    assert names.count("DEQUANTIZE") == names.count("QUANTIZE") == (1 if h * w * c < 4096 else 8), names
    xq = np.stack([np.resize(np.arange(-128, 128, dtype=np.int8), h * w * c).reshape(1, h, w, c)] * 2)
    xq[1] = np.random.default_rng(SEED).integers(-128, 128, size=(1, h, w, c), dtype=np.int8)
    ref = np.stack([reference.run_op(op, [q]) for q in xq]).reshape(xq.shape)
    for rt, got in _run_both(path, xq).items():
        n_diff = int(np.sum(got.reshape(ref.shape) != ref))
        assert n_diff == 0, f"requantize {hwc} in {rt}: {n_diff} of {ref.size} outputs differ (need 0), seed {SEED}"


def test_a_concat_of_more_inputs_than_tflm_takes_is_joined_in_groups(tmp_path):
    # 12 single-channel maps from one input (gathers), concatenated on the channel axis: TFLM's
    # CONCATENATION takes at most 10 inputs, so the writer joins the first 10 first.
    c, n = 3, 12
    tensors = {"x": QTensor("x", (1, 2, 2, c), 0.1, 1), "y": QTensor("y", (1, 2, 2, n), 0.1, 1)}
    ops = []
    for i in range(n):
        tensors[f"p{i}"] = QTensor(f"p{i}", (1, 2, 2, 1), 0.1, 1)
        ops.append(Op("gather", f"pick{i}", ["x"], f"p{i}", attrs=dict(pixels=4, in_c=c, out_c=1),
                      arrays=dict(index=np.array([i % c], np.int32))))
    m, sh = quantize_multiplier(1.0)
    ops.append(Op("concat", "cat", [f"p{i}" for i in range(n)], "y",
                  attrs=dict(outer=4, out_c=n, n_inputs=n, output_zp=1),
                  arrays=dict(channels=np.ones(n, np.int32), zps=np.ones(n, np.int32),
                              mult=np.full(n, m, np.int32), shift=np.full(n, sh, np.int32))))
    g = IntGraph(tensors=tensors, ops=ops, input="x", output="y", onnx_input_name="x", onnx_input_shape=(),
                 onnx_output_shape=())
    path = write_tflite(g, tmp_path / "cat12.tflite")
    assert schema.op_names(schema.read_model(path.read_bytes())).count("CONCATENATION") == 2
    xq = np.random.default_rng(SEED).integers(-128, 128, size=(2, 1, 2, 2, c), dtype=np.int8)
    ref = np.stack([reference.run_graph(g, q) for q in xq]).reshape(2, 1, 2, 2, n)
    for rt, y in _run_both(path, xq).items():
        assert np.array_equal(y.reshape(ref.shape), ref), f"{rt}: 12-input concat differs from the reference"


def _gemmlowp_requantize(acc: np.ndarray, real: np.ndarray) -> np.ndarray:
    """TFLM's MultiplyByQuantizedMultiplier written out from its definition (independent of edgekiln):
    a 31-bit multiplier of the double ``real``, a saturating rounding doubling high multiply (round
    half away from zero), then a rounding right shift (ties away from zero)."""
    frac, exp = np.frexp(real)
    m = np.floor(frac * (1 << 31) + 0.5).astype(np.int64)
    exp = np.where(m == 1 << 31, exp + 1, exp)
    m = np.where(m == 1 << 31, m // 2, m)
    left, right = np.maximum(exp, 0), np.maximum(-exp, 0)
    ab = (acc.astype(np.int64) << left) * m
    s = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(s >= 0, s >> 31, -((-s) >> 31))  # C++ division: toward zero
    mask = (np.int64(1) << right) - 1
    return (high >> right) + ((high & mask) > (mask >> 1) + (high < 0))


def test_tflm_conv_differs_from_the_reference_only_by_its_double_rounding(cnn_ops_graph, tmp_path, monkeypatch):
    """The 1-LSB conv differences TFLM shows (per op ~0.1-1.5%) are exactly gemmlowp's two roundings of
    the accumulator the reference computes, with the scales the writer stored: bit-exact with that
    formula, so the weights, biases, zero points and scales in the .tflite are the reference's."""
    g = cnn_ops_graph
    rng = np.random.default_rng(SEED)
    captured = {}
    exact_requant = reference.requant_binary32

    def keep_acc(acc, mult, shift):
        captured["acc"] = acc
        return exact_requant(acc, mult, shift)

    monkeypatch.setattr(reference, "requant_binary32", keep_acc)
    convs = [op for op in g.ops if op.kind == "conv2d"]
    assert len(convs) >= 4, [op.kind for op in g.ops]
    n_rounding_diffs = 0
    for op in convs:
        x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
        xq = rng.integers(-128, 128, size=(6, *x.shape), dtype=np.int8)
        path = write_tflite(_one_op(g.tensors, op), tmp_path / f"{op.name}.tflite")
        got = run_tflm_int8(path, xq)[0].astype(np.int64).reshape(6, *y.shape)
        real = np.float64(np.float32(x.scale)) * op.weight_scale.astype(np.float64) / np.float64(np.float32(y.scale))
        want, ref = [], []
        for q in xq:
            ref.append(reference.run_op(op, [q]).reshape(y.shape))
            acc = captured["acc"].reshape(*y.shape)
            want.append(np.clip(_gemmlowp_requantize(acc, real) + y.zero_point, op.attrs["act_min"], op.attrs["act_max"]))
        n_diff = int(np.sum(got != np.stack(want)))
        assert n_diff == 0, f"{op.name}: TFLM differs from the double-rounding formula on {n_diff} outputs (need 0)"
        n_rounding_diffs += int(np.sum(got != np.stack(ref)))
    print(f"\nTFLM vs the single-rounding reference: {n_rounding_diffs} outputs 1 LSB apart, all explained")


def test_a_grouped_conv_is_one_conv_per_group_and_exact_in_litert(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    w = numpy_helper.from_array((rng.standard_normal((6, 2, 3, 3)) / 3).astype(np.float32), "w")
    b = numpy_helper.from_array((rng.standard_normal(6) * 0.1).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w", "b"], ["output"], group=2, pads=[1, 1, 1, 1])],
                              "grouped", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 7, 7])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 7, 7])], [w, b])
    g = load_qdq(tm.quantize_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                 tmp_path / "grouped.onnx", seed=SEED))
    op = g.ops[0]
    assert (op.kind, op.attrs["groups"]) == ("conv2d", 2)
    path = write_tflite(g, tmp_path / "grouped.tflite")
    assert schema.op_names(schema.read_model(path.read_bytes())) == ["SPLIT", "CONV_2D", "CONV_2D", "CONCATENATION"]
    xq = rng.integers(-128, 128, size=(4, 1, 7, 7, 4), dtype=np.int8)
    ref = np.stack([reference.run_op(op, [q]) for q in xq]).astype(np.int32).reshape(4, 1, 7, 7, 6)
    for rt, y in _run_both(path, xq).items():
        d = np.abs(y.astype(np.int32).reshape(ref.shape) - ref)
        need = 0 if rt == "litert" else 1  # TFLM: gemmlowp's double rounding (see the test above)
        assert d.max() <= need, f"grouped conv in {rt}: max {d.max()} LSB (need <= {need}), seed {SEED}"


def test_a_clamp_that_is_not_relu_or_relu6_becomes_maximum_and_minimum(tmp_path):
    # e.g. Clip(-1, 1) (HardTanh) on a grid where neither bound is the real 0 or 6
    x, y = QTensor("x", (1, 4, 4, 8), 0.0371, -5), QTensor("y", (1, 4, 4, 8), 0.0219, 12)
    m, sh = quantize_multiplier(x.scale / y.scale)
    lo, hi = 12 - 46, 12 + 46  # q(-1.0), q(1.0) on y's grid
    op = Op("requantize", "hardtanh", ["x"], "y", attrs=dict(size=128, input_zp=x.zero_point, output_zp=y.zero_point,
                                                             mult=m, shift=sh, act_min=lo, act_max=hi))
    path = write_tflite(_one_op({"x": x, "y": y}, op), tmp_path / "clamp.tflite")
    assert schema.op_names(schema.read_model(path.read_bytes()))[-2:] == ["MAXIMUM", "MINIMUM"]
    xq = np.stack([np.resize(np.arange(-128, 128, dtype=np.int8), 128).reshape(1, 4, 4, 8)] * 2)
    xq[1] = np.random.default_rng(SEED).integers(-128, 128, size=(1, 4, 4, 8), dtype=np.int8)
    ref = np.stack([reference.run_op(op, [q]) for q in xq]).reshape(xq.shape)
    assert ref.min() == lo and ref.max() == hi, (ref.min(), ref.max())
    for rt, got in _run_both(path, xq).items():
        n_diff = int(np.sum(got.reshape(ref.shape) != ref))
        assert n_diff == 0, f"clamped requantize in {rt}: {n_diff} of {ref.size} outputs differ (need 0), seed {SEED}"


def test_float_islands_for_litert_are_its_float_ops_and_agree_with_the_exact_tables(tmp_path):
    """LiteRT's XNNPACK does not run GATHER: for CPU runtimes a float island with a float form is
    written as DEQUANTIZE -> op -> QUANTIZE (one delegated partition; MTCNN R-Net 0.166 -> 0.063 ms
    here, FP32 0.132). Same float32 arithmetic as the table, so each island op alone gives the
    table's output on all 256 inputs, up to 1 LSB where LiteRT's sigmoid approximation lands on a
    rounding boundary."""
    g = load_qdq(tm.quantize_qdq(tm.shuffle_island_float(seed=SEED), tmp_path / "islands.onnx",
                                 extra_ops=tm.SHUFFLE_EXTRA, float_ops=tm.SPEED_FLOAT, seed=SEED))
    islands = [op for op in g.ops if op.kind in ("lut", "lut_channel") and op.float_form is not None]
    assert sorted(op.float_form[0] for op in islands) == ["PRelu", "SiLU"], [op.float_form for op in islands]
    whole = schema.op_names(schema.read_model(to_tflite_bytes(g, float_islands=True)))
    assert {"PRELU", "LOGISTIC"} <= set(whole) and "PRELU" not in schema.op_names(schema.read_model(to_tflite_bytes(g)))
    for op in islands:
        x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
        one = _one_op({x.name: x, y.name: y}, op)
        every = np.resize(np.arange(-128, 128, dtype=np.int8), int(np.prod(x.shape))).reshape(1, *x.shape[1:])
        xq = np.stack([every, np.roll(every, 7)])
        exact = run_litert_int8(write_tflite(one, tmp_path / f"{op.name}_table.tflite"), xq)[0].astype(int)
        fast = run_litert_int8(write_tflite(one, tmp_path / f"{op.name}_float.tflite", float_islands=True), xq)[0]
        diff = np.abs(fast.astype(int) - exact)
        share = float(np.mean(diff == 0))
        assert diff.max() <= 1 and share >= 0.99, \
            f"{op.float_form[0]} island {op.name}: max {diff.max()} LSB (<= 1), identical {share:.4f} (>= 0.99), seed {SEED}"
