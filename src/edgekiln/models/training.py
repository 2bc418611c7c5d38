"""Training and evaluation loops shared by the examples and the fine-tuning passes
(pruning recovery, distillation, quantization-aware training).

A custom objective plugs in through ``loss_fn(model, xb, yb)``, which returns the loss, or
``(loss, logits)`` when it wants the history to report training accuracy (distillation does).

Deterministic for a seed on the CPU: shuffling, augmentation and any randomness inside the
model (e.g. dropout) draw from generators seeded with ``seed``; the caller's global RNG state
is restored afterwards. Weight initialization is the caller's (``torch.manual_seed`` before
building the model).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
DEFAULT_THREADS = 2


def torch_threads() -> int:
    """Threads for training: ``OMP_NUM_THREADS`` when set, else 2 (the machines we target are small)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "") or DEFAULT_THREADS))
    except ValueError:
        return DEFAULT_THREADS


def train_classifier(model: nn.Module, train_x: np.ndarray, train_y: np.ndarray, *, epochs: int,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, quiet: bool = False,
                     augment: bool = False, loss_fn: LossFn | None = None, weight_decay: float = 0.0,
                     eval_data: tuple[np.ndarray, np.ndarray] | None = None,
                     description: str = "train") -> list[dict[str, Any]]:
    """Train ``model`` in place with Adam and a cosine learning-rate decay; return the history.

    Each history entry has ``epoch``, ``loss`` (mean training loss), ``accuracy`` (training
    accuracy on the batches as seen, augmented; ``None`` when ``loss_fn`` returns no logits),
    ``seconds`` and, with ``eval_data=(x, y)``, ``eval_accuracy`` (only reported: nothing is
    selected on it). ``augment`` applies a random small affine transform per image (NCHW input
    only). The model is left in eval mode.

    >>> import numpy as np, torch; torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> x = np.random.default_rng(0).standard_normal((32, 1, 2, 2)).astype(np.float32)
    >>> h = train_classifier(m, x, (x.sum((1, 2, 3)) > 0).astype(np.int64), epochs=3, quiet=True)
    >>> [round(e["accuracy"], 2) >= 0 for e in h]
    [True, True, True]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    x = torch.from_numpy(np.ascontiguousarray(train_x, np.float32))
    y = torch.from_numpy(np.ascontiguousarray(train_y, np.int64))
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"train_x has {len(x)} rows but train_y has {len(y)}")
    if augment and x.ndim != 4:
        raise ValueError(f"augment needs NCHW images, got input of shape {tuple(x.shape)}")
    loss_fn = loss_fn or _cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    columns = [TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads())
    try:
        with torch.random.fork_rng(devices=[]), Progress(*columns, disable=quiet, transient=True) as bar:
            torch.manual_seed(seed)
            task = bar.add_task("", total=epochs)
            for epoch in range(epochs):
                model.train()
                start = time.perf_counter()
                total_loss, correct, counted = 0.0, 0, 0
                perm = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), batch_size):
                    idx = perm[i:i + batch_size]
                    xb, yb = x[idx], y[idx]
                    if augment:
                        xb = random_affine(xb, gen)
                    out = loss_fn(model, xb, yb)
                    loss, logits = out if isinstance(out, tuple) else (out, None)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += float(loss.detach()) * len(idx)
                    if logits is not None:
                        correct += int((logits.detach().argmax(1) == yb).sum())
                        counted += len(idx)
                entry: dict[str, Any] = {"epoch": epoch + 1, "loss": total_loss / len(x),
                                         "accuracy": correct / counted if counted else None}
                if eval_data is not None:
                    entry["eval_accuracy"] = evaluate_accuracy(model, *eval_data)
                entry["seconds"] = round(time.perf_counter() - start, 3)
                history.append(entry)
                shown = f"loss {entry['loss']:.4f}"
                if entry["accuracy"] is not None:
                    shown += f"  acc {entry['accuracy']:.3f}"
                if "eval_accuracy" in entry:
                    shown += f"  eval {entry['eval_accuracy']:.3f}"
                bar.update(task, advance=1, description=shown)
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return history


def _cross_entropy(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(xb)
    return F.cross_entropy(logits, yb), logits


def random_affine(xb: torch.Tensor, gen: torch.Generator, *, degrees: float = 10.0, scale: float = 0.1,
                  shift_pixels: float = 2.0) -> torch.Tensor:
    """Each image of an NCHW batch rotated by up to ``degrees``, scaled by up to +-``scale`` and
    shifted by up to ``shift_pixels``; borders are extended (the background stays background)."""
    n, _, h, w = xb.shape
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (2 * shift_pixels / w)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (2 * shift_pixels / h)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
    return F.grid_sample(xb, grid, padding_mode="border", align_corners=False)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Model outputs (logits) for every row of ``x``, batched; puts the model in eval mode.

    >>> import numpy as np, torch
    >>> predict(torch.nn.Flatten(), np.ones((3, 1, 2, 2), np.float32)).shape
    (3, 4)
    """
    if len(x) == 0:
        raise ValueError("predict needs at least one input row")
    model.eval()
    outs = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32)))
            for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy()


def evaluate_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in [0, 1]."""
    return float((predict(model, x).argmax(1) == np.asarray(y)).mean())
