"""Run a chain of passes: check the chain first, validate between steps, record provenance.

>>> from edgekiln.passes.export import ExportConfig
>>> check_chain("onnx", [Step("export", ExportConfig())], has_torch_source=False)
Traceback (most recent call last):
...
edgekiln.errors.EdgekilnError: step 1 'export' needs the model's PyTorch source, which this model does not have (give file.py:factory, or a run folder that has it)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import ModelArtifact
from edgekiln.passes.base import PassConfig, PassContext
from edgekiln.passes.registry import get_pass

ONNX_KINDS = {"onnx", "onnx-qdq", "onnx-fp16", "onnx-int4w"}


@dataclass(frozen=True)
class Step:
    """One pass of a pipeline: its registered name and its config."""

    name: str
    config: PassConfig

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "config": self.config.to_dict()}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Step:
        spec = get_pass(str(data.get("pass")))
        return Step(spec.name, spec.config_type.from_dict(data.get("config") or {}))


def check_chain(start_kind: str, steps: Sequence[Step], *, has_torch_source: bool) -> None:
    """Fail before anything runs if a pass cannot take what the previous one produces."""
    kind = start_kind
    for i, step in enumerate(steps, 1):
        spec = get_pass(step.name)
        if not isinstance(step.config, spec.config_type):
            raise EdgekilnError(f"step {i} '{step.name}': config is {type(step.config).__name__}, "
                                f"expected {spec.config_type.__name__}")
        if spec.needs_torch_source and not has_torch_source:
            raise EdgekilnError(f"step {i} '{step.name}' needs the model's PyTorch source, which this model does "
                                "not have (give file.py:factory, or a run folder that has it)")
        if kind not in spec.consumes:
            raise EdgekilnError(f"step {i} '{step.name}' takes {'/'.join(sorted(spec.consumes))} models, "
                                f"but receives '{kind}' from the step before")
        kind = spec.output_kind(step.config)


def run_pipeline(
    artifact: ModelArtifact,
    steps: Sequence[Step],
    ctx: PassContext,
    *,
    on_step: Callable[[int, Step, ModelArtifact], None] | None = None,
) -> ModelArtifact:
    """Run ``steps`` in order; each step works in its own sub-folder of ``ctx.work_dir``.

    In strict mode (``ctx.strict``) every intermediate ONNX artifact is checked: it loads, passes
    ``onnx.checker``, runs in onnxruntime and keeps the output shape of the step before.
    """
    check_chain(artifact.kind, steps, has_torch_source=artifact.torch is not None)
    current = artifact
    ref_shapes = _output_shapes(current) if ctx.strict and current.kind in ONNX_KINDS else None
    for i, step in enumerate(steps, 1):
        spec = get_pass(step.name)
        step_dir = Path(ctx.work_dir) / f"{i:02d}-{step.name}"
        step_dir.mkdir(parents=True, exist_ok=True)
        result = spec.run(current, step.config, replace(ctx, work_dir=step_dir))
        if result is current or result.path == current.path and result.kind == current.kind:
            raise EdgekilnError(f"step {i} '{step.name}' returned its input unchanged (passes must produce a new artifact)")
        if len(result.provenance) != len(current.provenance) + 1:
            raise EdgekilnError(f"step {i} '{step.name}' did not record its provenance")
        declared = spec.output_kind(step.config)
        if result.kind != declared:
            raise EdgekilnError(f"step {i} '{step.name}' produced a '{result.kind}' model, but its pass declares "
                                f"'{declared}'")
        if ctx.strict and result.kind in ONNX_KINDS:
            shapes = _output_shapes(result)
            if ref_shapes is not None and shapes != ref_shapes:
                raise EdgekilnError(f"step {i} '{step.name}' changed the model's output shapes {ref_shapes} -> {shapes}")
            ref_shapes = shapes
        if on_step:
            on_step(i, step, result)
        current = result
    return current


def _output_shapes(artifact: ModelArtifact) -> list[tuple[int, ...]]:
    """Validate an ONNX artifact by running it once on zeros; return its output shapes."""
    import numpy as np

    from edgekiln.execution.ort import error_line, ort_session
    from edgekiln.models.intake import load_onnx

    model = load_onnx(artifact.path)
    try:
        sess = ort_session(model)
        # NOTE: every input (token-id models such as MiniLM have several) gets zeros of the shape
        # and dtype the intake resolved for it.
        feeds = {s.name: np.zeros(s.shape, dtype=s.dtype) for s in artifact.inputs}
        outs = sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise EdgekilnError(f"{artifact.path}: does not run in onnxruntime: {error_line(exc, 240)}") from exc
    return [tuple(o.shape) for o in outs]
