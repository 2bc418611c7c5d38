"""Model intake: every accepted form loads, every bad input gets one line naming the problem."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekiln.errors import EdgekilnError
from edgekiln.models.intake import load_model, parse_shapes
from edgekiln.testing.tiny import tiny_conv_onnx


def _relu_model(path, dims, op="Relu"):
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"], name="n1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


def test_onnx_file_loads_with_batch_one(tmp_path):
    art = load_model(tiny_conv_onnx(tmp_path / "m.onnx"))
    assert (art.kind, art.input_name, art.input_shape) == ("onnx", "input", (1, 1, 8, 8))


@pytest.mark.parametrize("make,expected", [
    (lambda d: d / "missing.onnx", "missing.onnx: file not found"),
    (lambda d: (d / "text.onnx").write_text("hello, not a model") and d / "text.onnx", "not a valid ONNX model"),
    (lambda d: (d / "empty.onnx").write_bytes(b"") or d / "empty.onnx", "empty file"),
    (lambda d: _relu_model(d / "foo.onnx", [1, 4], op="FooBar"), "unsupported op 'FooBar' (node 'n1')"),
    (lambda d: _relu_model(d / "dyn.onnx", ["N", "C"]), "has dynamic shape ['?', '?']; give a shape"),
])
def test_bad_inputs_name_the_problem(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(EdgekilnError) as err:
        load_model(path)
    assert expected in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_onnx_is_reported(tmp_path):
    good = tiny_conv_onnx(tmp_path / "good.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(EdgekilnError, match=r"cut.onnx: not a valid ONNX model \(truncated or corrupt\?\)"):
        load_model(tmp_path / "cut.onnx")


def test_unknown_input_name_lists_the_real_ones(tmp_path):
    path = tiny_conv_onnx(tmp_path / "m.onnx")
    with pytest.raises(EdgekilnError, match="unknown input name 'image'; the model's inputs are: input"):
        load_model(path, input_shapes={"image": (1, 1, 8, 8)})


def test_given_shape_must_agree_with_fixed_dims(tmp_path):
    path = tiny_conv_onnx(tmp_path / "m.onnx")
    with pytest.raises(EdgekilnError, match="dimension 2 is 8, the given shape says 9"):
        load_model(path, input_shapes=(1, 1, 9, 8))
    assert load_model(path, input_shapes=(4, 1, 8, 8)).input_shape == (4, 1, 8, 8)


def test_torch_factory_file_is_exported_and_verified(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * 6 * 6, 3))
    """))
    art = load_model(f"{src}:build", input_shapes=(1, 1, 8, 8), work_dir=tmp_path / "w")
    assert art.kind == "onnx" and art.path.is_file() and art.torch.factory == f"{src}:build"
    err = art.provenance[0]["max_abs_error"]
    assert err < 1e-4, f"ONNX vs torch max abs error {err} >= 1e-4"


def test_torch_factory_without_shape_is_an_error(tmp_path):
    src = tmp_path / "net.py"
    src.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    with pytest.raises(EdgekilnError, match="needs an input shape"):
        load_model(f"{src}:build", work_dir=tmp_path / "w")


def test_state_dict_passed_as_model_says_how_to_load_it(tmp_path):
    import torch

    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(EdgekilnError, match="is a state_dict, not a model; give the architecture as file.py:factory"):
        load_model(tmp_path / "w.pt", input_shapes=(1, 4))


def test_torchscript_file_loads(tmp_path):
    import torch

    torch.manual_seed(0)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    scripted.save(str(tmp_path / "m.pt"))
    art = load_model(tmp_path / "m.pt", input_shapes=(1, 4), work_dir=tmp_path / "w")
    assert art.input_shape == (1, 4)


def test_torch_export_program_loads_and_matches_torch(tmp_path):
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    x = torch.randn(1, 1, 8, 8)
    torch.export.save(torch.export.export(net.eval(), (x,)), str(tmp_path / "m.pt2"))
    art = load_model(tmp_path / "m.pt2", input_shapes=(1, 1, 8, 8), work_dir=tmp_path / "w")
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    err = float(np.abs(got - net(x).detach().numpy()).max())
    assert err < 1e-4, f"ONNX from .pt2 differs from torch by {err:.3g} (threshold 1e-4)"


def test_file_that_is_not_a_torch_export_program_names_it(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(EdgekilnError, match=r"bad.pt2: not a torch.export program"):
        load_model(tmp_path / "bad.pt2", input_shapes=(1, 4), work_dir=tmp_path / "w")


def test_state_dict_that_does_not_match_names_the_file(tmp_path):
    import torch

    src = tmp_path / "net.py"
    src.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    torch.save(torch.nn.Linear(5, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(EdgekilnError, match=r"w.pt: does not match the model from .*net.py:build"):
        load_model(f"{src}:build", weights=tmp_path / "w.pt", input_shapes=(1, 4), work_dir=tmp_path / "o")


@pytest.mark.parametrize("values,expected", [
    (["1,1,28,28"], (1, 1, 28, 28)),
    (["1x1x28x28"], (1, 1, 28, 28)),
    (["input=1,3,8,8"], {"input": (1, 3, 8, 8)}),
    (["input:1,3,8,8"], {"input": (1, 3, 8, 8)}),          # the old NAME:dims spelling
    (["a=1,2", "b=1,3"], {"a": (1, 2), "b": (1, 3)}),
    (["a:1,2;b:1,3"], {"a": (1, 2), "b": (1, 3)}),          # the old one-string form
    (["sr="], {"sr": ()}),                                  # a scalar input
    ([], None),
])
def test_parse_shapes(values, expected):
    assert parse_shapes(values) == expected


@pytest.mark.parametrize("values,expected", [
    (["1,x,2"], "expected integers"),
    (["0,3"], "positive integers"),
    (["1,2", "3,4"], "name each input"),
    (["1,2", "aux=1,4"], "name each input"),
    (["a=1", "a=2"], "given twice"),
    (["=1,2"], "input name before '=' is empty"),
])
def test_parse_shapes_rejects(values, expected):
    with pytest.raises(EdgekilnError, match=expected):
        parse_shapes(values)


def test_run_folder_without_report_is_rejected(tmp_path):
    with pytest.raises(EdgekilnError, match="not an edgekiln run folder"):
        load_model(tmp_path)


def test_onnx_model_runs_in_onnxruntime_after_intake(tmp_path):
    import onnxruntime as ort

    art = load_model(tiny_conv_onnx(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.zeros(art.input_shape, np.float32)})[0]
    assert out.shape == (1, 10)
