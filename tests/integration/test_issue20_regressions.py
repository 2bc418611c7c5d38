"""Issue 20's "Why" list, each failure reproduced end to end (the others live beside the code they
exercise: magika's Gemm bias and basic-pitch's shared bias in tests/unit/quant/
test_real_model_regressions.py, HardSwish split by pre-processing in tests/unit/quant/test_speed.py,
fp16 and every scheme's artifact in tests/integration/test_artifacts_valid.py, fits at 1 byte per int8
activation in tests/unit/targets/test_fits_precision.py, the C/TFLite ops in tests/golden and tests/integration/test_export_*).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_run import run_cli as _run


def test_batch1_torch_export_quantizes_with_eval(tmp_path, capsys):
    """`torch.onnx.export` with a fixed batch of 1 (the usual export): `quantize --calib --eval` stopped
    with "Got invalid dimensions" because the samples were fed as one batch."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(tmp_path / "b1.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 3, 16, 16)).astype(np.float32)[:, 0]
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "calib.npz", x=x[:24])
    np.savez(tmp_path / "eval.npz", x=x[24:], y=y[24:])
    code = _run(["quantize", tmp_path / "b1.onnx", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
                 "--bench-runs", 5, "--out", tmp_path / "q"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert rep["metric_fp32"] == 1.0 and rep["metric"] is not None, (rep["metric_fp32"], rep["metric"])


@pytest.mark.timed
@pytest.mark.timeout(600)
def test_int8_cnn_is_faster_than_fp32_on_the_best_runtime(tmp_path):
    """7 of 8 real CNNs came out of `quantize` slower than FP32 (MobileNetV3-small 1.9x slower than
    ORT's own int8: HardSwish split, every gate quantized). The int8 model on its fastest runtime must
    beat FP32 on FP32's fastest runtime, timed round-robin in the same loop (seeded random weights)."""
    from edgekiln import api
    from edgekiln.testing.corpus import ensure

    cm = ensure("mobilenetv3_small")
    run = api.quantize(cm.path, "int8", calib=cm.calib, out=tmp_path / "q", bench_runs=60,
                       input_shapes={"input": (1, 3, 224, 224)})
    v = run.report()["speed_verdict"]
    assert v["ratio"] < 1.0, (f"int8 on {v['runtime']} {v['p50']:.3f} ms is {v['ratio']:.2f}x FP32 on "
                              f"{v['fp32_runtime']} {v['fp32_p50']:.3f} ms; threshold < 1.0")


def test_fp16_of_the_crnn_does_not_kill_the_process(tmp_path, capsys):
    """`quantize --scheme fp16` on the CRNN died with SIGSEGV (onnxruntime 1.31 creating a session on
    its fp16 model: a Transpose after a Reshape), found by optimize's fp16 trial. The pass opens the
    fp16 file in a child process first and keeps data movement float32 when that crashes."""
    import onnx

    from edgekiln.testing.corpus import ensure

    cm = ensure("crnn_rec")
    code = _run(["quantize", cm.path, "--scheme", "fp16", "--input-shape", "x=1,3,48,160", "--bench-runs", 5,
                 "--out", tmp_path / "q"])
    assert code == 0, capsys.readouterr().err
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "Cast" in ops and any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), ops
