"""The intake on models users bring: IR versions newer than onnxruntime reads, dynamic and
Paddle-style dimensions, several inputs of several dtypes, external weights, control flow."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.errors import EdgekilnError
from edgekiln.execution.specs import TensorSpec
from edgekiln.models.artifact import ModelArtifact
from edgekiln.models.intake import load_model

vi = helper.make_tensor_value_info


def _save(path, nodes, inputs, outputs, inits=(), opset=None):
    """Saved with the installed onnx's defaults (IR version and, without ``opset``, the opset)."""
    kw = {"opset_imports": [helper.make_opsetid("", opset)]} if opset else {}
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), **kw)
    onnx.save(model, str(path))
    return path


def _weight(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _run(art, feeds):
    from edgekiln.execution.ort import ort_session

    return ort_session(art.path).run(None, feeds)[0]


def test_default_onnx_save_is_lowered_to_what_onnxruntime_reads(tmp_path):
    from edgekiln.execution.ort import max_ir_version

    path = _save(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [1, 4])],
                 [vi("y", TensorProto.FLOAT, [1, 4])])
    written = onnx.load(str(path)).ir_version
    art = load_model(path, work_dir=tmp_path / "w")
    if written <= max_ir_version():
        pytest.skip(f"onnx {onnx.__version__} writes IR {written}, which onnxruntime reads: nothing to lower")
    assert art.path.parent == tmp_path / "w" and onnx.load(str(art.path)).ir_version == max_ir_version()
    record = art.provenance[-1]
    assert record["pass"] == "intake" and record["ir_version"] == [written, max_ir_version()], record
    y = _run(art, {"x": np.array([[-1, 2, -3, 4]], np.float32)})
    assert y.tolist() == [[0, 2, 0, 4]]


def test_ir_that_cannot_be_lowered_says_why_in_one_line(tmp_path):
    import onnxruntime

    from edgekiln.execution.ort import max_opset_version

    newest = onnx.defs.onnx_opset_version()
    if onnx.defs.get_schema("Cast", newest, "").since_version != newest or max_opset_version() >= newest:
        pytest.skip(f"onnx {onnx.__version__} / onnxruntime {onnxruntime.__version__}: no op changed in the newest opset")
    path = _save(tmp_path / "c.onnx", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT32)],
                 [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.INT32, [1, 4])])
    with pytest.raises(EdgekilnError) as err:
        load_model(path, work_dir=tmp_path / "w")
    text = str(err.value)
    assert "c.onnx: uses ai.onnx opset" in text and "op 'Cast' changed after it" in text and "\n" not in text, text


def test_paddle_minus_one_dims_accept_a_given_shape(tmp_path):
    path = _save(tmp_path / "p.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                 [vi("x", TensorProto.FLOAT, [-1, 3, -1, -1])], [vi("y", TensorProto.FLOAT, [-1, 3, -1, -1])], opset=17)
    assert load_model(path, input_shapes=(1, 3, 48, 192)).input_shape == (1, 3, 48, 192)
    with pytest.raises(EdgekilnError, match="input 'x' dimension 1 is 3, the given shape says 4"):
        load_model(path, input_shapes=(1, 4, 48, 192))


def test_dynamic_dims_come_from_the_data_then_the_given_shape_wins(tmp_path):
    path = _save(tmp_path / "d.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                 [vi("x", TensorProto.FLOAT, ["N", 3, "H", "W"])], [vi("y", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                 opset=17)
    np.savez(tmp_path / "calib.npz", x=np.zeros((5, 3, 32, 40), np.float32))
    art = load_model(path, data={"calib": tmp_path / "calib.npz"})
    assert art.inputs == (TensorSpec("x", (1, 3, 32, 40)),) and art.data == {"calib": tmp_path / "calib.npz"}
    assert load_model(path, input_shapes={"x": (1, 3, 16, 16)}, data={"calib": tmp_path / "calib.npz"}).input_shape \
        == (1, 3, 16, 16)
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 4, 32, 40), np.float32))
    with pytest.raises(EdgekilnError, match=r"dimension 1 is 3, but .*bad.npz \('x'\) has 4"):
        load_model(path, data={"calib": tmp_path / "bad.npz"})


def _multi_input(path):
    """image (float, dynamic H/W), tokens and mask (int64 sharing 'seq'), raw bytes, a scalar rate."""
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0),
             helper.make_node("Cast", ["tokens"], ["tf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["tf", "mf"], ["tm"]),
             helper.make_node("ReduceSum", ["tm"], ["ts"], keepdims=0),
             helper.make_node("Cast", ["raw"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["rf"], ["rs"], keepdims=0),
             helper.make_node("Cast", ["rate"], ["sr"], to=TensorProto.FLOAT),
             helper.make_node("Sum", ["m", "ts", "rs", "sr"], ["y"])]
    inputs = [vi("image", TensorProto.FLOAT, [1, 3, "h", "w"]), vi("tokens", TensorProto.INT64, [1, "seq"]),
              vi("mask", TensorProto.INT64, [1, "seq"]), vi("raw", TensorProto.UINT8, [16]),
              vi("rate", TensorProto.INT64, [])]
    return _save(path, nodes, inputs, [vi("y", TensorProto.FLOAT, [])], opset=17)


def test_several_inputs_of_several_dtypes_are_all_resolved(tmp_path):
    path = _multi_input(tmp_path / "multi.onnx")
    art = load_model(path, input_shapes={"image": (1, 3, 8, 8), "tokens": (1, 7)}, work_dir=tmp_path / "w")
    assert art.inputs == (TensorSpec("image", (1, 3, 8, 8)), TensorSpec("tokens", (1, 7), "int64"),
                          TensorSpec("mask", (1, 7), "int64"), TensorSpec("raw", (16,), "uint8"),
                          TensorSpec("rate", (), "int64")), art.inputs
    from edgekiln.execution.feeds import random_feeds

    feeds = random_feeds(art.inputs, seed=0)
    want = feeds["image"].mean() + (feeds["tokens"] * feeds["mask"]).sum() + feeds["raw"].astype(np.float32).sum() \
        + float(feeds["rate"])
    got = float(_run(art, feeds))
    assert abs(got - want) <= 1e-3 * abs(want), (got, want)


def test_several_inputs_take_shapes_from_data_named_like_them(tmp_path):
    path = _multi_input(tmp_path / "multi.onnx")
    np.savez(tmp_path / "eval.npz", image=np.zeros((2, 3, 5, 6), np.float32), mask=np.ones((2, 9), np.int64))
    art = load_model(path, data={"eval": tmp_path / "eval.npz"})
    assert {s.name: s.shape for s in art.inputs} == {"image": (1, 3, 5, 6), "tokens": (1, 9), "mask": (1, 9),
                                                      "raw": (16,), "rate": ()}


def test_unknown_input_name_lists_every_input(tmp_path):
    with pytest.raises(EdgekilnError, match="unknown input name 'aux'; the model's inputs are: image, tokens, mask, "
                                            "raw, rate"):
        load_model(_multi_input(tmp_path / "multi.onnx"), input_shapes={"aux": (1, 4)})


def _external(tmp_path):
    w = _weight("W", (64, 64))
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                                                [vi("x", TensorProto.FLOAT, [1, 64])], [vi("y", TensorProto.FLOAT, [1, 64])],
                                                [w]))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    return tmp_path / "ext.onnx", numpy_helper.to_array(w)


def test_external_data_loads_is_checked_and_runs(tmp_path):
    path, w = _external(tmp_path)
    assert (tmp_path / "ext.onnx.data").stat().st_size == 64 * 64 * 4
    art = load_model(path, work_dir=tmp_path / "w")
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    err = float(np.abs(_run(art, {"x": x}) - x @ w).max())
    assert err < 1e-4, f"max abs error {err} >= 1e-4"
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(EdgekilnError, match=r"ext.onnx: its weights file 'ext.onnx.data' is not beside the model"):
        load_model(path, work_dir=tmp_path / "w2")


def _loop_if_scan(path):
    """If (then: MatMul 4x4, else: Neg) -> Loop x3 (MatMul 4x4) -> Scan over 5 rows (MatMul 4x4)."""
    then = helper.make_graph([helper.make_node("MatMul", ["x", "Wt"], ["yt"])], "then", [],
                             [vi("yt", TensorProto.FLOAT, [1, 4])], [_weight("Wt", (4, 4), 1)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["ye"])], "else", [], [vi("ye", TensorProto.FLOAT, [1, 4])])
    body = helper.make_graph([helper.make_node("MatMul", ["l_in", "Wl"], ["l_out"]),
                              helper.make_node("Identity", ["c_in"], ["c_out"])], "loop",
                             [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []),
                              vi("l_in", TensorProto.FLOAT, [1, 4])],
                             [vi("c_out", TensorProto.BOOL, []), vi("l_out", TensorProto.FLOAT, [1, 4])],
                             [_weight("Wl", (4, 4), 2)])
    scan = helper.make_graph([helper.make_node("MatMul", ["row", "Ws"], ["r"]), helper.make_node("Add", ["acc", "r"], ["acc2"])],
                             "scan", [vi("acc", TensorProto.FLOAT, [1, 4]), vi("row", TensorProto.FLOAT, [1, 4])],
                             [vi("acc2", TensorProto.FLOAT, [1, 4])], [_weight("Ws", (4, 4), 3)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y0"], then_branch=then, else_branch=other),
             helper.make_node("Loop", ["trips", "true", "y0"], ["y1"], body=body),
             helper.make_node("Unsqueeze", ["y1", "axis0"], ["rows0"]),
             helper.make_node("Expand", ["rows0", "five"], ["rows"]),
             helper.make_node("Scan", ["y1", "rows"], ["y"], body=scan, num_scan_inputs=1)]
    inits = [numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "true"), numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([5, 1, 4], np.int64), "five")]
    return _save(path, nodes, [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 4])], inits, opset=17)


def test_if_loop_scan_load_and_their_bodies_are_counted(tmp_path):
    from edgekiln.models.analysis import analyze

    art = load_model(_loop_if_scan(tmp_path / "cf.onnx"))
    x = np.array([[1, 2, 3, 4]], np.float32)
    assert _run(art, {"x": x}).shape == (1, 4)
    a = analyze(art.path, art.input_shapes)
    rows = {layer.op: (layer.params, layer.macs) for layer in a.layers}
    # If: the larger branch (MatMul 1x4x4 = 16 MACs); Loop: 3 trips x 16; Scan: 5 rows x 16.
    assert (rows["If"], rows["Loop"], rows["Scan"]) == ((16, 16), (16, 48), (16, 80)), rows
    assert a.macs == 16 + 48 + 80, a.macs
    assert a.params == 3 * 16 + 1, a.params   # three 4x4 bodies + the 'zero' Greater compares with


def test_torch_factory_takes_its_shape_from_the_data(tmp_path):
    src = tmp_path / "net.py"
    src.write_text("import torch\ndef build():\n    torch.manual_seed(0)\n"
                   "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))\n")
    np.savez(tmp_path / "calib.npz", x=np.zeros((3, 3, 4), np.float32))
    art = load_model(f"{src}:build", data={"calib": tmp_path / "calib.npz"}, work_dir=tmp_path / "w")
    assert art.inputs == (TensorSpec("input", (1, 3, 4)),)


def test_artifact_round_trips_through_a_dict(tmp_path):
    art = load_model(_multi_input(tmp_path / "multi.onnx"), input_shapes={"image": (1, 3, 8, 8), "tokens": (1, 7)})
    again = ModelArtifact.from_dict(art.to_dict())
    assert again == art and again.input_name == "image" and again.input_shape == (1, 3, 8, 8)
