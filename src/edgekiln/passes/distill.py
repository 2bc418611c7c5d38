"""Distill pass: train a student from the current model (the teacher) with soft targets.

``student`` is a factory spec (e.g. ``edgekiln.models.zoo:mnist_cnn`` with ``student_kwargs``),
or ``self``: after pruning, fine-tune the pruned model with KD from the model before pruning.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact, TorchSource
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, provenance_record


@dataclass(frozen=True, kw_only=True)
class DistillConfig(PassConfig):
    student: str = "self"                       # factory spec of the student, or "self"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    temperature: float = 4.0
    alpha: float = 0.7                          # weight of the soft (teacher) loss
    epochs: int = 8
    lr: float = 2e-3
    mode: str = "logits"                        # logits (classifiers) | embedding (cosine to the teacher)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 <= self.alpha <= 1 or self.epochs < 1:
            raise ValueError("temperature must be > 0, alpha in [0, 1], epochs >= 1")
        if self.mode not in ("logits", "embedding"):
            raise ValueError("mode must be logits or embedding")

    def __hash__(self) -> int:
        return hash((self.student, tuple(sorted(self.student_kwargs.items())), self.temperature, self.alpha,
                     self.epochs, self.lr, self.mode))


def _teacher_source(artifact: ModelArtifact, config: DistillConfig) -> TorchSource:
    """The current model is the teacher; with ``student='self'`` after a prune, the teacher is the
    model before pruning (the prune pass records it) and the pruned model is the student."""
    if artifact.torch is None:
        raise EdgekilnError("distill needs the model's PyTorch source")
    if config.student == "self":
        for rec in reversed(artifact.provenance):
            src = rec.get("source_torch")
            if src:
                return TorchSource(factory=src["factory"], factory_kwargs=src.get("factory_kwargs") or {},
                                   state_dict=Path(src["state_dict"]) if src.get("state_dict") else None)
    return artifact.torch


def run(artifact: ModelArtifact, config: DistillConfig, ctx: PassContext) -> ModelArtifact:
    import torch

    from edgekiln.compress.kd import distill_loss_fn
    from edgekiln.fileio import atomic_write_bytes
    from edgekiln.models.metrics import load_npz
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.models.torch_source import build_module, resolve_factory
    from edgekiln.models.training import train_classifier

    teacher = build_module(_teacher_source(artifact, config))
    path = ctx.train_path or ctx.calib_path
    if path is None:
        raise EdgekilnError("distill needs training data (train.npz)")
    data = load_npz(path)
    torch.manual_seed(ctx.seed)
    if config.student == "self":
        student, source = build_module(artifact.torch), artifact.torch
    else:
        student = resolve_factory(config.student)(**config.student_kwargs)
        source = TorchSource(factory=config.student, factory_kwargs=dict(config.student_kwargs))
    train_classifier(student, data["x"], data["y"], epochs=config.epochs, lr=config.lr, seed=ctx.seed, quiet=ctx.quiet,
                     loss_fn=distill_loss_fn(teacher, temperature=config.temperature, alpha=config.alpha,
                                             mode=config.mode), description="distill")
    work = Path(ctx.work_dir)
    buf = io.BytesIO()
    torch.save(student.state_dict(), buf)
    atomic_write_bytes(work / "model.pt", buf.getvalue())
    export_to_onnx(student.eval(), artifact.input_shape, work / "model.onnx", input_name=artifact.input_name,
                   seed=ctx.seed)
    new_source = TorchSource(factory=source.factory, factory_kwargs=dict(source.factory_kwargs),
                             state_dict=work / "model.pt")
    if source.factory == "edgekiln.compress.structured:rebuild":
        new_source = TorchSource(factory=source.factory, factory_kwargs={**source.factory_kwargs,
                                                                          "state_dict": str(work / "model.pt")},
                                 state_dict=work / "model.pt")
    record = provenance_record("distill", config, artifact,
                               student_params=sum(p.numel() for p in student.parameters()),
                               teacher_params=sum(p.numel() for p in teacher.parameters()))
    return artifact.with_pass(kind=ONNX_FLOAT, path=work / "model.onnx", record=record, torch=new_source)


SPEC = PassSpec(name="distill", config_type=DistillConfig, run=run, consumes=frozenset({ONNX_FLOAT}),
                produces=ONNX_FLOAT, summary="knowledge distillation from the current model into a student",
                needs_torch_source=True)
