"""KD beyond the logits: temperature behaviour, embedding (cosine/MSE) mode, the feature hint and
its adapter's life cycle, and the distill pass's options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgekiln.compress.kd import DistillObjective, Hint, embedding_loss, hint_loss, kd_loss
from edgekiln.errors import EdgekilnError


def test_alpha_one_is_pure_soft_targets_and_temperature_softens_them():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([2])
    for temp in (1.0, 3.0):
        ps = [math.exp(v / temp) for v in (2.0, 0.0, -1.0)]
        pt = [math.exp(v / temp) for v in (0.0, 1.0, 0.0)]
        ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
        kl = sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
        got = kd_loss(s, t, y, temperature=temp, alpha=1.0).item()
        assert got == pytest.approx(temp * temp * kl, rel=1e-6), f"T={temp}: {got} vs hand {temp * temp * kl}"
    ce = -math.log(math.exp(-1.0) / (math.exp(2.0) + 1 + math.exp(-1.0)))
    assert kd_loss(s, t, y, temperature=5.0, alpha=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_embedding_mse_and_unknown_kind():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert embedding_loss(a, b, "mse").item() == pytest.approx((1 + 4) / 2)
    with pytest.raises(EdgekilnError, match="cosine or mse"):
        embedding_loss(a, b, "l1")


def test_hint_loss_adapts_channels_and_pools_the_teacher():
    s = torch.ones(1, 2, 2, 2)
    t = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    adapter = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        adapter.weight.fill_(0.5)       # adapted student = 1.0 everywhere
    pooled = torch.tensor([[2.5, 4.5], [10.5, 12.5]])   # 2x2 means of the 4x4 teacher map
    expected = float(((pooled - 1.0) ** 2).mean())
    assert hint_loss(s, t, adapter).item() == pytest.approx(expected)
    with pytest.raises(EdgekilnError, match="do not match"):
        hint_loss(torch.ones(1, 3, 2, 2), t)


def _nets():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 3))
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 3))
    return teacher, student


def test_hint_objective_trains_an_adapter_and_leaves_the_student_clean():
    teacher, student = _nets()
    keys = set(student.state_dict())
    x, y = torch.randn(6, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    obj = DistillObjective(teacher, temperature=2.0, alpha=0.5, hint=Hint("1", "1", weight=2.0), student=student,
                           example=x[:2])
    adapter = obj.adapter
    assert isinstance(adapter, nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (4, 8)
    trainable = obj.trainable(student)
    assert {id(p) for p in adapter.parameters()} <= {id(p) for p in trainable.parameters()}
    loss, logits = obj(trainable, x, y)
    plain = kd_loss(logits, teacher(x), y, temperature=2.0, alpha=0.5)
    hint = hint_loss(student[1](student[0](x)), teacher[1](teacher[0](x)), adapter)
    assert loss.item() == pytest.approx((plain + 2.0 * hint).item(), rel=1e-5)
    loss.backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters()), "the teacher must stay frozen"
    obj.close()
    assert set(student.state_dict()) == keys and student(x).shape == (6, 3)
    assert len(student[1]._forward_hooks) == 0, "close() must remove the feature hooks"
    with pytest.raises(EdgekilnError, match="student has no layer 'nope'"):
        DistillObjective(teacher, hint=Hint("nope", "1"), student=student, example=x[:2])


def test_distill_pass_embedding_mode_and_config_checks(tmp_path):
    import numpy as np

    from edgekiln.execution.specs import TensorSpec
    from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact, TorchSource
    from edgekiln.models.metrics import evaluate
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.distill import DistillConfig, parse_student_args, resolve_student
    from edgekiln.passes.distill import run as distill
    from edgekiln.testing.tiny import tiny_torch_cnn

    teacher = tiny_torch_cnn(num_classes=8)    # seeded; its 8 outputs play the embedding
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    export_to_onnx(teacher, (1, 1, 8, 8), tmp_path / "t.onnx")
    art = ModelArtifact(kind=ONNX_FLOAT, path=tmp_path / "t.onnx", inputs=(TensorSpec("input", (1, 1, 8, 8)),),
                        torch=TorchSource(factory="edgekiln.testing.tiny:tiny_torch_cnn",
                                          factory_kwargs={"num_classes": 8}, state_dict=tmp_path / "t.pt"))
    x = np.random.default_rng(0).standard_normal((256, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x)                       # no labels: embedding mode needs none
    np.savez(tmp_path / "eval.npz", x=x[:64])
    cfg = DistillConfig(student="edgekiln.models.zoo:ds_cnn",
                        student_kwargs={"channels": 8, "blocks": 1, "input_size": 8, "num_classes": 8},
                        mode="embedding", embedding_loss="cosine", epochs=15, lr=1e-2)
    out = distill(art, cfg, PassContext(work_dir=tmp_path / "w", train_path=tmp_path / "train.npz", quiet=True))
    cos = evaluate(out.path, tmp_path / "eval.npz", "cosine", reference_path=tmp_path / "t.onnx")
    assert cos >= 0.9, f"student-teacher embedding cosine {cos:.3f} < 0.9 after 15 epochs (seed 0)"
    with pytest.raises(EdgekilnError, match="needs labels 'y'"):
        distill(art, DistillConfig(student=cfg.student, student_kwargs=cfg.student_kwargs, epochs=1),
                PassContext(work_dir=tmp_path / "w2", train_path=tmp_path / "train.npz", quiet=True))
    with pytest.raises(ValueError, match="needs both"):
        DistillConfig(hint_student_layer="3")
    assert resolve_student("mobilenet_v1_style") == "edgekiln.models.zoo_light:mobilenet_v1_style"
    assert parse_student_args(["channels=32", "width_mult=0.5", "cell=gru"]) == \
        {"channels": 32, "width_mult": 0.5, "cell": "gru"}
    with pytest.raises(EdgekilnError, match="unknown student 'resnet'"):
        resolve_student("resnet")
