"""Early exit (BranchyNet-style): exit heads on an existing classifier, exported as stages.

No mainstream runtime skips the rest of a graph natively (an ``If`` node in onnxruntime is
slower, not faster), so the network is exported as one ONNX model per stage; the runtime calls
stage after stage and stops at the first exit whose confidence clears its threshold.

The backbone must be an ``nn.Sequential`` (or expose one as ``.features`` plus a ``.head``);
``exits`` are indices into it after which a head is attached. Heads are a fixed average pool +
linear, trained by distillation from the final head's softmax (backbone frozen), so the
original model's accuracy is untouched when no exit is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class ExitHead(nn.Module):
    """Average-pool the stage's feature map to about ``pool`` x ``pool`` cells, then a linear
    classifier. Keeping a coarse spatial layout matters on digit images (a global pool loses
    which strokes are where). The pool is a fixed ``AvgPool2d`` whose kernel divides the map
    (an adaptive pool to a size that does not divide it does not export to ONNX)."""

    def __init__(self, channels: int, num_classes: int, spatial: tuple[int, int] = (1, 1), pool: int = 2) -> None:
        super().__init__()
        h, w = spatial
        kh, kw = max(1, h // pool), max(1, w // pool)
        self.pool = nn.AvgPool2d((kh, kw), stride=(kh, kw)) if (kh, kw) != (1, 1) else nn.Identity()
        features = channels * (h // kh) * (w // kw)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1) if x.dim() == 4 else x.flatten(1))


@dataclass
class StagedModel:
    stages: list[nn.Sequential]          # stage k maps the previous features to features_k
    heads: list[nn.Module]               # exit head per stage except the last (whose output is the logits)


def split_stages(backbone: nn.Sequential, exits: Sequence[int]) -> list[nn.Sequential]:
    cuts = [0, *[e + 1 for e in sorted(exits)], len(backbone)]
    return [nn.Sequential(*list(backbone)[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def attach_exits(backbone: nn.Sequential, exits: Sequence[int], input_shape: tuple[int, ...],
                 num_classes: int, *, pool: int = 2) -> StagedModel:
    stages = split_stages(backbone, exits)
    heads = []
    x = torch.zeros(input_shape)
    with torch.no_grad():
        for stage in stages[:-1]:
            x = stage(x)
            heads.append(ExitHead(x.shape[1], num_classes, tuple(x.shape[2:4]) if x.dim() == 4 else (1, 1),
                                  pool=pool))
    return StagedModel(stages, heads)


def train_exits(model: StagedModel, x: np.ndarray, *, epochs: int = 10, temperature: float = 2.0, lr: float = 3e-3,
                batch_size: int = 128, seed: int = 0) -> list[float]:
    """Train the exit heads by distillation from the final output (backbone frozen); returns
    the loss per epoch."""
    torch.manual_seed(seed)
    for s in model.stages:
        s.eval()
        for p in s.parameters():
            p.requires_grad_(False)
    data = torch.from_numpy(np.asarray(x, np.float32))
    with torch.no_grad():  # features and teacher targets once: the backbone does not change
        feats, h = [], data
        for stage in model.stages:
            h = stage(h)
            feats.append(h)
        teacher = F.softmax(feats[-1] / temperature, dim=1)
    params = [p for head in model.heads for p in head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        total = 0.0
        for i in range(0, len(data), batch_size):
            idx = perm[i:i + batch_size]
            loss = sum(F.kl_div(F.log_softmax(head(f[idx]) / temperature, dim=1), teacher[idx],
                                reduction="batchmean") * temperature ** 2
                       for head, f in zip(model.heads, feats, strict=False))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(data))
    return history


class _StageWithExit(nn.Module):
    def __init__(self, stage: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.stage(x)
        logits = self.head(h)
        # NOTE: the exit confidence (top-1 softmax probability) is computed in the graph: doing
        # it in numpy between stage calls cost ~4 us per exit, a tenth of the whole small model.
        return h, logits, F.softmax(logits, dim=1).amax(dim=1)


def export_stages(model: StagedModel, input_shape: tuple[int, ...], out_dir: str | Path, *,
                  heads: bool = True) -> list[Path]:
    """One ONNX file per stage: ``stage{k}.onnx`` with outputs (features, exit_logits,
    exit_confidence), the last one with the final logits only. ``heads=False`` exports the
    bare backbone stages (to measure what the split itself costs)."""
    out = Path(out_dir)
    paths, x = [], torch.zeros(input_shape)
    for k, stage in enumerate(model.stages):
        last = k == len(model.stages) - 1
        module = stage if last or not heads else _StageWithExit(stage, model.heads[k])
        path = out / f"stage{k}.onnx"
        shape = tuple(x.shape)
        _export_multi(module, shape, path, last or not heads)
        with torch.no_grad():
            x = stage(x)
        paths.append(path)
    return paths


def _export_multi(module: nn.Module, shape: tuple[int, ...], path: Path, last: bool) -> None:
    import io
    import warnings

    import onnx

    from edgekiln.fileio import atomic_save_onnx

    names = ["logits"] if last else ["features", "exit_logits", "exit_confidence"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *names]})
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model, full_check=True)
    atomic_save_onnx(path, model)


def choose_thresholds(exit_logits: Sequence[np.ndarray], final_logits: np.ndarray, labels: np.ndarray, *,
                      max_drop: float, grid: Sequence[float] = tuple(np.linspace(0.5, 0.999, 60))) -> dict[str, Any]:
    """Per-exit confidence thresholds (one shared value per exit, searched greedily from the
    first exit) that keep accuracy within ``max_drop`` of the full model while exiting as early
    as possible. Returns thresholds, accuracy and the share of inputs leaving at each exit."""
    from edgekiln.runtime.cascade import confidence

    n = len(labels)
    preds = [lg.argmax(1) for lg in exit_logits] + [final_logits.argmax(1)]
    confs = [confidence(lg) for lg in exit_logits]
    full_acc = float((preds[-1] == labels).mean())
    target = full_acc - max_drop
    thresholds = [1.01] * len(exit_logits)   # > 1: never exit

    def simulate(th: list[float]) -> tuple[float, np.ndarray]:
        taken = np.full(n, len(exit_logits))
        for k in range(len(exit_logits) - 1, -1, -1):
            taken = np.where(confs[k] >= th[k], k, taken)
        chosen = np.choose(taken, preds)
        return float((chosen == labels).mean()), taken

    for k in range(len(exit_logits)):
        for t in sorted(grid):
            trial = thresholds.copy()
            trial[k] = float(t)
            acc, _ = simulate(trial)
            if acc >= target:
                thresholds = trial
                break
    acc, taken = simulate(thresholds)
    share = [float((taken == k).mean()) for k in range(len(exit_logits) + 1)]
    return {"thresholds": thresholds, "accuracy": acc, "full_accuracy": full_acc, "exit_share": share}
