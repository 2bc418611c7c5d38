"""Every bad input named in the foundation issue: one line naming the problem, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from edgekiln.testing.tiny import tiny_conv_onnx


def _model(path, dims, op="Relu"):
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"], name="n1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


def _cases(d):
    good = tiny_conv_onnx(d / "good.onnx")
    (d / "cut.onnx").write_bytes(good.read_bytes()[:2000])
    (d / "text.onnx").write_text("not a model at all")
    return [
        (["inspect", str(d / "missing.onnx")], "missing.onnx: file not found"),
        (["inspect", str(d / "text.onnx")], "text.onnx: not a valid ONNX model"),
        (["inspect", str(d / "cut.onnx")], "cut.onnx: not a valid ONNX model (truncated or corrupt?)"),
        (["inspect", str(good), "--input-shape", "image:1,1,8,8"], "unknown input name 'image'"),
        (["inspect", str(_model(d / "op.onnx", [1, 4], "FooBar"))], "unsupported op 'FooBar' (node 'n1')"),
        (["inspect", str(_model(d / "dyn.onnx", ["N", "C"]))], "has dynamic shape ['?', '?']; give a shape"),
        (["fits", str(good), "--target", "toaster"], "unknown target 'toaster'"),
        (["bench", str(good), "--runtime", "tvm"], "unknown runtime 'tvm'"),
    ]


def test_every_bad_input_gets_one_line_and_exit_2(tmp_path):
    for argv, message in _cases(tmp_path):
        out = subprocess.run([sys.executable, "-m", "edgekiln.cli", *argv], capture_output=True, text=True, timeout=120)
        err = out.stderr.strip()
        assert out.returncode == 2, f"{argv}: exit {out.returncode}, stderr {err!r}"
        assert message in err, f"{argv}: {err!r} lacks {message!r}"
        assert "Traceback" not in err and len(err.splitlines()) == 1, f"{argv}: not one line: {err!r}"


def test_debug_shows_the_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgekiln.cli", "--debug", "inspect", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["optimize", "--help"], ["split", "--help"]])
def test_help_works(argv):
    out = subprocess.run([sys.executable, "-m", "edgekiln.cli", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Usage" in out.stdout
