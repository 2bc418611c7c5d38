"""Knowledge distillation losses (Hinton et al. 2015) for classifiers and embedding models.

``kd_loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``: the T^2
factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
For embedding models: ``1 - cos(s, t)`` (or MSE) between student and teacher embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 4.0, alpha: float = 0.7) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()


def distill_loss_fn(teacher: nn.Module, *, temperature: float, alpha: float, mode: str = "logits"
                    ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``loss_fn(model, xb, yb)`` for :func:`edgekiln.models.training.train_classifier`."""
    teacher.eval()

    def loss(student: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(xb)
        s = student(xb)
        if mode == "embedding":
            return embedding_loss(s, t)
        return kd_loss(s, t, yb, temperature=temperature, alpha=alpha)

    return loss
