"""Prune pass: structured channel pruning (smaller, faster dense network) or unstructured
magnitude pruning (compresses only), with fine-tuning on the training data.

Needs the model's PyTorch source. Fine-tuning data: the context's ``train_path`` (``edgekiln
example`` run folders have ``train.npz``), else its calibration data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact, TorchSource
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, option, provenance_record

REBUILD = "edgekiln.compress.structured:rebuild"


@dataclass(frozen=True, kw_only=True)
class PruneConfig(PassConfig):
    mode: str = option("structured", "structured (channels: smaller and faster) | unstructured (weights: "
                                     "compresses only).")
    ratio: float = option(0.5, "Share of channels (structured) or weights removed.")
    importance: str = option("l1", "l1 | l2 | taylor (data-driven) | bn-scale.")
    scope: str = option("per-layer", "per-layer (same ratio everywhere) | global.")
    target_macs_reduction: float | None = option(None, "Choose the ratio that removes this share of MACs (0.5 = half).")
    target_latency_reduction: float | None = option(
        None, "Choose the ratio that cuts the estimated latency on the device by this share (roofline estimate).")
    device: str = option("cortex-m7", "Device profile for the latency-reduction target.")
    sensitivity_max_drop: float | None = option(
        None, "Per-layer ratios from a sensitivity scan on the calibration data: each layer's largest ratio "
              "within this accuracy drop (0.01 = 1 point).")
    round_to: int | None = option(None, "Keep channel counts multiples of this (e.g. 8).")
    iterative_steps: int = option(1, "Iterative schedule: prune -> fine-tune this many times.")
    finetune_epochs: int = option(5, "Epochs after each step (0: none).")
    lr: float = option(2e-3, "Learning rate of the fine-tuning.")

    def __post_init__(self) -> None:
        targets = [t for t in (self.target_macs_reduction, self.target_latency_reduction) if t is not None]
        if len(targets) > 1 or any(not 0 < t < 1 for t in targets):
            raise ValueError("give at most one of target_macs_reduction / target_latency_reduction, in (0, 1)")
        if self.sensitivity_max_drop is not None and (targets or self.sensitivity_max_drop < 0):
            raise ValueError("sensitivity_max_drop (>= 0) replaces the ratio targets; give only one")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError("round_to must be >= 1")
        if self.mode not in ("structured", "unstructured"):
            raise ValueError(f"mode must be structured or unstructured (got {self.mode!r})")
        if not 0 <= self.ratio < 1:
            raise ValueError("ratio must be in [0, 1)")
        if self.importance not in ("l1", "l2", "taylor", "bn-scale") or self.scope not in ("per-layer", "global"):
            raise ValueError("importance must be l1|l2|taylor|bn-scale and scope per-layer|global")
        if self.iterative_steps < 1 or self.finetune_epochs < 0:
            raise ValueError("iterative_steps must be >= 1 and finetune_epochs >= 0")


def _data(ctx: PassContext) -> tuple[Any, Any]:
    from edgekiln.execution.feeds import load_npz

    path = ctx.train_path or ctx.calib_path
    if path is None:
        raise EdgekilnError("prune needs training data for fine-tuning (train.npz or --calib with labels)")
    data = load_npz(path)
    if "y" not in data:
        raise EdgekilnError(f"{path}: fine-tuning needs labels 'y'")
    return data["x"], data["y"]


def prune_module(module: Any, input_shape: tuple[int, ...], config: PruneConfig, x: Any, y: Any, *,
                 seed: int = 0, quiet: bool = True, scan_data: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Prune ``module`` in place (and fine-tune on ``x, y``); returns what happened.

    ``scan_data`` (x, y) is what a sensitivity scan evaluates on (default: 500 training samples).
    """
    import torch

    from edgekiln.compress import structured, unstructured
    from edgekiln.models.training import train_classifier

    torch.manual_seed(seed)

    def finetune(m: Any, step: int) -> None:
        if config.finetune_epochs:
            train_classifier(m, x, y, epochs=config.finetune_epochs, lr=config.lr, seed=seed + step, quiet=quiet,
                             description=f"fine-tune {step + 1}")

    info: dict[str, Any] = {"macs_before": structured.count_macs(module, input_shape),
                            "params_before": sum(p.numel() for p in module.parameters())}
    if config.mode == "unstructured":
        sparsity = unstructured.magnitude_prune(module, config.ratio, scope=config.scope)
        finetune_masked(module, x, y, config, seed, quiet)
        info.update(unstructured.sparse_bytes(module))
        info["sparsity"] = sparsity
        info["note"] = "unstructured sparsity does not speed up dense runtimes; it only compresses the file"
    else:
        ratio = config.ratio
        kwargs: dict[str, Any] = {"importance": config.importance, "global_pruning": config.scope == "global",
                                  "grad_batch": (torch.from_numpy(x[:64]), torch.from_numpy(y[:64])),
                                  "round_to": config.round_to}
        if config.target_macs_reduction is not None:
            ratio = structured.ratio_for_macs(module, input_shape, config.target_macs_reduction, **kwargs)
        elif config.target_latency_reduction is not None:
            cost = latency_cost(config.device, input_shape)
            ratio = structured.ratio_for_reduction(module, input_shape, config.target_latency_reduction, cost, **kwargs)
            info["device"] = config.device
        elif config.sensitivity_max_drop is not None:
            layer_ratios, scan = sensitivity_ratios(module, input_shape, config, scan_data or (x[:500], y[:500]))
            info["sensitivity"], info["layer_ratios"] = scan, layer_ratios
            kwargs["layer_ratios"], ratio = layer_ratios, 0.0
        structured.iterative_prune(module, input_shape, ratio=ratio, steps=config.iterative_steps, finetune=finetune,
                                   **kwargs)
        info["ratio"] = ratio
    info["macs"] = structured.count_macs(module, input_shape)
    info["params"] = sum(p.numel() for p in module.parameters())
    return info


def latency_cost(device: str, input_shape: tuple[int, ...]) -> Any:
    """``cost(module) -> ms``: the roofline latency estimate of the module on ``device`` (int8 when
    the device runs it, else fp32), from the analysis of its ONNX export."""
    import tempfile

    from edgekiln.models.analysis import analyze
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.targets.fit import estimate_fit
    from edgekiln.targets.profiles import load_profile

    profile = load_profile(device)
    precision = "int8" if "int8" in profile.precisions else "fp32"
    scale = 4 if precision == "int8" else 1     # the analysis counts float32 bytes

    def cost(module: Any) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_to_onnx(module.eval(), input_shape, path)
            info = analyze(path)
        fit = estimate_fit(profile, weight_bytes=info.weight_bytes // scale,
                           peak_activation_bytes=info.peak_activation_bytes // scale, io_bytes=info.io_bytes // scale,
                           macs=info.macs, precision=precision)
        return float(fit.metrics["latency_ms"].value or 0.0)

    return cost


def sensitivity_ratios(module: Any, input_shape: tuple[int, ...], config: PruneConfig,
                       data: tuple[Any, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Scan each channel group at 25/50/75% and keep, per group, the largest ratio within
    ``config.sensitivity_max_drop`` of the unpruned accuracy on ``data``."""
    import torch

    from edgekiln.compress.sensitivity import ratios_within, sensitivity_scan, to_dicts
    from edgekiln.models.training import evaluate_accuracy

    sx, sy = data
    baseline = evaluate_accuracy(module, sx, sy)
    groups, points = sensitivity_scan(module, input_shape, lambda m: evaluate_accuracy(m, sx, sy),
                                      importance=config.importance,
                                      grad_batch=(torch.from_numpy(sx[:64]), torch.from_numpy(sy[:64])))
    assert config.sensitivity_max_drop is not None
    return ratios_within(points, baseline, config.sensitivity_max_drop), {"baseline": baseline,
                                                                           **to_dicts(groups, points)}


def finetune_masked(module: Any, x: Any, y: Any, config: PruneConfig, seed: int, quiet: bool) -> None:
    """Fine-tune while keeping pruned weights at zero (the mask is re-applied after every step)."""
    import torch

    from edgekiln.compress.unstructured import prunable
    from edgekiln.models.training import train_classifier

    if not config.finetune_epochs:
        return
    masks = [(p, (p != 0).float()) for _, p in prunable(module)]

    def loss_fn(m: Any, xb: Any, yb: Any) -> Any:
        with torch.no_grad():
            for p, mask in masks:
                p.mul_(mask)
        return torch.nn.functional.cross_entropy(m(xb), yb)

    train_classifier(module, x, y, epochs=config.finetune_epochs, lr=config.lr, seed=seed, quiet=quiet,
                     loss_fn=loss_fn, description="fine-tune")
    with torch.no_grad():
        for p, mask in masks:
            p.mul_(mask)


def run(artifact: ModelArtifact, config: PruneConfig, ctx: PassContext) -> ModelArtifact:
    import torch

    from edgekiln.fileio import atomic_write_bytes
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.models.torch_source import build_module

    if artifact.torch is None:
        raise EdgekilnError("prune needs the model's PyTorch source (give file.py:factory or an example run folder)")
    module = build_module(artifact.torch)
    x, y = _data(ctx)
    scan = None
    if config.sensitivity_max_drop is not None and ctx.calib_path is not None:
        from edgekiln.execution.feeds import load_npz

        calib = load_npz(ctx.calib_path)
        scan = (calib["x"], calib["y"]) if "y" in calib else None
    info = prune_module(module, artifact.input_shape, config, x, y, seed=ctx.seed, quiet=ctx.quiet, scan_data=scan)
    state = Path(ctx.work_dir) / "model.pt"
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    atomic_write_bytes(state, buf.getvalue())
    onnx_path = Path(ctx.work_dir) / "model.onnx"
    export_to_onnx(module.eval(), artifact.input_shape, onnx_path, input_name=artifact.input_name, seed=ctx.seed)
    original = artifact.torch
    base_factory = original.factory_kwargs.get("factory", original.factory) if original.factory == REBUILD \
        else original.factory
    base_kwargs = original.factory_kwargs.get("factory_kwargs", {}) if original.factory == REBUILD \
        else dict(original.factory_kwargs)
    source = TorchSource(factory=REBUILD, factory_kwargs={"factory": base_factory, "state_dict": str(state),
                                                          "factory_kwargs": base_kwargs}, state_dict=state)
    record = provenance_record("prune", config, artifact, source_torch=original.to_dict(),
                               **{k: v for k, v in info.items() if k != "sparsity"})
    return artifact.with_pass(kind=ONNX_FLOAT, path=onnx_path, record=record, torch=source)


SPEC = PassSpec(name="prune", config_type=PruneConfig, run=run, consumes=frozenset({ONNX_FLOAT}), produces=ONNX_FLOAT,
                summary="structured channel pruning (Torch-Pruning dependency graph) or unstructured magnitude "
                        "pruning, with fine-tuning", needs_torch_source=True)
