"""A model cut into segments and run as a chain (execution/chain.py) gives the whole model's outputs:
onnxruntime and OpenVINO segments mixed, a simulated segment, a LiteRT int8 segment (NHWC and
quantization at its boundaries), tensors dropped after their last reader, and placement.json
read with its SHA-256 checks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.utils import Extractor

from edgekiln.errors import EdgekilnError
from edgekiln.execution.chain import ChainSession, SegmentSpec, load_chain
from edgekiln.execution.runtimes import available_runtimes, load_session
from edgekiln.fileio import sha256_file


def _conv(rng, name, x, y, cin, cout, shape_hw=(1, 1)):
    w = numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), name + "_w")
    return [helper.make_node("Conv", [x, w.name], [name + "_c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [name + "_c"], [y])], [w]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """x -> t1 -> t2 -> y = t1 + conv(t2): t1 crosses two boundaries (read by segments 1 and 2)."""
    d = tmp_path_factory.mktemp("chain")
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for args in (("a", "x", "t1", 3, 4), ("b", "t1", "t2", 4, 4), ("c", "t2", "t3", 4, 4)):
        n, i = _conv(rng, *args)
        nodes += n
        inits += i
    nodes.append(helper.make_node("Add", ["t1", "t3"], ["y"]))
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, d / "whole.onnx")
    ex = Extractor(onnx.shape_inference.infer_shapes(m))
    cuts = [(["x"], ["t1"]), (["t1"], ["t2"]), (["t1", "t2"], ["y"])]
    for k, (i, o) in enumerate(cuts):
        onnx.save(ex.extract_model(i, o), d / f"s{k}.onnx")
    x = rng.standard_normal((1, 3, 8, 6)).astype(np.float32)
    ref = load_session(d / "whole.onnx").run({"x": x})[0]
    return d, cuts, x, ref


def _specs(d, cuts, runtimes, simulated=(None, None, None)):
    return [SegmentSpec(d / f"s{k}.onnx", rt, tuple(i), tuple(o), sim)
            for k, ((i, o), rt, sim) in enumerate(zip(cuts, runtimes, simulated, strict=True))]


def test_onnxruntime_and_openvino_segments_give_the_whole_models_output(toy):
    d, cuts, x, ref = toy
    reason = available_runtimes()["openvino"]
    if reason:
        pytest.skip(f"openvino: {reason}")
    chain = ChainSession(_specs(d, cuts, ["onnxruntime", "openvino", "onnxruntime"], (None, None, 0.25)))
    assert (chain.input_names, chain.output_names, chain.input_shapes) == (["x"], ["y"], [[1, 3, 8, 6]])
    y = chain.run({"x": x})[0]
    diff, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
    assert diff <= 1e-5 * scale, f"chain vs whole: max diff {diff} > 1e-5 * {scale}"
    assert chain.sources == ["measured", "measured", "simulated"]
    assert chain.last_ms[2] == 0.25 and all(t > 0 for t in chain.last_ms[:2]), chain.last_ms


def test_tensors_are_dropped_after_their_last_reader(toy):
    d, cuts, x, ref = toy
    chain = ChainSession(_specs(d, cuts, ["onnxruntime"] * 3))
    assert chain.frees == [("x",), (), ("t1", "t2")]
    np.testing.assert_allclose(chain.run({"x": x})[0], ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    # held at most: x and t1 after segment 0 (x freed), then t1, t2, y; without freeing x it would be 4
    assert chain.last_peak_live == 3, chain.last_peak_live


def test_chain_refuses_missing_inputs_and_twice_written_tensors(toy):
    d, cuts, x, _ = toy
    with pytest.raises(EdgekilnError, match="missing chain input"):
        ChainSession(_specs(d, cuts, ["onnxruntime"] * 3)).run({"t1": x})
    twice = [SegmentSpec(d / "s0.onnx", "onnxruntime", ("x",), ("t1",))] * 2
    with pytest.raises(EdgekilnError, match="writes t1, which an earlier segment already wrote"):
        ChainSession(twice)


def test_litert_segment_gets_nhwc_int8_inputs_and_gives_nchw_float_outputs(tmp_path):
    """float NCHW -> [onnxruntime Relu] -> [LiteRT int8 conv, NHWC] -> [onnxruntime Neg] equals the
    QDQ model on onnxruntime within one output-scale step (the input is 3x6x4: a missed transpose
    would scramble it)."""
    if available_runtimes()["litert"]:
        pytest.skip(f"litert: {available_runtimes()['litert']}")
    from edgekiln.codegen.testmodels import quantize_qdq
    from edgekiln.codegen.tflite import export_tflite

    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    w = numpy_helper.from_array((rng.standard_normal((5, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["a", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["o"])], "mid",
                          [vi("a", TensorProto.FLOAT, [1, 3, 6, 4])], [vi("o", TensorProto.FLOAT, [1, 5, 6, 4])], [w])
    mid = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    qdq = quantize_qdq(mid, tmp_path / "mid_qdq.onnx", calib_n=8)
    export_tflite(qdq, tmp_path / "tfl", measure_arena=False)

    def one(op, i, o, shape):
        m = helper.make_model(helper.make_graph([helper.make_node(op, [i], [o])], op,
                                                [vi(i, TensorProto.FLOAT, shape)], [vi(o, TensorProto.FLOAT, shape)]),
                              opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(m, tmp_path / f"{op}.onnx")
        return tmp_path / f"{op}.onnx"

    specs = [SegmentSpec(one("Abs", "x", "a", [1, 3, 6, 4]), "onnxruntime", ("x",), ("a",)),
             SegmentSpec(tmp_path / "tfl" / "model.tflite", "litert", ("a",), ("o",)),
             SegmentSpec(one("Neg", "o", "y", [1, 5, 6, 4]), "onnxruntime", ("o",), ("y",))]
    chain = ChainSession(specs)
    lite = chain.sessions[1]
    assert lite.input_dtypes == [np.dtype(np.int8)] and list(lite.input_shapes[0]) == [1, 6, 4, 3]
    x = rng.standard_normal((1, 3, 6, 4)).astype(np.float32)
    y = chain.run({"x": x})[0]
    ref = -load_session(qdq).run({"a": np.abs(x)})[0]
    step = float(lite._out[0]["quantization"][0])
    diff = float(np.abs(y - ref).max())
    assert y.shape == (1, 5, 6, 4) and diff <= step * 1.001, f"max diff {diff} > one output step {step}"
    first = ChainSession(specs[1:])   # LiteRT reads the chain input: it is declared as the ONNX tensor
    assert (first.input_shapes, first.input_dtypes) == ([[1, 3, 6, 4]], [np.dtype(np.float32)])
    y1 = first.run({"a": np.abs(x)})[0]
    assert float(np.abs(y1 - ref).max()) <= step * 1.001, float(np.abs(y1 - ref).max())


def test_load_chain_checks_hashes_and_paths_and_marks_simulated_segments(toy, tmp_path):
    d, cuts, x, ref = toy
    segs = [{"index": k, "unit": "npu" if k == 1 else "cpu", "runtime": None if k == 1 else "onnxruntime",
             "file": f"s{k}.onnx", "sha256": sha256_file(d / f"s{k}.onnx"), "inputs": i, "outputs": o,
             "est_ms": 0.5, "source": "simulated" if k == 1 else "estimate"} for k, (i, o) in enumerate(cuts)]
    doc = {"version": 1, "target": "t", "objective": "latency", "outputs": ["y"], "segments": segs}
    path = d / "placement.json"
    path.write_text(json.dumps(doc))
    chain = load_chain(path)
    assert chain.sources == ["measured", "simulated", "measured"] and chain.specs[1].runtime == "onnxruntime"
    np.testing.assert_allclose(chain.run({"x": x})[0], ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    for change, message in ((lambda s: s.__setitem__("sha256", "0" * 64), "does not match its SHA-256"),
                            (lambda s: s.__setitem__("file", "../s0.onnx"), "not inside the placement folder")):
        bad = json.loads(json.dumps(doc))
        change(bad["segments"][0])
        path.write_text(json.dumps(bad))
        with pytest.raises(EdgekilnError, match=message):
            load_chain(path)
    path.write_text(json.dumps({**doc, "version": 2}))
    with pytest.raises(EdgekilnError, match="placement version 2 is not supported"):
        load_chain(path)
