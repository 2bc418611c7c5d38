"""Bullet 1 of issue 24: a placed model, run as a chain of segment files, gives the unplaced model's outputs.

Each case plans with the DP (``edgekiln.targets.place_io.place_model``), writes the segments and
placement.json, runs the chain once through ``execution.chain.load_chain`` (units this machine lacks
simulated on onnxruntime's CPU, so outputs are real) and compares with the whole model on onnxruntime.
No timing. Tolerances: fp32 ``max|y - y_ref| <= 1e-5 * max|y_ref|`` (float reassociation only); an
int8 QDQ model within 1 LSB of its output's scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.codegen.testmodels import mobilenet_style_float, quantize_qdq
from edgekiln.codegen.testmodels_heads import anchor_head_float

PROFILES = ("coral-edgetpu", "jetson-nano", "rk3588", "split-test")
# NOTE: on models this small the built-in profiles keep everything on the CPU (launch and link costs
# dominate), so "split-test" makes a unit that is far faster but lacks some ops: every model is cut into
# several segments and the chain's hand-over of tensors is exercised (asserted below).
SPLIT_TEST = """\
name: split-test
description: a fast unit without some ops beside a slow CPU (test)
kind: linux
flash_bytes: 1GB
ram_bytes: 1GB
clock_hz: 1000000000
cores: 1
precisions: [int8, fp32]
peak_macs_per_s: {int8: 100000000, fp32: 100000000}
memory_bandwidth_bytes_per_s: 100000000
efficiency: 1.0
runtime_overhead_bytes: 0
energy_pj_per_mac: {}
energy_pj_per_byte: null
source: test profile
units:
  - {name: cpu, type: cpu, precisions: [int8, fp32], peak_macs_per_s: {int8: 100000000, fp32: 100000000},
     efficiency: 1.0, memory_bandwidth_bytes_per_s: 100000000, source: test}
  - {name: acc, type: npu, precisions: [int8, fp32], peak_macs_per_s: {int8: 1.0e+15, fp32: 1.0e+15},
     efficiency: 1.0, memory_bandwidth_bytes_per_s: 1.0e+13, source: test,
     ops: [Conv, Clip, Relu, MatMul, Softmax, Add, Mul, Reshape, Transpose, QuantizeLinear, DequantizeLinear]}
"""


def _w(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)


def yolo_style() -> onnx.ModelProto:
    """A conv backbone (stride-2 Conv + Relu, 1x3x8x12 -> 1x3x4x6) under the YOLOv8-style anchor head."""
    head = anchor_head_float()
    g = head.graph
    for n in g.node:
        n.input[:] = ["feat" if x == "input" else x for x in n.input]
    rng = np.random.default_rng(3)
    g.initializer.extend([_w(rng, "bb_w", (3, 3, 3, 3)), numpy_helper.from_array(np.zeros(3, np.float32), "bb_b")])
    stem = [helper.make_node("Conv", ["input", "bb_w", "bb_b"], ["bb"], name="backbone", kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["bb"], ["feat"], name="backbone_relu")]
    nodes = stem + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    g.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 12]))
    onnx.checker.check_model(head, full_check=True)
    return head


def transformer_block(tokens: int = 16, d: int = 32, heads: int = 2) -> onnx.ModelProto:
    """Self-attention (MatMul, Softmax over a 4-D tensor), LayerNormalization, an Erf-GELU MLP."""
    rng = np.random.default_rng(4)
    dh = d // heads
    f = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    i = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [_w(rng, n, (d, d)) for n in ("wq", "wk", "wv", "wo")] + [_w(rng, "w1", (d, 2 * d)), _w(rng, "w2", (2 * d, d))]
    inits += [i("split_heads", [1, tokens, heads, dh]), i("merge", [1, tokens, d]), f("scale", 1 / np.sqrt(dh)),
              f("ln_g", np.ones(d)), f("ln_b", np.zeros(d)), f("half", 0.5), f("one", 1.0), f("sqrt2", np.sqrt(2.0))]
    mk = helper.make_node
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [mk("MatMul", ["x", "w" + n], [n + "0"], name="proj_" + n),
                  mk("Reshape", [n + "0", "split_heads"], [n + "1"], name="heads_" + n),
                  mk("Transpose", [n + "1"], [n], name="t_" + n, perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3])]
    nodes += [mk("MatMul", ["q", "k"], ["s0"], name="scores"), mk("Mul", ["s0", "scale"], ["s"], name="scaled"),
              mk("Softmax", ["s"], ["p"], name="softmax", axis=-1), mk("MatMul", ["p", "v"], ["a0"], name="attend"),
              mk("Transpose", ["a0"], ["a1"], name="t_out", perm=[0, 2, 1, 3]),
              mk("Reshape", ["a1", "merge"], ["a2"], name="merge_heads"),
              mk("MatMul", ["a2", "wo"], ["a"], name="proj_o"), mk("Add", ["x", "a"], ["r1"], name="res1"),
              mk("LayerNormalization", ["r1", "ln_g", "ln_b"], ["n1"], name="ln", axis=-1),
              mk("MatMul", ["n1", "w1"], ["h"], name="fc1"), mk("Div", ["h", "sqrt2"], ["hs"], name="gelu_div"),
              mk("Erf", ["hs"], ["he"], name="gelu_erf"), mk("Add", ["he", "one"], ["he1"], name="gelu_add"),
              mk("Mul", ["h", "he1"], ["hm"], name="gelu_mul"), mk("Mul", ["hm", "half"], ["g"], name="gelu_half"),
              mk("MatMul", ["g", "w2"], ["m"], name="fc2"), mk("Add", ["r1", "m"], ["output"], name="res2")]
    graph = helper.make_graph(nodes, "transformer_block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, d])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, tokens, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def mobilenet_with_erf(size: int = 16, after: str = "residual") -> onnx.ModelProto:
    """mobilenet_style_float with an ``Erf`` after node ``after`` (default block 2's residual Add): an op
    the Edge TPU and the RKNN NPU lack."""
    model = mobilenet_style_float(size=size)
    nodes = list(model.graph.node)
    k = next(j for j, n in enumerate(nodes) if n.name == after)
    t = nodes[k].output[0]
    for n in nodes[k + 1:]:
        n.input[:] = [t + "_erf" if x == t else x for x in n.input]
    nodes.insert(k + 1, helper.make_node("Erf", [t], [t + "_erf"], name="erf"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


MODELS = {
    "mobilenet_float": lambda d: _save(mobilenet_style_float(size=16), d / "m.onnx"),
    "mobilenet_qdq": lambda d: quantize_qdq(mobilenet_style_float(size=16), d / "m.onnx"),
    "yolo_float": lambda d: _save(yolo_style(), d / "m.onnx"),
    "transformer_float": lambda d: _save(transformer_block(), d / "m.onnx"),
    "erf_fallback_qdq": lambda d: quantize_qdq(mobilenet_with_erf(), d / "m.onnx"),
}


def output_lsb(path: Path) -> float | None:
    """The scale of the DequantizeLinear producing the (one) graph output, or None for a float output."""
    m = onnx.load(str(path))
    out = m.graph.output[0].name
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    node = next((n for n in m.graph.node if out in n.output), None)
    if node is not None and node.op_type == "DequantizeLinear":
        return float(np.max(inits[node.input[1]]))
    return None


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, build in MODELS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = build(d)
    return out


def _place(model_path: Path, profile: str, out: Path, precision: str | None = None) -> tuple[Any, dict[str, Any]]:
    from edgekiln.api import load
    from edgekiln.targets.place_io import place_model
    from edgekiln.targets.profiles import load_profile

    if profile == "split-test":
        out.mkdir(parents=True, exist_ok=True)
        (out.parent / "split-test.yaml").write_text(SPLIT_TEST)
        profile = str(out.parent / "split-test.yaml")
    return place_model(load(model_path), load_profile(profile), out=out, precision=precision)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("model", list(MODELS))
def test_chain_equals_unplaced_model(models: dict[str, Path], profile: str, model: str, tmp_path: Path) -> None:
    placement, report = _place(models[model], profile, tmp_path / "run")
    check = report["placement"]["check"]
    segs = [(s["unit"], s["nodes"]) for s in report["placement"]["segments"]]
    lsb = output_lsb(models[model])
    for name, diff in check["max_abs_diff"].items():
        ref = check["ref_max_abs"][name]
        limit = lsb * (1 + 1e-6) if lsb is not None else 1e-5 * ref
        why = "1 output LSB" if lsb is not None else f"1e-5 * max|ref| = 1e-5 * {ref:.3g}"
        assert diff <= limit, (f"{profile} / {model}: output {name} max|diff| {diff:.3g} > {limit:.3g} ({why}); "
                               f"segments {segs}")
    assert (tmp_path / "run" / "placement.json").is_file()
    assert len(placement.segments) == len(segs) >= (2 if profile == "split-test" else 1), (
        f"{profile} / {model}: segments {segs}")


def test_fallback_placements(tmp_path: Path) -> None:
    """An Erf (in neither the Edge TPU's nor the RKNN NPU's op list) after the global pool of a 224x224
    MobileNet-style model estimated as int8: the Edge TPU takes everything before it and, partitioning
    once (max_segments 1), nothing after; the cut hands over the 12 pooled values. On the RK3588 the Erf
    is never placed on the NPU (which unit wins elsewhere is the profile's figures' call)."""
    path = tmp_path / "erf.onnx"
    onnx.save(mobilenet_with_erf(224, after="gap"), str(path))
    coral, _ = _place(path, "coral-edgetpu", tmp_path / "coral", precision="int8")
    units = [s.unit for s in coral.segments]
    assert units == ["tpu", "cpu"], f"coral-edgetpu placement {units}, expected ['tpu', 'cpu']"
    assert "erf" in coral.segments[1].nodes, f"the Erf is not in the cpu segment: {coral.segments[1].nodes}"
    assert any(f.op == "Erf" and f.unit == "tpu" for f in coral.fallback), f"fallback {coral.fallback}"
    assert coral.segments[0].transfer_out_bytes == 12, (
        f"tpu -> cpu transfer {coral.segments[0].transfer_out_bytes} B, expected the 12 int8 pooled values")
    rk, _ = _place(path, "rk3588", tmp_path / "rk", precision="int8")
    on_npu = [n for s in rk.segments if s.unit == "npu" for n in s.nodes]
    assert "erf" not in on_npu, f"rk3588 put the Erf on the NPU: {[(s.unit, s.nodes) for s in rk.segments]}"
    assert any(f.op == "Erf" and f.unit == "npu" for f in rk.fallback), f"rk3588 fallback {rk.fallback}"


def test_host_blocks_hand_over_int8_as_float_exactly(models: dict[str, Path], tmp_path: Path) -> None:
    """The host measurement cuts an int8 model after QuantizeLinear outputs and hands each over as float
    (DequantizeLinear at the end of one segment, QuantizeLinear at the start of the next, same scale and
    zero point): a chain of every block on onnxruntime equals the whole model bit for bit."""
    from edgekiln.api import load
    from edgekiln.execution.feeds import random_feeds
    from edgekiln.execution.runtimes import load_session
    from edgekiln.targets.place_measure import _SegmentFiles, cut_blocks, float_handover

    art = load(models["mobilenet_qdq"])
    blocks, handover = float_handover(art.path, cut_blocks(art.path))
    assert len(blocks) >= 4 and handover, f"{len(blocks)} blocks, {len(handover)} float hand-overs"
    files = _SegmentFiles(art, tmp_path, None, handover)
    chain = files.chain([(b.index, b.index + 1, "onnxruntime") for b in blocks], blocks)
    feeds = random_feeds(art.inputs, seed=0)
    want = load_session(art.path, "onnxruntime").run(feeds)[0]
    got = chain.run(feeds)[0]
    assert np.array_equal(got, want), f"max|diff| {np.max(np.abs(got - want)):.3g} over {len(blocks)} blocks"


def test_host_blocks_are_static_and_litert_reads_the_recorded_pairs(models: dict[str, Path], tmp_path: Path) -> None:
    """A dynamic-batch int8 model in the form ``quantize`` writes for OpenVINO (activation Q/DQ pairs left
    out and recorded): every block file gets static input shapes (OpenVINO compiles a dynamic input as a
    dynamic model, several times slower), and LiteRT's blocks are written from the model with its pairs
    put back, so its writer accepts them and the chain still equals the whole model."""
    from edgekiln.api import _tflite_block, load
    from edgekiln.execution.feeds import random_feeds
    from edgekiln.execution.runtimes import available_runtimes, load_session
    from edgekiln.models.qdq_pairs import recorded_pairs
    from edgekiln.quant.float_pairs import keep_weighted_inputs
    from edgekiln.targets.place_measure import _SegmentFiles, cut_blocks, float_handover

    m = onnx.load(str(models["mobilenet_qdq"]))
    batch = m.graph.input[0].type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_param = "N"
    keep_weighted_inputs(m)
    assert recorded_pairs(m), "keep_weighted_inputs recorded no pair: the test model has no float-pair form"
    path = tmp_path / "pairs.onnx"
    onnx.save(m, str(path))
    shape = [1, *(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:])]
    art = load(path, input_shapes=shape)
    blocks, handover = float_handover(art.path, cut_blocks(art.path))
    files = _SegmentFiles(art, tmp_path / "work", _tflite_block, handover)
    feeds, _ = files.values(blocks)
    for b in blocks:
        seg = onnx.load(str(files.path(b.index, b.index + 1, "onnxruntime", blocks)))
        dims = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
                for i in seg.graph.input}
        assert all(isinstance(d, int) and d > 0 for ds in dims.values() for d in ds), f"block {b.index} inputs {dims}"
    if available_runtimes().get("litert"):
        pytest.skip(f"litert: {available_runtimes()['litert']}")
    lite = files.path(0, len(blocks), "litert", blocks)
    assert lite is not None and lite.suffix == ".tflite", f"no LiteRT file for the whole float-pair model: {lite}"
    split = len(blocks) // 2
    chain = files.chain([(0, split, "onnxruntime"), (split, len(blocks), "litert")], blocks)
    want = load_session(art.path, "onnxruntime").run(random_feeds(art.inputs, seed=0))[0]
    got = chain.run(dict(feeds))[0]
    scale = float(np.max(np.abs(want))) or 1.0
    assert np.max(np.abs(got - want)) <= 0.05 * scale, (
        f"onnxruntime + litert chain vs whole model: max|diff| {np.max(np.abs(got - want)):.3g} > 5% of {scale:.3g}")
