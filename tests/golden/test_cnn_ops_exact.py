"""Golden: the ops real CNNs add (issue 20) — BatchNormalization, Sigmoid/HardSigmoid/HardSwish/
Tanh/LeakyRelu/Elu (one generic int8 lookup-table kernel), MaxPool/AveragePool with ceil_mode and
asymmetric pads, ReduceMean over H,W — bit-exact between the generated C (host gcc) and the
numpy reference, and agreeing with onnxruntime's QDQ model under the rule of
test_kernels_exact.py: >= 99% of int8 outputs identical, none off by more than 1 LSB, top-1 equal.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest

from edgekiln.codegen import testmodels as tm
from edgekiln.codegen.emit import write_library
from edgekiln.codegen.fuse import lower_for_c
from edgekiln.codegen.ir import IntGraph, Op, QTensor, load_qdq
from edgekiln.codegen.lower_pointwise import UNARY_FUNCS, unary_table
from edgekiln.codegen.planner import plan_memory
from edgekiln.codegen.reference import run_graph, run_op
from edgekiln.codegen.verify import HOST_CFLAGS, ort_int8_outputs, quantize_inputs
from edgekiln.errors import EdgekilnError
from edgekiln.execution.ort import ort_session

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
SEED = 0
N_INPUTS = 48
MIN_SAME, MAX_LSB = 0.99, 1


def _compile_and_run(tmp_path, graph, q):
    """Emit ``graph`` with the real emitter and planner, build it with gcc, run it on int8 ``q``."""
    write_library(graph, plan_memory(graph), tmp_path, "k")
    exe = tmp_path / "k_test"
    subprocess.run(["gcc", *HOST_CFLAGS, "-o", str(exe), str(tmp_path / "k.c"), str(tmp_path / "ek_kernels.c"),
                    str(tmp_path / "main.c")], check=True, capture_output=True, text=True)
    q.astype(np.int8).tofile(tmp_path / "in.bin")
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, capture_output=True)
    return np.fromfile(tmp_path / "out.bin", np.int8).reshape(len(q), -1)


def _check_c_exact(tmp_path, graph, q, what):
    out = _compile_and_run(tmp_path, graph, q)
    ref = np.stack([run_graph(graph, qi[None]).reshape(-1) for qi in q])
    bad = int((out != ref).sum())
    assert bad == 0, f"{what}: {bad}/{out.size} C outputs differ from the numpy reference (threshold 0, seed {SEED})"
    return ref


def _check_ort(model, graph, q, ref, what):
    ort = ort_int8_outputs(model, graph, q).reshape(len(q), -1).astype(np.int64)
    ref = ref.astype(np.int64)
    same, worst = float((ref == ort).mean()), int(np.abs(ref - ort).max())
    assert (ref.argmax(1) == ort.argmax(1)).all(), f"{what}: top-1 differs from ORT (seed {SEED + 1})"
    assert same >= MIN_SAME and worst <= MAX_LSB, \
        f"{what}: identical {same:.4f} (>= {MIN_SAME}), max diff {worst} (<= {MAX_LSB}), seed {SEED + 1}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn_ops")
    return {name: tm.quantize_qdq(tm.cnn_ops_float(keepdims=kd, avg_pool=ap), d / f"{name}.onnx",
                                  extra_ops=tm.CNN_OPS_EXTRA)
            for name, kd, ap in (("all_ops", False, True), ("no_avg", False, False), ("keepdims", True, False))}


def _inputs(graph, n=N_INPUTS):
    q = quantize_inputs(graph, tm.random_inputs(graph.onnx_input_shape, n, seed=SEED + 1))
    q[0], q[1] = -128, 127  # saturating extremes
    return q


def test_lowering_covers_every_new_op(models):
    graph = load_qdq(models["all_ops"])
    kinds = [op.kind for op in graph.ops]
    assert kinds == ["conv2d", "conv2d", "lut", "max_pool", "conv2d", "lut", "avg_pool", "conv2d", "lut", "lut",
                     "conv2d", "lut", "lut", "avg_pool", "fully_connected"], kinds
    shapes = {op.name: graph.tensors[op.output].shape for op in graph.ops}
    # ceil_mode: 11 -> ceil((11-3)/2)+1 = 5; 5 with pads (1, 0 | 0, 1) -> 3 x 3; ReduceMean keepdims=0 -> (1, C)
    assert shapes["maxpool"] == (1, 5, 5, 8) and shapes["avgpool"] == (1, 3, 3, 8) and shapes["reducemean"] == (1, 8)
    bn = next(op for op in graph.ops if op.name == "bn")
    assert bn.attrs["groups"] == 8 and set(np.abs(bn.arrays["weights"]).reshape(-1).tolist()) == {127}, \
        "a standalone BatchNormalization is a depthwise 1x1 conv with weights +-127"


@pytest.mark.parametrize("name", ["all_ops", "keepdims"])
def test_generated_c_is_bit_exact(tmp_path, models, name):
    graph = lower_for_c(models[name])  # as `export --to c` emits it
    _check_c_exact(tmp_path, graph, _inputs(graph), name)


@pytest.mark.parametrize("name", ["no_avg", "keepdims"])
def test_end_to_end_tracks_onnxruntime(tmp_path, models, name):
    graph = load_qdq(models[name])
    q = _inputs(graph, 100)
    ref = np.stack([run_graph(graph, qi[None]).reshape(-1) for qi in q])
    _check_ort(models[name], graph, q, ref, name)


def _ort_intermediates(model_path, graph, q):
    """Every int8 tensor of ``graph`` as onnxruntime computes it (C layout), for per-op checks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.load(str(model_path))
    produced = {o for n in m.graph.node for o in n.output}
    names = [t for t in graph.tensors if t in produced]
    m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.INT8, None) for t in names)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ti = graph.tensors[graph.input]
    vals = {t: [] for t in names}
    for qi in q:
        xf = ((qi.transpose(2, 0, 1).astype(np.float32) - ti.zero_point) * np.float32(ti.scale))[None]
        for t, v in zip(names, sess.run(names, {graph.onnx_input_name: xf}), strict=True):
            vals[t].append(v.transpose(0, 2, 3, 1) if v.ndim == 4 else v)
    return {t: np.concatenate(v) for t, v in vals.items()}


def test_each_op_tracks_onnxruntime_on_its_own_inputs(models):
    """Every op, fed onnxruntime's own int8 inputs, reproduces onnxruntime's int8 output.

    avg_pool is held to a sharper rule instead of the 99% share: ORT's QLinearAveragePool adds
    float32 values, so an average that is *exactly* a .5 tie lands on either side by float
    rounding; the kernel rounds the exact tie half to even. Every difference must be such a tie.
    """
    model = models["all_ops"]
    graph = load_qdq(model)
    vals = _ort_intermediates(model, graph, _inputs(graph, 64))
    report = []
    for op in graph.ops:
        mine = np.concatenate([run_op(op, [vals[i][k:k + 1] for i in op.inputs]).reshape(vals[op.output][k:k + 1].shape)
                               for k in range(len(vals[op.output]))]).astype(np.int64)
        theirs = vals[op.output].astype(np.int64)
        assert mine.shape == theirs.shape, f"{op.name}: shape {mine.shape} vs ORT {theirs.shape}"
        diff = mine != theirs
        same, worst = 1 - float(diff.mean()), int(np.abs(mine - theirs).max())
        report.append(f"{op.name} {same:.4f}")
        assert worst <= MAX_LSB, f"{op.name}: max diff {worst} LSB (<= {MAX_LSB}), seed {SEED + 1}"
        if op.kind == "avg_pool" and diff.any():
            ties = _avg_pool_exact_ties(vals[op.inputs[0]], op)
            assert ties[diff].all(), f"{op.name}: {int((diff & ~ties).sum())} differences are not exact .5 ties"
        else:
            assert same >= MIN_SAME, f"{op.name}: identical {same:.4f} (>= {MIN_SAME}), seed {SEED + 1}"
    assert all(float(r.split()[1]) == 1.0 for r in report if r.split()[0] in
               ("sigmoid", "hardswish", "hardsigmoid", "tanh", "leakyrelu", "elu")), \
        f"lookup tables must equal ORT exactly: {report}"


def _avg_pool_exact_ties(x, op):
    """True where the exact rational average (+ zero point) of a window is k + 1/2."""
    a = op.attrs
    tie = np.zeros((len(x), a["out_h"], a["out_w"], a["channels"]), bool)
    for oy in range(a["out_h"]):
        for ox in range(a["out_w"]):
            y0, x0 = oy * a["stride_h"] - a["pad_top"], ox * a["stride_w"] - a["pad_left"]
            win = x[:, max(y0, 0):y0 + a["k_h"], max(x0, 0):x0 + a["k_w"]].astype(np.int64) - a["input_zp"]
            count = a["k_h"] * a["k_w"] if a["count_include_pad"] else win.shape[1] * win.shape[2]
            den = count << (31 - a["shift"])
            num = win.sum(axis=(1, 2)) * a["mult"] + a["output_zp"] * den
            tie[:, oy, ox] = (2 * num) % (2 * den) == den
    return tie


def _unquantize_edge(model_path, out_path, tensor):
    """Drop the Q/DQ pair on ``tensor`` (a Conv output) so the Conv feeds its BatchNormalization in float."""
    m = onnx.load(str(model_path))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    for n in m.graph.node:
        n.input[:] = [tensor if i == dq.output[0] else i for i in n.input]
    m.graph.node.remove(q)
    m.graph.node.remove(dq)
    onnx.save(m, str(out_path))
    return out_path


def test_batchnorm_after_float_conv_is_folded_into_it(tmp_path, models):
    folded = _unquantize_edge(models["no_avg"], tmp_path / "fold.onnx", "c1")
    graph = load_qdq(folded)
    assert [op.name for op in graph.ops][:2] == ["c1", "sigmoid"], "BatchNormalization must fold into conv c1"
    q = _inputs(graph, 100)
    ref = _check_c_exact(tmp_path, graph, q, "conv+bn folded")
    _check_ort(folded, graph, q, ref, "conv+bn folded")


def test_lut_kernel_exact_with_awkward_zero_points(tmp_path):
    """One ``lut`` op per activation, all reading one input (zero point -10) and each a graph
    output (zero points 13, 4, -128), extremes included; each table matches an independent float64
    formula except within 1e-4 LSB of a rounding boundary."""
    x = QTensor("x", (1, 4, 5, 6), 0.047, -10)
    tensors, ops = {"x": x}, []
    for i, (fn_name, fn) in enumerate(sorted(UNARY_FUNCS.items())):
        y = QTensor(f"y{i}", x.shape, 1 / 256, -128) if fn_name in ("Sigmoid", "HardSigmoid") else \
            QTensor(f"y{i}", x.shape, 0.0081, 13 if i % 2 else 4)
        node = onnx.helper.make_node(fn_name, ["a"], ["b"])
        table = unary_table(lambda v, fn=fn, node=node: fn(v, node), x, y)
        tensors[y.name] = y
        ops.append(Op("lut", fn_name, ["x"], y.name, attrs=dict(size=x.size), arrays=dict(table=table)))
        real = (np.arange(-128, 128) - x.zero_point) * x.scale
        exact = fn(real.astype(np.float64), node) / y.scale + y.zero_point
        off = np.abs(np.clip(np.rint(exact), -128, 127) - table) > 0
        near_tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
        assert not (off & ~near_tie).any(), f"{fn_name}: table entries {np.flatnonzero(off & ~near_tie)} wrong"
    graph = IntGraph(tensors, ops, "x", ops[0].output, "input", (), (), extra_outputs=[op.output for op in ops[1:]])
    rng = np.random.default_rng(SEED)
    q = rng.integers(-128, 128, (16, *x.shape[1:])).astype(np.int8)
    q[0], q[1] = -128, 127
    ref = _check_c_exact(tmp_path, graph, q, "lut x6")
    assert ref.shape == (16, 6 * x.size)


def test_unsupported_variants_are_named(tmp_path):
    from onnx import helper

    for node, out_shape, msg in (
        # NOTE: over C and H (not one contiguous block in NHWC); one axis is supported (lower_reduce.py)
        (helper.make_node("ReduceMean", ["x"], ["output"], axes=[1, 2], keepdims=1), [1, 1, 1, 6], "axes"),
        (helper.make_node("AveragePool", ["x"], ["output"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
                          count_include_pad=1), [1, 2, 3, 3], "count_include_pad"),
    ):
        p = tm._Params(SEED)
        conv = helper.make_node("Conv", ["input", *p.conv("c", 2, 2, 1)], ["x"], kernel_shape=[1, 1])
        model = tm._finish([conv, node], p, (1, 2, 6, 6), out_shape, "bad")
        qdq = tm.quantize_qdq(model, tmp_path / f"{node.op_type}.onnx", calib_n=2, extra_ops=("ReduceMean",))
        with pytest.raises(EdgekilnError, match=msg):
            load_qdq(qdq)


def test_several_outputs_packed_bit_exact_and_track_onnxruntime(tmp_path):
    """Three outputs (score map, box map, class vector) go to one caller buffer, packed in graph order."""
    model = tm.quantize_qdq(tm.multi_head_float(), tmp_path / "heads.onnx")
    graph = lower_for_c(model)
    assert [graph.tensors[o].shape for o in graph.outputs] == [(1, 6, 6, 2), (1, 6, 6, 4), (1, 3)]
    assert graph.output_offsets == [0, 72, 216] and graph.output_bytes == 219
    plan = plan_memory(graph)
    assert [plan.location[o] for o in graph.outputs] == [("output", 0), ("output", 72), ("output", 216)]
    q = _inputs(graph, 100)
    ref = _check_c_exact(tmp_path, graph, q, "multi-output")
    header = (tmp_path / "k.h").read_text()
    assert "#define K_OUTPUT_COUNT 3" in header and "#define K_OUTPUT2_OFFSET 216" in header
    ort = ort_int8_outputs(model, graph, q).reshape(len(q), -1).astype(np.int64)
    diff = np.abs(ref.astype(np.int64) - ort)
    same, worst = float((diff == 0).mean()), int(diff.max())
    assert same >= MIN_SAME and worst <= MAX_LSB, \
        f"multi-output: identical {same:.4f} (>= {MIN_SAME}), max diff {worst} (<= {MAX_LSB}), seed {SEED + 1}"


@pytest.mark.parametrize("n,k,s,pads", [(4, 2, 3, [0, 0, 1, 1]), (5, 3, 2, [1, 1, 1, 1]), (6, 2, 2, [0, 0, 1, 1]),
                                        (7, 3, 3, [0, 0, 2, 2]), (10, 3, 2, [1, 0, 1, 0]), (8, 3, 4, [2, 2, 2, 2])])
def test_ceil_mode_output_size_matches_onnxruntime(n, k, s, pads):
    """Including the windows ceil_mode drops because they would start in the trailing padding
    (6, k2, s2, pads 0|1: ONNX shape inference says 4, onnxruntime and PyTorch compute 3)."""
    from onnx import TensorProto, helper

    from edgekiln.codegen.lower import _pool_axis

    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=pads, ceil_mode=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort_session(m)   # log level 3: ORT warns that the inferred shape differs from what it computes
    y = sess.run(None, {"x": np.zeros((1, 1, n, n), np.float32)})[0]
    ours = tuple(_pool_axis(n, k, s, pads, axis, True) for axis in (0, 1))
    assert tuple(y.shape[2:]) == ours, f"ceil_mode size {ours}, onnxruntime {y.shape[2:]}"


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("n", [6, 7])
def test_pool_auto_pad_matches_onnxruntime(auto_pad, n):
    """auto_pad pools: the reference max_pool on integers equals onnxruntime's float MaxPool
    (max is exact in float), so the pad placement (extra pad at the end for SAME_UPPER) is right."""
    from onnx import TensorProto, helper

    from edgekiln.codegen.lower import _pool_geometry

    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad=auto_pad)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(SEED).integers(-128, 128, (1, 2, n, n)).astype(np.int8)
    want = ort_session(m).run(None, {"x": x.astype(np.float32)})[0].transpose(0, 2, 3, 1)
    geo = _pool_geometry(node, QTensor("x", (1, n, n, 2), 1.0, 0), (3, 3))
    got = run_op(Op("max_pool", "mp", ["x"], "y", attrs=geo), [x.transpose(0, 2, 3, 1)])
    assert got.shape == want.shape and np.array_equal(got, want.astype(np.int8)), f"{auto_pad} n={n}"
