"""Structured (channel) pruning through Torch-Pruning's dependency graph, behind edgekiln's config.

The dependency graph keeps residual adds, concatenations, depthwise groups and BatchNorm
consistent, so the result is a genuinely smaller dense network. A pruned model is saved as a
plain state_dict; :func:`rebuild` recreates it safely (no pickled code) by building the original
architecture and resizing every Conv/Linear/BatchNorm to the shapes the state_dict holds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMPORTANCE = ("l1", "l2", "taylor", "bn-scale")


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model.eval(), torch.zeros(input_shape))
    return int(macs)


def _importance(name: str) -> Any:
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.MagnitudeImportance(p=1), "l2": lambda: tp.importance.MagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.TaylorImportance(),
            "bn-scale": lambda: tp.importance.BNScaleImportance()}[name]()


def _classifier(model: nn.Module) -> list[nn.Module]:
    """The last Linear (its outputs are the classes and must not be pruned)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def prune_channels(model: nn.Module, input_shape: tuple[int, ...], *, ratio: float, importance: str = "l1",
                   global_pruning: bool = False, ignore: list[nn.Module] | None = None,
                   grad_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer (or globally); in place."""
    import torch_pruning as tp

    if not 0 <= ratio < 1:
        raise ValueError("ratio must be in [0, 1)")
    if ratio == 0:
        return model
    example = torch.zeros(input_shape)
    pruner = tp.pruner.MetaPruner(model, example, importance=_importance(importance), pruning_ratio=ratio,
                                  ignored_layers=ignore if ignore is not None else _classifier(model),
                                  global_pruning=global_pruning)
    if importance == "taylor":
        if grad_batch is None:
            raise ValueError("taylor importance needs a batch of data for the gradients")
        model.zero_grad()
        nn.functional.cross_entropy(model(grad_batch[0]), grad_batch[1]).backward()
    pruner.step()
    model.zero_grad()
    return model


def ratio_for_macs(model: nn.Module, input_shape: tuple[int, ...], target_reduction: float, **kwargs: Any) -> float:
    """The smallest channel ratio (to 1%) whose pruning removes ``target_reduction`` of the MACs."""
    base = count_macs(model, input_shape)
    lo, hi = 0.0, 0.95
    for _ in range(8):
        mid = (lo + hi) / 2
        trial = prune_channels(copy.deepcopy(model), input_shape, ratio=mid, **kwargs)
        if 1 - count_macs(trial, input_shape) / base >= target_reduction:
            hi = mid
        else:
            lo = mid
    return round(hi, 3)


def iterative_prune(model: nn.Module, input_shape: tuple[int, ...], *, ratio: float, steps: int,
                    finetune: Callable[[nn.Module, int], None] | None, **kwargs: Any) -> nn.Module:
    """Prune to ``ratio`` in ``steps`` equal steps of the remaining channels, fine-tuning after each."""
    kept = 1.0
    for step in range(steps):
        target_kept = 1 - ratio * (step + 1) / steps
        step_ratio = 1 - target_kept / kept
        prune_channels(model, input_shape, ratio=step_ratio, **kwargs)
        kept = target_kept
        if finetune:
            finetune(model, step)
    return model


def rebuild(factory: str, state_dict: str, factory_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``factory``'s architecture with every Conv2d/Linear/BatchNorm resized to the shapes
    in ``state_dict`` (a pruned model), ready for ``load_state_dict``.

    The factory string and state_dict path are what a TorchSource records, so pruned models
    chain into further passes (fine-tuning, distillation, quantization) like any other.
    """
    from edgekiln.models.torch_source import load_state_dict, resolve_factory

    model = resolve_factory(factory)(**(factory_kwargs or {}))
    shapes = {k: tuple(v.shape) for k, v in load_state_dict(Path(state_dict)).items()}
    for name, module in list(model.named_modules()):
        new = _resized(module, name, shapes)
        if new is not None:
            _set(model, name, new)
    return model


def _resized(m: nn.Module, name: str, shapes: dict[str, tuple[int, ...]]) -> nn.Module | None:
    key = f"{name}.weight" if name else "weight"
    if key not in shapes:
        return None
    w = shapes[key]
    if isinstance(m, nn.Conv2d):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        groups = w[0] if depthwise else m.groups      # depthwise keeps one group per channel
        in_ch = w[1] * groups
        return nn.Conv2d(in_ch, w[0], m.kernel_size, m.stride, m.padding, m.dilation, groups, m.bias is not None)
    if isinstance(m, nn.Linear):
        return nn.Linear(w[1], w[0], m.bias is not None)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(w[0], m.eps, m.momentum, m.affine, m.track_running_stats)
    return None


def _set(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = root
    parts = dotted.split(".")
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)
