"""Structured pruning respects dependencies; unstructured pruning is exact; rebuild is safe."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgekiln.compress.structured import count_macs, prune_channels, rebuild
from edgekiln.compress.unstructured import magnitude_prune, sparse_bytes
from edgekiln.models.torch_export import export_to_onnx


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.body(h))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 5, padding=2)
        self.fuse = nn.Conv2d(16, 16, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.fuse(torch.cat([self.a(x), self.b(x)], dim=1)))


def _depthwise():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, 10))


@pytest.mark.parametrize("build", [Residual, Concat, _depthwise], ids=["residual", "concat", "depthwise"])
def test_structured_pruning_keeps_shapes_shrinks_and_runs_in_onnxruntime(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    shape = (1, 1, 12, 12)
    macs, params = count_macs(model, shape), sum(p.numel() for p in model.parameters())
    prune_channels(model, shape, ratio=0.5)
    model.eval()
    assert model(torch.zeros(shape)).shape == (1, 10)
    new_macs, new_params = count_macs(model, shape), sum(p.numel() for p in model.parameters())
    assert new_macs < 0.6 * macs and new_params < 0.7 * params, f"MACs {macs}->{new_macs}, params {params}->{new_params}"
    export_to_onnx(model, shape, tmp_path / "p.onnx")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_depthwise_groups_follow_their_channels():
    torch.manual_seed(0)
    model = _depthwise().eval()
    prune_channels(model, (1, 1, 12, 12), ratio=0.5)
    dw = model[2]
    assert dw.groups == dw.in_channels == dw.out_channels == model[0].out_channels


def test_rebuild_restores_a_pruned_model_from_its_state_dict(tmp_path):
    from edgekiln.models import zoo

    torch.manual_seed(0)
    model = zoo.mobilenet_v2_style().eval()
    prune_channels(model, (1, 1, 28, 28), ratio=0.4)
    torch.save(model.state_dict(), tmp_path / "p.pt")
    again = rebuild("edgekiln.models.zoo:mobilenet_v2_style", str(tmp_path / "p.pt"))
    again.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x))


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_unstructured_reaches_the_exact_ratio_and_compresses(scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    sizes = sparse_bytes(model)
    magnitude_prune(model, 0.8, scope=scope)
    weights = torch.cat([model[0].weight.reshape(-1), model[3].weight.reshape(-1)])
    zeros = int((weights == 0).sum())
    expected = round(0.8 * weights.numel()) if scope == "global" else \
        round(0.8 * model[0].weight.numel()) + round(0.8 * model[3].weight.numel())
    assert zeros == expected, f"{zeros} zeros, expected {expected}"
    after = sparse_bytes(model)
    assert after["dense_bytes"] == sizes["dense_bytes"]
    assert after["sparse_compressed_bytes"] < 0.5 * after["dense_bytes"]


def test_prune_pass_on_the_digits_example(tmp_path):
    from edgekiln.models.examples import train_example
    from edgekiln.models.intake import load_model, run_folder_data
    from edgekiln.models.metrics import evaluate
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.prune import PruneConfig, run

    train_example("digits", tmp_path / "d", quiet=True)
    art, data = load_model(tmp_path / "d"), run_folder_data(tmp_path / "d")
    before = evaluate(art.path, data["eval"])
    out = run(art, PruneConfig(ratio=0.5, finetune_epochs=10), PassContext(
        work_dir=tmp_path / "w", train_path=data["train"], calib_path=data["calib"], quiet=True))
    rec = out.provenance[-1]
    assert rec["macs"] < 0.5 * rec["macs_before"], rec
    acc = evaluate(out.path, data["eval"])
    assert acc >= before - 0.05, f"pruned digits accuracy {acc:.4f} vs {before:.4f} (seed 0)"
    assert out.torch.factory == "edgekiln.compress.structured:rebuild"
