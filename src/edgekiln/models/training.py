"""Training and evaluation loops shared by the examples and the fine-tuning passes.

``loss_fn(model, xb, yb) -> loss`` lets distillation and QAT plug their own loss in.
Deterministic for a seed on the CPU (fixed shuffling generator, fixed init by the caller).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _threads() -> None:
    import os

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2") or 2))


def train_classifier(model: nn.Module, train_x: np.ndarray, train_y: np.ndarray, *, epochs: int,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, quiet: bool = False,
                     augment: bool = False, loss_fn: LossFn | None = None, weight_decay: float = 0.0,
                     description: str = "train") -> list[dict[str, Any]]:
    """Adam with a cosine learning-rate schedule; returns the per-epoch loss and time.

    ``augment`` shifts images by up to 2 pixels (cheap, helps small MNIST subsets).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _threads()
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.asarray(train_x, np.float32))
    y = torch.from_numpy(np.asarray(train_y, np.int64))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    loss_fn = loss_fn or (lambda m, xb, yb: F.cross_entropy(m(xb), yb))
    history = []
    columns = [TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, disable=quiet, transient=True) as bar:
        task = bar.add_task("", total=epochs)
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            total, start = 0.0, time.perf_counter()
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                xb, yb = x[idx], y[idx]
                if augment:
                    xb = _shift(xb, gen)
                loss = loss_fn(model, xb, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            history.append({"epoch": epoch + 1, "loss": total / len(x), "seconds": time.perf_counter() - start})
            bar.update(task, advance=1, description=f"loss {total / len(x):.4f}")
    model.eval()
    return history


def _shift(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(xb, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for every row of ``x``."""
    model.eval()
    out = [model(torch.from_numpy(np.asarray(x[i:i + batch_size], np.float32))) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def evaluate_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(1) == np.asarray(y)).mean())
