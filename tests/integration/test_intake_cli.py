"""Issue 19's intake reproductions, end to end through the CLI: models saved with the installed
onnx's defaults, dynamic and Paddle-style dimensions, two inputs, and quantize's scratch files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from cli_run import run_cli as _run
from onnx import TensorProto, helper, numpy_helper

vi = helper.make_tensor_value_info




def _conv_net(path, dims, *, aux=None, seed=0):
    """Conv(3->4, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4->3), any H/W,
    saved with the installed onnx's default IR version and opset. ``aux``: a second input whose
    sum is added to the logits."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], name="fc", transB=1)]
    inputs = [vi("image", TensorProto.FLOAT, dims)]
    out = "logits"
    if aux is not None:
        nodes += [helper.make_node("ReduceSum", ["aux"], ["a"], name="aux_sum", keepdims=0),
                  helper.make_node("Add", ["logits", "a"], ["out"], name="add")]
        inputs.append(vi("aux", TensorProto.FLOAT, aux))
        out = "out"
    onnx.save(helper.make_model(helper.make_graph(nodes, "net", inputs, [vi(out, TensorProto.FLOAT, [dims[0], 3])], inits)),
              str(path))
    return path


def _calib(path, shape, n=16, seed=0):
    np.savez(path, x=np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32))
    return path


def _conv_macs(h, w):
    return 4 * h * w * 3 * 9 + 4 * 3   # conv (4 out ch, pad 1: h*w positions, 3*3*3 taps) + gemm 4x3


def test_default_onnx_save_works_in_inspect_bench_and_quantize(tmp_path, capsys):
    model = _conv_net(tmp_path / "m.onnx", [1, 3, 8, 8])
    assert _run(["inspect", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == _conv_macs(8, 8)
    assert _run(["bench", model, "--runs", 5, "--warmup", 1, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency_ms"]["p50"] > 0
    code = _run(["quantize", model, "--calib", _calib(tmp_path / "c.npz", (3, 8, 8)), "--bench-runs", 5,
                 "--out", tmp_path / "q"])
    assert code == 0, capsys.readouterr().err
    q = onnx.load(str(tmp_path / "q" / "model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 0


def test_torch_dynamic_axes_export_quantizes_with_only_calibration_data(tmp_path, capsys):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(tmp_path / "dyn.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
    calib = _calib(tmp_path / "c.npz", (3, 12, 20))
    code = _run(["quantize", tmp_path / "dyn.onnx", "--calib", calib, "--bench-runs", 5, "--out", tmp_path / "q"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "q" / "model.onnx").is_file()


def test_minus_one_dims_take_the_given_shape_in_inspect(tmp_path, capsys):
    model = _conv_net(tmp_path / "paddle.onnx", [-1, 3, -1, -1])
    assert _run(["inspect", model, "--input-shape", "1,3,48,192", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == {"image": [1, 3, 48, 192]} and data["macs"] == _conv_macs(48, 192), data["macs"]


def test_a_second_input_is_named_on_the_command_line(tmp_path, capsys):
    model = _conv_net(tmp_path / "two.onnx", [1, 3, 8, 8], aux=[1, "k"])
    assert _run(["inspect", model, "--input-shape", "aux=1,4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == {"image": [1, 3, 8, 8], "aux": [1, 4]}
    assert _run(["inspect", model, "--input-shape", "extra=1,4"]) == 2
    err = capsys.readouterr().err
    assert "unknown input name 'extra'; the model's inputs are: image, aux" in err and len(err.strip().splitlines()) == 1


def test_bench_runs_a_dynamic_hw_detector_at_the_given_shape(tmp_path, capsys):
    model = _conv_net(tmp_path / "det.onnx", [1, 3, "H", "W"])
    assert _run(["bench", model, "--runs", 5, "--warmup", 1, "--json"]) == 2
    err = capsys.readouterr().err
    assert "input 'image' has dynamic shape [1, 3, '?', '?']" in err, err
    small = []
    for side in (32, 256):
        assert _run(["bench", model, "--input-shape", f"1,3,{side},{side}", "--runs", 30, "--warmup", 3,
                     "--json"]) == 0
        small.append(json.loads(capsys.readouterr().out)["latency_ms"]["p50"])
    # 64x the pixels: the run at 256x256 must take longer than at 32x32 (it ran at the given shape).
    assert small[1] > 2 * small[0], f"p50 at 32x32 {small[0]:.4f} ms, at 256x256 {small[1]:.4f} ms"


def test_quantize_leaves_nothing_in_the_current_directory(tmp_path, monkeypatch, capsys):
    model = _conv_net(tmp_path / "m.onnx", [1, 3, 8, 8])
    calib = _calib(tmp_path / "c.npz", (3, 8, 8))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert _run(["quantize", model, "--calib", calib, "--bench-runs", 5, "--out", tmp_path / "q"]) == 0
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "cwd", "m.onnx", "q"]


def test_quantize_leaves_nothing_in_the_current_directory_when_preprocessing_fails(tmp_path, monkeypatch, capsys):
    import onnxruntime.quantization.shape_inference as si

    def failing_pre_process(src, dst, **kwargs):
        # What onnxruntime 1.31 does when symbolic shape inference is incomplete
        # (tools/symbolic_shape_infer.py: save 'sym_shape_infer_temp.onnx' with external data, raise).
        with open("sym_shape_infer_temp.onnx", "wb") as f:
            f.write(b"x")
        with open("5f1e7a2c-uuid.data", "wb") as f:
            f.write(b"x")
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(si, "quant_pre_process", failing_pre_process)
    model = _conv_net(tmp_path / "m.onnx", [1, 3, 8, 8])
    calib = _calib(tmp_path / "c.npz", (3, 8, 8))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert _run(["quantize", model, "--calib", calib, "--bench-runs", 5, "--out", tmp_path / "q"]) == 0
    assert sorted(p.name for p in cwd.iterdir()) == []
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 5, 8, 8), np.float32))   # 5 channels: refused
    assert _run(["quantize", model, "--calib", tmp_path / "bad.npz", "--out", tmp_path / "q2"]) == 2
    assert "dimension 1 is 3" in capsys.readouterr().err
    assert sorted(p.name for p in cwd.iterdir()) == []


@pytest.mark.parametrize("values", [["1,3,8,8"], ["image=1,3,8,8"], ["image:1,3,8,8"]])
def test_every_spelling_of_the_input_shape_is_accepted(tmp_path, capsys, values):
    model = _conv_net(tmp_path / "m.onnx", ["N", 3, 8, 8])
    argv = ["inspect", model, "--json"]
    for v in values:
        argv += ["--input-shape", v]
    assert _run(argv) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == {"image": [1, 3, 8, 8]}
