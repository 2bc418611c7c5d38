"""The KD loss against a hand computation, and the distill pass end to end."""

from __future__ import annotations

import math

import pytest
import torch

from edgekiln.compress.kd import embedding_loss, kd_loss


def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.5
    # softmax(s/T) = softmax([0.5, 0]) ; softmax(t/T) = softmax([0, 0.5])
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    ce = -math.log(math.exp(1) / (math.exp(1) + 1))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_loss(s, t, y, temperature=T, alpha=alpha).item() == pytest.approx(expected, rel=1e-6)


def test_embedding_loss_is_zero_for_identical_directions():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    assert embedding_loss(a, 2 * a).item() == pytest.approx(0.0, abs=1e-7)
    assert embedding_loss(a, -a).item() == pytest.approx(2.0)


def test_distill_pass_trains_a_smaller_student(tmp_path):
    from edgekiln.models.examples import train_example
    from edgekiln.models.intake import load_model, run_folder_data
    from edgekiln.models.metrics import evaluate
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.distill import DistillConfig
    from edgekiln.passes.distill import run as distill

    train_example("digits", tmp_path / "d", quiet=True)
    art, data = load_model(tmp_path / "d"), run_folder_data(tmp_path / "d")
    cfg = DistillConfig(student="edgekiln.testing.tiny:tiny_torch_cnn", epochs=20, lr=5e-3)
    out = distill(art, cfg, PassContext(work_dir=tmp_path / "w", train_path=data["train"], quiet=True))
    rec = out.provenance[-1]
    assert rec["student_params"] < rec["teacher_params"]
    acc = evaluate(out.path, data["eval"])
    assert acc >= 0.8, f"distilled student accuracy {acc:.4f} < 0.8 (seed 0)"
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
