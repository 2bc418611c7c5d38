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
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, provenance_record

REBUILD = "edgekiln.compress.structured:rebuild"


@dataclass(frozen=True, kw_only=True)
class PruneConfig(PassConfig):
    mode: str = "structured"                 # structured (channels) | unstructured (weights)
    ratio: float = 0.5                       # share of channels (structured) or weights (unstructured) removed
    importance: str = "l1"                   # structured: l1 | l2 | taylor | bn-scale
    scope: str = "per-layer"                 # per-layer | global
    target_macs_reduction: float | None = None  # structured: choose the ratio that removes this share of MACs
    iterative_steps: int = 1                 # prune -> fine-tune rounds
    finetune_epochs: int = 5                 # epochs after each round (0: no fine-tuning)
    lr: float = 2e-3

    def __post_init__(self) -> None:
        if self.mode not in ("structured", "unstructured"):
            raise ValueError(f"mode must be structured or unstructured (got {self.mode!r})")
        if not 0 <= self.ratio < 1:
            raise ValueError("ratio must be in [0, 1)")
        if self.importance not in ("l1", "l2", "taylor", "bn-scale") or self.scope not in ("per-layer", "global"):
            raise ValueError("importance must be l1|l2|taylor|bn-scale and scope per-layer|global")
        if self.iterative_steps < 1 or self.finetune_epochs < 0:
            raise ValueError("iterative_steps must be >= 1 and finetune_epochs >= 0")


def _data(ctx: PassContext) -> tuple[Any, Any]:
    from edgekiln.models.metrics import load_npz

    path = ctx.train_path or ctx.calib_path
    if path is None:
        raise EdgekilnError("prune needs training data for fine-tuning (train.npz or --calib with labels)")
    data = load_npz(path)
    if "y" not in data:
        raise EdgekilnError(f"{path}: fine-tuning needs labels 'y'")
    return data["x"], data["y"]


def prune_module(module: Any, input_shape: tuple[int, ...], config: PruneConfig, x: Any, y: Any, *,
                 seed: int = 0, quiet: bool = True) -> dict[str, Any]:
    """Prune ``module`` in place (and fine-tune); returns what happened."""
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
        kwargs = {"importance": config.importance, "global_pruning": config.scope == "global",
                  "grad_batch": (torch.from_numpy(x[:64]), torch.from_numpy(y[:64]))}
        if config.target_macs_reduction is not None:
            ratio = structured.ratio_for_macs(module, input_shape, config.target_macs_reduction, **kwargs)
        structured.iterative_prune(module, input_shape, ratio=ratio, steps=config.iterative_steps, finetune=finetune,
                                   **kwargs)
        info["ratio"] = ratio
    info["macs"] = structured.count_macs(module, input_shape)
    info["params"] = sum(p.numel() for p in module.parameters())
    return info


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
    info = prune_module(module, artifact.input_shape, config, x, y, seed=ctx.seed, quiet=ctx.quiet)
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
