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
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, option, provenance_record


@dataclass(frozen=True, kw_only=True)
class DistillConfig(PassConfig):
    student: str = option("self", "Factory spec of the student (module:factory, file.py:factory), or 'self' "
                                  "(a pruned model: the model before pruning teaches it).")
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    temperature: float = option(4.0, "Softmax temperature of the soft targets.")
    alpha: float = option(0.7, "Weight of the soft-target loss (1 - alpha: hard labels).")
    epochs: int = option(8, "Training epochs.")
    lr: float = option(2e-3, "Learning rate.")
    mode: str = option("logits", "logits (classifiers) | embedding (match the outputs).")
    embedding_loss: str = option("cosine", "embedding mode: cosine | mse.")
    hint_student_layer: str = option("", "Student layer for a feature hint (module name).")
    hint_teacher_layer: str = option("", "Teacher layer the hint matches (MSE through a 1x1 adapter).")
    hint_weight: float = option(1.0, "Weight of the feature-hint loss.")
    augment: bool = option(False, "Small random affine transforms (images).")

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 <= self.alpha <= 1 or self.epochs < 1:
            raise ValueError("temperature must be > 0, alpha in [0, 1], epochs >= 1")
        if self.mode not in ("logits", "embedding"):
            raise ValueError("mode must be logits or embedding")
        if self.embedding_loss not in ("cosine", "mse"):
            raise ValueError("embedding_loss must be cosine or mse")
        if bool(self.hint_student_layer) != bool(self.hint_teacher_layer) or self.hint_weight < 0:
            raise ValueError("a hint needs both hint_student_layer and hint_teacher_layer, and hint_weight >= 0")

    def __hash__(self) -> int:
        return hash((self.student, tuple(sorted(self.student_kwargs.items())), self.temperature, self.alpha,
                     self.epochs, self.lr, self.mode, self.embedding_loss, self.hint_student_layer,
                     self.hint_teacher_layer, self.hint_weight, self.augment))


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
    import numpy as np
    import torch

    from edgekiln.compress.kd import DistillObjective, Hint
    from edgekiln.execution.feeds import load_npz
    from edgekiln.fileio import atomic_write_bytes
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
    if "y" not in data and config.mode == "logits":
        raise EdgekilnError(f"{path}: distilling a classifier needs labels 'y' (or use mode embedding)")
    labels = data["y"] if "y" in data else np.zeros(len(data["x"]), np.int64)   # embedding mode ignores them
    hint = Hint(config.hint_student_layer, config.hint_teacher_layer, config.hint_weight) \
        if config.hint_student_layer else None
    objective = DistillObjective(teacher, temperature=config.temperature, alpha=config.alpha, mode=config.mode,
                                 embedding_kind=config.embedding_loss, hint=hint, student=student,
                                 example=torch.from_numpy(np.ascontiguousarray(data["x"][:2], np.float32)))
    try:
        history = train_classifier(objective.trainable(student), data["x"], labels, epochs=config.epochs, lr=config.lr, seed=ctx.seed,
                                   quiet=ctx.quiet, loss_fn=objective, augment=config.augment,
                                   description="distill" if config.alpha else "train (no KD)")
    finally:
        objective.close()
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
                               teacher_params=sum(p.numel() for p in teacher.parameters()),
                               history=[{k: e.get(k) for k in ("epoch", "loss", "accuracy", "seconds")}
                                        for e in history])
    return artifact.with_pass(kind=ONNX_FLOAT, path=work / "model.onnx", record=record, torch=new_source)


def resolve_student(name: str) -> str:
    """A zoo builder name (``ds_cnn``) becomes its factory spec; specs and ``self`` pass through."""
    from edgekiln.models.torch_source import is_factory_spec
    from edgekiln.models.zoo import BUILDERS

    if name == "self" or is_factory_spec(name):
        return name
    if name in BUILDERS:
        fn = BUILDERS[name]
        return f"{fn.__module__}:{fn.__name__}"
    raise EdgekilnError(f"unknown student '{name}': give a zoo builder ({', '.join(BUILDERS)}), "
                        "module:factory, file.py:factory or self")


def parse_student_args(items: list[str]) -> dict[str, Any]:
    """``["channels=32", "width_mult=0.5", "cell=gru"]`` -> typed kwargs (int, float, bool or str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise EdgekilnError(f"--student-arg '{item}': expected key=value")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw in ("true", "false"):
            value = raw == "true"
        out[key] = value
    return out


SPEC = PassSpec(name="distill", config_type=DistillConfig, run=run, consumes=frozenset({ONNX_FLOAT}),
                produces=ONNX_FLOAT, summary="knowledge distillation from the current model into a student",
                needs_torch_source=True)
