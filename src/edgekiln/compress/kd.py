"""Knowledge distillation losses (Hinton et al. 2015) for classifiers and embedding models.

``kd_loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``: the T^2
factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
For embedding models: ``1 - cos(s, t)`` (or MSE) between student and teacher embeddings.
Optionally a FitNets-style hint: the MSE between an intermediate student feature map (through a
learned 1x1 adapter when the channel counts differ) and a teacher feature map, added with a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgekiln.errors import EdgekilnError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 4.0, alpha: float = 0.7) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind != "cosine":
        raise EdgekilnError(f"embedding loss must be cosine or mse (got {kind!r})")
    return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, adapter: nn.Module | None = None) -> torch.Tensor:
    """MSE between a (adapted) student feature map and the teacher's, the teacher pooled to the
    student's spatial size when they differ."""
    s = adapter(student_feat) if adapter is not None else student_feat
    t = teacher_feat
    if t.ndim >= 3 and t.shape[2:] != s.shape[2:]:
        t = F.adaptive_avg_pool2d(t, s.shape[2:]) if t.ndim == 4 else F.adaptive_avg_pool1d(t, s.shape[2])
    if s.shape != t.shape:
        raise EdgekilnError(f"hint features do not match: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    return F.mse_loss(s, t)


@dataclass(frozen=True)
class Hint:
    """Match ``student_layer``'s output to ``teacher_layer``'s (module names from ``named_modules``)."""

    student_layer: str
    teacher_layer: str
    weight: float = 1.0


class DistillObjective:
    """A ``loss_fn(model, xb, yb)`` for :func:`edgekiln.models.training.train_classifier`.

    With a :class:`Hint`, forward hooks capture the two feature maps and a 1x1 adapter maps the
    student's channels to the teacher's; train :meth:`trainable` (the student plus the adapter,
    so the optimizer sees both) and call :meth:`close` afterwards to remove the hooks. The
    student's own architecture and state_dict never change.

    >>> t, s = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> loss, logits = DistillObjective(t, temperature=2.0, alpha=0.5)(s, torch.ones(2, 4), torch.tensor([0, 1]))
    >>> logits.shape
    torch.Size([2, 3])
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.7, mode: str = "logits",
                 embedding_kind: str = "cosine", hint: Hint | None = None, student: nn.Module | None = None,
                 example: torch.Tensor | None = None) -> None:
        if mode not in ("logits", "embedding"):
            raise EdgekilnError(f"distillation mode must be logits or embedding (got {mode!r})")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha, self.mode, self.embedding_kind = temperature, alpha, mode, embedding_kind
        self.hint = hint
        self.adapter: nn.Module | None = None
        self._feats: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        if hint is not None:
            if student is None or example is None:
                raise EdgekilnError("a hint loss needs the student and an example input")
            self._install(student, example)

    def trainable(self, student: nn.Module) -> nn.Module:
        """What to hand to the training loop: the student, with the hint adapter when there is one."""
        return student if self.adapter is None else _WithAdapter(student, self.adapter)

    def _install(self, student: nn.Module, example: torch.Tensor) -> None:
        hint = self.hint
        assert hint is not None
        s_mod, t_mod = _module(student, hint.student_layer, "student"), _module(self.teacher, hint.teacher_layer,
                                                                                   "teacher")
        self._hooks = [s_mod.register_forward_hook(lambda _m, _i, o: self._feats.__setitem__("s", o)),
                       t_mod.register_forward_hook(lambda _m, _i, o: self._feats.__setitem__("t", o))]
        with torch.no_grad():
            was = student.training
            student.eval()
            student(example)
            self.teacher(example)
            student.train(was)
        s, t = self._feats["s"], self._feats["t"]
        if s.ndim != t.ndim:
            raise EdgekilnError(f"hint layers have different ranks: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        adapter: nn.Module
        if s.shape[1] == t.shape[1]:
            adapter = nn.Identity()
        elif s.ndim == 4:
            adapter = nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
        elif s.ndim == 3:
            adapter = nn.Conv1d(s.shape[1], t.shape[1], 1, bias=False)
        else:
            adapter = nn.Linear(s.shape[1], t.shape[1], bias=False)
        self.adapter = adapter

    def __call__(self, student: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher(xb)
        s = student(xb)
        if self.mode == "embedding":
            loss = embedding_loss(s, t, self.embedding_kind)
        else:
            loss = kd_loss(s, t, yb, temperature=self.temperature, alpha=self.alpha)
        if self.hint is not None:
            loss = loss + self.hint.weight * hint_loss(self._feats["s"], self._feats["t"], self.adapter)
        return loss, s

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p in self.teacher.parameters():
            p.requires_grad_(True)


class _WithAdapter(nn.Module):
    """The student and the hint adapter in one module for the optimizer; forward is the student's."""

    def __init__(self, student: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.student, self.adapter = student, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def distill_loss_fn(teacher: nn.Module, *, temperature: float, alpha: float, mode: str = "logits",
                    embedding_kind: str = "cosine") -> DistillObjective:
    """A ``loss_fn(model, xb, yb)`` for :func:`edgekiln.models.training.train_classifier`."""
    return DistillObjective(teacher, temperature=temperature, alpha=alpha, mode=mode, embedding_kind=embedding_kind)


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        known = ", ".join(n for n in list(modules)[1:12])
        raise EdgekilnError(f"{role} has no layer '{name}'; layers: {known} ...")
    return modules[name]
