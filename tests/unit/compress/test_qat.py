"""QAT wrappers: exact weight grid, observer behaviour, and recovery of int8 accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekiln.compress.qat import ActFakeQuant, fold_batchnorm, prepare_qat, strip_qat, weight_fake_quant


def test_weight_grid_is_symmetric_per_channel_and_exact():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3)
    q = weight_fake_quant(w)
    for c in range(3):
        scale = w[c].abs().max().item() / 127.0
        ints = (q[c] / scale).numpy()
        np.testing.assert_allclose(ints, np.round(ints), atol=1e-4)
        assert np.abs(ints).max() <= 127 + 1e-4
        # Same values as rounding half-to-even by hand:
        expected = np.clip(np.round((w[c] / scale).numpy()), -128, 127) * scale
        np.testing.assert_allclose(q[c].numpy(), expected, atol=1e-6)


def test_observer_tracks_then_freezes():
    fq = ActFakeQuant(momentum=0.5, observe_steps=2).train()
    fq(torch.tensor([-1.0, 3.0]))
    fq(torch.tensor([-3.0, 1.0]))
    assert (float(fq.lo), float(fq.hi)) == (-2.0, 2.0)
    fq(torch.tensor([-100.0, 100.0]))  # after observe_steps the range is frozen
    assert (float(fq.lo), float(fq.hi)) == (-2.0, 2.0)


def test_batchnorm_is_folded_and_output_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 1, 6, 6)
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_strip_returns_plain_modules_on_the_grid():
    torch.manual_seed(0)
    model = prepare_qat(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    model.train()(torch.randn(4, 1, 6, 6))
    plain = strip_qat(model)
    assert isinstance(plain[0], nn.Conv2d) and isinstance(plain[3], nn.Linear)
    w = plain[3].weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    ints = (w / scale).numpy()
    np.testing.assert_allclose(ints, np.round(ints), atol=1e-4)


@pytest.mark.slow
def test_qat_recovers_accuracy_lost_to_coarse_activation_quantization():
    """A digits classifier; QAT fine-tuning must not be worse than the PTQ-simulated model."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        opt.step()
    sim = prepare_qat(model).train()
    sim(x[:1400])  # calibrate the observers (post-training quantization, simulated)
    sim.eval()
    ptq = (sim(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    qat = prepare_qat(model, observe_steps=5).train()
    opt = torch.optim.Adam(qat.parameters(), 1e-3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(qat(x[:1400]), y[:1400]).backward()
        opt.step()
    qat.eval()
    qat_acc = (qat(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    assert qat_acc >= ptq - 0.005, f"QAT accuracy {qat_acc:.4f} < simulated PTQ {ptq:.4f} - 0.005 (seed 0)"


@pytest.mark.slow
def test_qat_pass_produces_an_int8_qdq_model_as_accurate_as_ptq(tmp_path):
    import onnx

    from edgekiln.models.examples import train_example
    from edgekiln.models.intake import load_model, run_folder_data
    from edgekiln.models.metrics import evaluate
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.qat import QATConfig
    from edgekiln.passes.qat import run as qat
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    train_example("digits", tmp_path / "d", quiet=True)
    art, data = load_model(tmp_path / "d"), run_folder_data(tmp_path / "d")
    out = qat(art, QATConfig(epochs=3), PassContext(work_dir=tmp_path / "w", train_path=data["train"],
                                                    calib_path=data["calib"], quiet=True))
    ops = [n.op_type for n in onnx.load(str(out.path)).graph.node]
    assert out.kind == "onnx-qdq" and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    ptq = quantize_model(art.path, QuantizeConfig(), tmp_path / "ptq", calib=data["calib"]).path
    acc_qat, acc_ptq = evaluate(out.path, data["eval"]), evaluate(ptq, data["eval"])
    assert acc_qat >= acc_ptq - 0.01, f"QAT {acc_qat:.4f} vs PTQ {acc_ptq:.4f} (seed 0)"
