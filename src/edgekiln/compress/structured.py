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

from edgekiln.errors import BudgetNotMet, EdgekilnError

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


def output_layers(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[nn.Module]:
    """The layer that produces the outputs (the classes: must not be pruned): the last Conv/Linear
    to run in a forward pass (SqueezeNet's classifier is a 1x1 conv), or the last Linear."""
    if input_shape is None:
        return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in model.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(input_shape))
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def prune_channels(model: nn.Module, input_shape: tuple[int, ...], *, ratio: float, importance: str = "l1",
                   global_pruning: bool = False, ignore: list[nn.Module] | None = None,
                   grad_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                   layer_ratios: dict[str, float] | None = None, round_to: int | None = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer (or globally); in place.

    ``layer_ratios`` maps module names (``model.named_modules()``) to their own ratio, e.g. from
    a sensitivity scan; the rest get ``ratio``. ``round_to`` keeps channel counts multiples of it
    (SIMD-friendly kernels). ``importance``: ``l1``/``l2`` (filter magnitude), ``taylor``
    (|weight x gradient| on ``grad_batch``, data-driven) or ``bn-scale`` (|gamma| of the
    following BatchNorm, the network-slimming criterion; needs BatchNorm layers).

    >>> import torch; torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 2))
    >>> prune_channels(m, (1, 1, 8, 8), ratio=0.5)[0].out_channels
    4
    """
    import torch_pruning as tp

    if not 0 <= ratio < 1 or any(not 0 <= r < 1 for r in (layer_ratios or {}).values()):
        raise ValueError("ratio must be in [0, 1)")
    if ratio == 0 and not any((layer_ratios or {}).values()):
        return model
    if importance not in IMPORTANCE:
        raise EdgekilnError(f"unknown importance '{importance}'; known: {', '.join(IMPORTANCE)}")
    if importance == "bn-scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # NOTE: Torch-Pruning silently prunes nothing then; say so instead.
        raise EdgekilnError("bn-scale importance needs BatchNorm layers; this model has none (use l1, l2 or taylor)")
    modules = dict(model.named_modules())
    unknown = sorted(set(layer_ratios or {}) - set(modules))
    if unknown:
        raise EdgekilnError(f"layer_ratios names unknown module(s): {', '.join(unknown[:4])}")
    per_layer = {modules[name]: r for name, r in (layer_ratios or {}).items()} or None
    example = torch.zeros(input_shape)
    pruner = tp.pruner.MetaPruner(model, example, importance=_importance(importance), pruning_ratio=ratio,
                                  pruning_ratio_dict=per_layer,
                                  ignored_layers=ignore if ignore is not None else output_layers(model, input_shape),
                                  global_pruning=global_pruning, round_to=round_to)
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
    return ratio_for_reduction(model, input_shape, target_reduction, lambda m: count_macs(m, input_shape), **kwargs)


def ratio_for_reduction(model: nn.Module, input_shape: tuple[int, ...], target_reduction: float,
                        cost: Callable[[nn.Module], float], **kwargs: Any) -> float:
    """The smallest channel ratio whose pruning lowers ``cost`` (MACs, an estimated latency on a
    device, ...) by ``target_reduction`` (0.5 = half): a 5% grid, then 5 bisection steps (~0.2%).

    NOTE: not a plain bisection over [0, 0.95]: Torch-Pruning leaves a layer alone when the ratio
    would remove all of its channels, so the cost is not monotonic in the ratio near the top.

    Raises :class:`BudgetNotMet` (exit 3) when no ratio up to 95% reaches the target.
    """
    if not 0 < target_reduction < 1:
        raise EdgekilnError(f"target reduction must be in (0, 1), got {target_reduction}")
    base = cost(model)

    def reduction(ratio: float) -> float:
        return 1 - cost(prune_channels(copy.deepcopy(model), input_shape, ratio=ratio, **kwargs)) / base

    lo, hi, best = 0.0, None, 0.0
    for step in range(1, 20):
        r = step / 20
        reached = reduction(r)
        best = max(best, reached)
        if reached >= target_reduction:
            hi = r
            break
        lo = r
    if hi is None:
        raise BudgetNotMet(f"pruning cannot remove {target_reduction:.0%} of the cost: the most any ratio up to "
                           f"95% removes is {best:.1%}")
    for _ in range(5):
        mid = (lo + hi) / 2
        if reduction(mid) >= target_reduction:
            hi = mid
        else:
            lo = mid
    return round(hi, 4)


def iterative_prune(model: nn.Module, input_shape: tuple[int, ...], *, ratio: float, steps: int,
                    finetune: Callable[[nn.Module, int], None] | None,
                    layer_ratios: dict[str, float] | None = None, **kwargs: Any) -> nn.Module:
    """Prune to ``ratio`` (and ``layer_ratios``) in ``steps`` equal steps of the original channel
    count, fine-tuning after each: step k removes what takes the kept share from ``1 - r(k-1)/steps``
    to ``1 - r*k/steps`` of the original.

    >>> import torch; torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16 * 36, 2))
    >>> seen = []
    >>> _ = iterative_prune(m, (1, 1, 8, 8), ratio=0.75, steps=3, finetune=lambda mod, k: seen.append(mod[0].out_channels))
    >>> seen
    [12, 8, 4]
    """
    def step_ratio(r: float, step: int) -> float:
        before, after = 1 - r * step / steps, 1 - r * (step + 1) / steps
        return 1 - after / before

    for step in range(steps):
        per_layer = {k: step_ratio(r, step) for k, r in (layer_ratios or {}).items()} or None
        prune_channels(model, input_shape, ratio=step_ratio(ratio, step), layer_ratios=per_layer, **kwargs)
        if finetune:
            finetune(model, step)
    return model


def rebuild(factory: str, state_dict: str, factory_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``factory``'s architecture with every Conv1d/Conv2d/Linear/BatchNorm resized to the shapes
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
    if isinstance(m, nn.Conv1d):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        groups = w[0] if depthwise else m.groups
        return nn.Conv1d(w[1] * groups, w[0], m.kernel_size, m.stride, m.padding, m.dilation, groups,
                         m.bias is not None)
    if isinstance(m, nn.Linear):
        return nn.Linear(w[1], w[0], m.bias is not None)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return type(m)(w[0], m.eps, m.momentum, m.affine, m.track_running_stats)
    return None


def _set(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = root
    parts = dotted.split(".")
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)
