"""Golden: the C ops MTCNN, ShuffleNetV2, squeeze-excite CNNs and decoders need (issue 20) — PRelu as a
per-channel table, channel shuffle (Reshape -> Transpose -> Reshape with a folded Shape subgraph) and
Split/Slice as one ``gather``, Softmax over the channels of a 4-D map, SiLU and Mul/Add by constants,
the SE ``Mul`` with channel broadcasting, two outputs, each quantized two ways: every op int8, and
with PRelu/Sigmoid/Mul/HardSigmoid left float between a DequantizeLinear and a QuantizeLinear (the
"float islands" ``edgekiln quantize``'s speed rule leaves); Pad, ConvTranspose, Resize nearest
and linear; Add with channel broadcasting and Sub (``add_lut``); two graph inputs (packed into one C
input buffer); ReduceMean over one axis; a YOLO box decoder (anchor grid folded from Shape -> Range ->
Cast into a ``constant`` tensor, Concat along a non-channel axis). The generated C (host gcc) must be
bit-exact with the numpy reference and agree with onnxruntime on the QDQ model under the rule of
test_kernels_exact.py: >= 99% of int8 outputs identical, none off by more than 1 LSB, top-1 equal.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgekiln.codegen import testmodels as tm
from edgekiln.codegen import testmodels_heads as th
from edgekiln.codegen.fuse import lower_for_c
from edgekiln.codegen.ir import IntGraph, Op, QTensor
from edgekiln.codegen.reference import run_graph
from edgekiln.codegen.verify import ort_int8_outputs, quantize_inputs

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
SEED = 0
MIN_SAME, MAX_LSB = 0.99, 1

VARIANTS = {
    "shuffle_int8": (tm.shuffle_island_float, dict(extra_ops=tm.SHUFFLE_EXTRA)),
    "shuffle_islands": (tm.shuffle_island_float, dict(extra_ops=tm.SHUFFLE_EXTRA, float_ops=tm.SPEED_FLOAT)),
    "se_int8": (tm.se_block_float, dict(extra_ops=(*tm.CNN_OPS_EXTRA, "Mul"))),
    "se_islands": (tm.se_block_float, dict(extra_ops=(*tm.CNN_OPS_EXTRA, "Mul"), float_ops=tm.SPEED_FLOAT)),
    "decoder": (tm.decoder_float, dict(extra_ops=("Pad", "Resize", "ConvTranspose"))),
    "two_inputs": (tm.two_input_float, {}),
    "arith_int8": (tm.arith_float, dict(extra_ops=("Add", "Sub", "Sigmoid"))),
    # Add float too, so that the Sigmoid gets no Q/DQ and the Add reads it as a table
    "arith_islands": (tm.arith_float, dict(extra_ops=("Sub",), float_ops=(*tm.SPEED_FLOAT, "Add"))),
    # GlobalAveragePool float too, so that HardSwish gets no Q/DQ (as in MobileNetV3 after the speed rule)
    "se_hswish_islands": (tm.se_hswish_float, dict(extra_ops=(*tm.CNN_OPS_EXTRA, "Mul", "Unsqueeze"),
                                                    float_ops=(*tm.SPEED_FLOAT, "GlobalAveragePool"))),
    "reduce_axes": (th.reduce_axes_float, dict(extra_ops=th.REDUCE_EXTRA)),
    "anchor_head": (th.anchor_head_float, dict(extra_ops=th.ANCHOR_EXTRA)),
}
KINDS = {
    "shuffle_int8": ["conv2d", "lut_channel", "max_pool", "gather", "gather", "gather", "conv2d", "lut_channel", "lut",
                     "lut_channel", "mul", "concat", "conv2d", "softmax", "gather", "fully_connected"],
    # the SiLU island (Sigmoid + Mul, float) is one table; PRelu -> MaxPool -> shuffle -> Q takes the Q's scale
    "shuffle_islands": ["conv2d", "lut_channel", "max_pool", "gather", "gather", "gather", "conv2d", "lut_channel",
                        "lut", "lut_channel", "concat", "conv2d", "softmax", "gather", "fully_connected"],
    "se_int8": ["conv2d", "avg_pool", "conv2d", "conv2d", "lut", "mul", "conv2d"],
    "se_islands": ["conv2d", "avg_pool", "conv2d", "conv2d", "mul", "conv2d"],  # the float gate is mul's table
    # ConvTranspose = zero-inserting pad + conv of the flipped kernel (its Relu fused into it)
    "decoder": ["conv2d", "pad", "conv2d", "pad", "conv2d", "resize", "resize", "add", "conv2d"],
    "two_inputs": ["fully_connected", "conv2d", "avg_pool", "reshape", "concat", "fully_connected"],
    "arith_int8": ["conv2d", "avg_pool", "conv2d", "lut", "add_lut", "add_lut", "conv2d"],
    "arith_islands": ["conv2d", "avg_pool", "conv2d", "add_lut", "add_lut", "conv2d"],  # Sigmoid read as a table
    # the input is quantized before its Unsqueeze; HardSwish (float) is read as a table by the SE mean
    # and the SE Mul; the float Sigmoid output gets qparams from its exact range
    "se_hswish_islands": ["reshape", "conv2d", "mean_lut", "conv2d", "conv2d", "mul", "conv2d", "lut"],
    # ReduceMean over H (keepdims=0: NHWC rows -> ONNX's (N, C, W)), over W, over the channels: 1-D windows
    "reduce_axes": ["conv2d", "avg_pool", "transpose_nchw", "avg_pool", "avg_pool", "reshape", "conv2d",
                    "fully_connected"],
    # the anchor grid (Shape -> Range -> Cast -> Add -> Q/DQ ...) folded into a constant tensor; the
    # per-anchor stride and a concatenated constant row too; concatenation along a non-channel axis
    "anchor_head": ["conv2d", "conv2d", "gather", "lut", "gather", "gather", "gather", "constant", "add_lut",
                    "add_lut", "concat", "constant", "mul", "constant", "concat"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("c_ops")
    return {name: tm.quantize_qdq(build(), d / f"{name}.onnx", **kw) for name, (build, kw) in VARIANTS.items()}


def _inputs(graph, n):
    x = {name: tm.random_inputs(shape, n, seed=SEED + 1 + k) for k, (name, shape) in enumerate(graph.onnx_inputs)}
    q = quantize_inputs(graph, x)
    q[0], q[1] = -128, 127  # saturating extremes
    return q


@pytest.mark.parametrize("name", list(VARIANTS))
def test_lowering_kinds(models, name):
    graph = lower_for_c(models[name])
    kinds = [op.kind for op in graph.ops]
    assert kinds == KINDS[name], kinds
    gathers = [op for op in graph.ops if op.kind == "gather" and op.name in ("to4d", "split_0", "split_1")]
    # channel shuffle and split halves: one channel table per pixel, never an index per element
    assert all(op.attrs["pixels"] == 16 for op in gathers), [(op.name, op.attrs) for op in gathers]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generated_c_bit_exact_and_tracks_onnxruntime(tmp_path, models, name):
    from test_cnn_ops_exact import _check_c_exact

    graph = lower_for_c(models[name])
    q = _inputs(graph, 64)
    ref = _check_c_exact(tmp_path, graph, q, name)
    ort = ort_int8_outputs(models[name], graph, q).reshape(len(q), -1).astype(np.int64)
    diff = np.abs(ref.astype(np.int64) - ort)
    same, worst = float((diff == 0).mean()), int(diff.max())
    print(f"\n{name}: identical {same:.4f}, max diff {worst} LSB")
    assert same >= MIN_SAME and worst <= MAX_LSB, \
        f"{name}: identical {same:.4f} (>= {MIN_SAME}), max diff {worst} (<= {MAX_LSB}), seed {SEED + 1}"


def test_channel_shuffle_is_one_permutation(models):
    """Reshape(1,2,4,4,4) -> Transpose(0,2,1,3,4) -> Reshape(1,8,4,4) in NHWC is out channel j = in
    channel (j % 2) * 4 + j // 2 at every pixel, whatever the 5-D layout in between."""
    graph = lower_for_c(models["shuffle_int8"])
    shuffle = next(op for op in graph.ops if op.name == "to4d")
    assert shuffle.arrays["index"].tolist() == [(j % 2) * 4 + j // 2 for j in range(8)]
    assert shuffle.attrs == dict(pixels=16, in_c=8, out_c=8)


def test_mul_kernel_exact_with_awkward_zero_points(tmp_path):
    """``mul`` with per-channel broadcast, a scalar operand and equal shapes, zero points -10 / 13 / 4,
    extremes included: C bit-exact with the reference, and every output equal to exact float math
    rounded, except within 0.01 LSB of a .5 boundary (the 31-bit multiplier), and there by at most 1."""
    from test_cnn_ops_exact import _check_c_exact

    from edgekiln.quant.fixed_point import quantize_multiplier

    a = QTensor("a", (1, 3, 4, 5), 0.043, -10)
    b = QTensor("b", (1, 1, 1, 5), 0.021, 13)
    s = QTensor("s", (1,), 0.5, 4)
    ops, tensors = [], {"a": a}
    for i, (other, channels) in enumerate(((b, 5), (s, 1), (a, 0))):
        y = QTensor(f"y{i}", a.shape, 0.0093 * (i + 1), 4 if i % 2 else -3)
        m, sh = quantize_multiplier(a.scale * other.scale / y.scale)
        tensors.update({other.name: other, y.name: y})
        ops.append(Op("mul", f"mul{i}", ["a", other.name], y.name,
                      attrs=dict(size=a.size, b_channels=channels, pre_shift=0, output_zp=y.zero_point, mult=m,
                                 shift=sh, act_min=-128, act_max=127),
                      arrays=dict(a_table=(np.arange(-128, 128) - a.zero_point).astype(np.int32),
                                  b_table=(np.arange(-128, 128) - other.zero_point).astype(np.int32))))
    # b and s are computed from a by a table op first so the graph has one input
    rng = np.random.default_rng(SEED)
    pre = [Op("gather", "b_of_a", ["a"], "b", attrs=dict(pixels=1, in_c=a.size, out_c=5),
              arrays=dict(index=rng.permutation(a.size)[:5].astype(np.int32))),
           Op("gather", "s_of_a", ["a"], "s", attrs=dict(pixels=1, in_c=a.size, out_c=1),
              arrays=dict(index=np.array([7], np.int32)))]
    graph = IntGraph(tensors, pre + ops, "a", "y0", "input", (), (), extra_outputs=["y1", "y2"])
    q = rng.integers(-128, 128, (24, 3, 4, 5)).astype(np.int8)
    q[0], q[1] = -128, 127
    ref = _check_c_exact(tmp_path, graph, q, "mul x3").astype(np.int64)
    for k, qa in enumerate(q):
        fa = (qa.astype(np.float64) - a.zero_point) * a.scale
        flat_a = qa.reshape(-1)
        ops_b = {"b": flat_a[pre[0].arrays["index"]], "s": flat_a[[7]], "a": flat_a}
        start = 0
        for op in ops:
            y = tensors[op.output]
            other = tensors[op.inputs[1]]
            ob = ops_b[other.name].astype(np.float64)
            ob = np.broadcast_to(ob.reshape(-1), (a.size // ob.size, ob.size)).reshape(-1) if op.attrs["b_channels"] \
                else ob
            exact = fa.reshape(-1) * (ob - other.zero_point) * other.scale / y.scale + y.zero_point
            got = ref[k, start:start + a.size]
            start += a.size
            off = np.abs(got - np.clip(np.rint(exact), -128, 127)) > 0
            near = np.abs(exact - np.floor(exact) - 0.5) < 0.01
            assert not (off & ~near).any(), f"{op.name}: {int((off & ~near).sum())} outputs off away from a tie"
            assert np.abs(got - np.clip(np.rint(exact), -128, 127)).max() <= 1


def test_float_gate_table_is_fixed_point_of_the_gate(models):
    """The SE gate left float (HardSigmoid in [0, 1]) is stored as round(g * 2^k) with the most bits
    that keep its product with the int8 operand (|q - z| <= 255) below 2^30: 2^21 < max |T| <= 2^22."""
    graph = lower_for_c(models["se_islands"])
    mul = next(op for op in graph.ops if op.kind == "mul")
    t = mul.arrays["b_table"].astype(np.int64)
    assert mul.attrs["b_channels"] == 8 and t.min() >= 0 and 2 ** 21 < t.max() <= 2 ** 22, (t.min(), t.max())
    assert np.array_equal(mul.arrays["a_table"], np.arange(-128, 128) - graph.tensors[mul.inputs[0]].zero_point)


def test_run_graph_matches_for_two_outputs(models):
    graph = lower_for_c(models["shuffle_islands"])
    assert [graph.tensors[o].shape for o in graph.outputs] == [(1, 4, 4, 2), (1, 5)]
    y = run_graph(graph, _inputs(graph, 2)[:1])
    assert y.shape == (32 + 5,)


def test_linear_resize_differs_from_onnxruntime_only_at_exact_ties(tmp_path):
    """x2 half_pixel bilinear weights are 1/4 and 3/4, so 1/16 of a sum is often an exact .5: the kernel
    rounds those half to even; onnxruntime's float weights carry rounding noise that tips some ties
    either way. Every difference must be such a tie, and at most 1 LSB."""
    from onnx import helper
    from test_cnn_ops_exact import _ort_intermediates

    p = tm._Params(SEED)
    p.inits += [tm._init("no_roi", np.array([])), tm._init("scales", np.array([1, 1, 2, 2]))]
    nodes = [helper.make_node("Conv", ["input", *p.conv("c", 4, 3, 3)], ["c"], name="c", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "no_roi", "scales"], ["output"], name="up", mode="linear",
                              coordinate_transformation_mode="half_pixel")]
    model = tm.quantize_qdq(tm._finish(nodes, p, (1, 3, 5, 5), [1, 4, 10, 10], "up"), tmp_path / "up.onnx",
                            extra_ops=("Resize",))
    graph = lower_for_c(model)
    op = next(o for o in graph.ops if o.kind == "resize")
    vals = _ort_intermediates(model, graph, _inputs(graph, 32))
    x = vals[op.inputs[0]].astype(np.float64) - op.attrs["zero_point"]
    a, one = op.arrays, 1 << 15
    wy, wx = a["wy"][None, :, None, None] / one, a["wx"][None, None, :, None] / one
    top = (1 - wx) * x[:, a["y0"]][:, :, a["x0"]] + wx * x[:, a["y0"]][:, :, a["x1"]]
    bottom = (1 - wx) * x[:, a["y1"]][:, :, a["x0"]] + wx * x[:, a["y1"]][:, :, a["x1"]]
    exact = (1 - wy) * top + wy * bottom
    from edgekiln.codegen.reference import run_op

    mine = np.concatenate([run_op(op, [vals[op.inputs[0]][k:k + 1]]) for k in range(len(x))]).astype(np.int64)
    theirs = vals[op.output].astype(np.int64)
    diff = mine != theirs
    ties = np.isclose(np.abs(exact) % 1, 0.5)
    print(f"\nresize x2 half_pixel: {int(diff.sum())}/{diff.size} differ, {int(ties.sum())} exact ties")
    assert np.abs(mine - theirs).max() <= 1 and not (diff & ~ties).any(), \
        f"{int((diff & ~ties).sum())} differences are not exact .5 ties (seed {SEED + 1})"


def test_two_inputs_are_packed_in_graph_order(tmp_path, models):
    from edgekiln.codegen.emit import write_library
    from edgekiln.codegen.planner import plan_memory

    graph = lower_for_c(models["two_inputs"])
    assert [graph.tensors[i].shape for i in graph.inputs] == [(1, 6, 6, 3), (1, 4)]
    assert graph.input_offsets == [0, 108] and graph.input_bytes == 112
    plan = plan_memory(graph)
    assert [plan.location[i] for i in graph.inputs] == [("input", 0), ("input", 108)]
    write_library(graph, plan, tmp_path, "k")
    header = (tmp_path / "k.h").read_text()
    assert "#define K_INPUT_COUNT 2" in header and "#define K_INPUT1_OFFSET 108" in header \
        and "#define K_INPUT_SIZE 112" in header


@pytest.mark.parametrize("name", ["anchor_head", "se_hswish_islands", "shuffle_int8"])
def test_float_pair_forms_lower_to_the_same_integer_graph(tmp_path, models, name):
    """quantize may keep a form with activation Q/DQ pairs left out (OpenVINO's, quant/float_pairs.py);
    lowering puts them back before folding constants: the same kernels, bit for bit the same outputs
    (YOLOv8n's anchor grid, folded through its pair, failed as "constant not per-channel" when folded first)."""
    import onnx

    from edgekiln.quant.float_pairs import keep_weighted_inputs

    form = onnx.load(str(models[name]))
    assert keep_weighted_inputs(form), f"{name}: the inputs form leaves no pair out"
    path = tmp_path / f"{name}_inputs.onnx"
    onnx.save(form, str(path))
    want, got = lower_for_c(models[name]), lower_for_c(path)
    assert [op.kind for op in got.ops] == [op.kind for op in want.ops], [op.kind for op in got.ops]
    q = _inputs(want, 16)
    a = np.stack([run_graph(want, qi[None]).reshape(-1) for qi in q])
    b = np.stack([run_graph(got, qi[None]).reshape(-1) for qi in q])
    assert np.array_equal(a, b), f"{name}: outputs differ by up to {np.abs(a.astype(int) - b.astype(int)).max()} LSB"
