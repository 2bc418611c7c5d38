"""Per-layer pruning sensitivity: prune one coupled channel group at a time, measure the metric.

A *group* is what Torch-Pruning's dependency graph must prune together: a conv's output
channels plus every BatchNorm, depthwise conv, residual partner and consumer input that shares
them. The scan prunes one group to each ratio (everything else intact, no fine-tuning) and
evaluates; the curves show which layers tolerate pruning, and :func:`ratios_within` turns them
into non-uniform per-layer ratios for :func:`edgekiln.compress.structured.prune_channels`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekiln.compress.structured import count_macs, output_layers, prune_channels


@dataclass(frozen=True)
class Group:
    name: str                 # the module the group is keyed by (pass it in ``layer_ratios``)
    members: tuple[str, ...]  # every Conv/Linear whose channels change with it
    channels: int


@dataclass(frozen=True)
class SensitivityPoint:
    group: str
    ratio: float
    metric: float
    macs: int


def prunable_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[Group]:
    """The coupled channel groups pruning can shrink (the classifier's outputs are excluded)."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(input_shape))
    names = {m: n for n, m in model.named_modules()}
    layer_types = [nn.Conv1d, nn.Conv2d, nn.Linear]
    out = []
    for group in graph.get_all_groups(ignored_layers=output_layers(model, input_shape), root_module_types=layer_types):
        root = group[0].dep.target.module
        members = sorted({names[d.target.module] for d, _ in group if isinstance(d.target.module, tuple(layer_types))})
        out.append(Group(names[root], tuple(members), len(group[0].idxs)))
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(out, key=lambda g: min(order[m] for m in g.members))   # network order


def sensitivity_scan(model: nn.Module, input_shape: tuple[int, ...], evaluate: Callable[[nn.Module], float], *,
                     ratios: Sequence[float] = (0.25, 0.5, 0.75), importance: str = "l1",
                     grad_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[Group], list[SensitivityPoint]]:
    """Prune each group alone to each ratio and evaluate (``evaluate(module) -> metric``, higher is
    better). Does not change ``model``.

    >>> import torch; torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
    ...                         torch.nn.Flatten(), torch.nn.Linear(8 * 16, 2))
    >>> groups, points = sensitivity_scan(m, (1, 1, 8, 8), lambda mod: 1.0, ratios=(0.5,))
    >>> [g.name for g in groups], len(points)
    (['0', '2'], 2)
    """
    groups = prunable_groups(model, input_shape)
    points = []
    total, done = len(groups) * len(ratios), 0
    for g in groups:
        for r in ratios:
            trial = copy.deepcopy(model)
            prune_channels(trial, input_shape, ratio=0.0, layer_ratios={g.name: r}, importance=importance,
                           grad_batch=grad_batch)
            trial.eval()
            points.append(SensitivityPoint(g.name, float(r), float(evaluate(trial)), count_macs(trial, input_shape)))
            done += 1
            if progress:
                progress(done, total)
    return groups, points


def ratios_within(points: Sequence[SensitivityPoint], baseline: float, max_drop: float) -> dict[str, float]:
    """Per group, the largest scanned ratio whose metric stays within ``max_drop`` of ``baseline``
    (groups that tolerate no scanned ratio are left out, i.e. not pruned)."""
    best: dict[str, float] = {}
    for p in points:
        if baseline - p.metric <= max_drop + 1e-12 and p.ratio > best.get(p.group, 0.0):
            best[p.group] = p.ratio
    return best


def plot_sensitivity(points: Sequence[SensitivityPoint], baseline: float, path: str | Path,
                     metric_name: str = "accuracy", groups: Sequence[Group] = ()) -> Path:
    """One curve per group: metric vs the share of its channels removed (labelled with the
    group's channel count and coupled layers when ``groups`` is given)."""
    from edgekiln.report import new_figure, save_figure

    labels = {g.name: f"{g.name} ({g.channels} ch, {len(g.members)} layers)" for g in groups}
    fig, ax = new_figure(8, 4.5)
    by_group: dict[str, list[SensitivityPoint]] = {}
    for p in points:
        by_group.setdefault(p.group, []).append(p)
    for name, pts in by_group.items():
        pts = sorted(pts, key=lambda p: p.ratio)
        ax.plot([0.0] + [p.ratio for p in pts], [baseline] + [p.metric for p in pts], marker="o",
                label=labels.get(name, name))
    ax.axhline(baseline, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("share of the group's channels removed (no fine-tuning)")
    ax.set_ylabel(metric_name)
    ax.set_title("Per-layer pruning sensitivity")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def to_dicts(groups: Sequence[Group], points: Sequence[SensitivityPoint]) -> dict[str, Any]:
    return {"groups": [asdict(g) for g in groups], "points": [asdict(p) for p in points]}


def scan_artifact(artifact: Any, data_npz: str | Path, *, importance: str = "l1",
                  ratios: Sequence[float] = (0.25, 0.5, 0.75), limit: int = 500,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """:func:`sensitivity_scan` of an artifact's PyTorch model, accuracy on ``limit`` samples of
    ``data_npz``; returns ``{"baseline", "groups", "points"}`` (what the prune report plots)."""
    from edgekiln.errors import EdgekilnError
    from edgekiln.execution.feeds import load_npz
    from edgekiln.models.torch_source import build_module
    from edgekiln.models.training import evaluate_accuracy

    if artifact.torch is None:
        raise EdgekilnError("a sensitivity scan needs the model's PyTorch source")
    data = load_npz(data_npz)
    if "y" not in data:
        raise EdgekilnError(f"{data_npz}: a sensitivity scan needs labels 'y'")
    x, y = data["x"][:limit], data["y"][:limit]
    module = build_module(artifact.torch)
    groups, points = sensitivity_scan(module, artifact.input_shape, lambda m: evaluate_accuracy(m, x, y),
                                      ratios=ratios, importance=importance,
                                      grad_batch=(torch.from_numpy(x[:64]), torch.from_numpy(y[:64])),
                                      progress=progress)
    return {"baseline": evaluate_accuracy(module, x, y), **to_dicts(groups, points)}
