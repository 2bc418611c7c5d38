"""Run a chain of passes: check the chain first, validate between steps, record provenance.

>>> from edgekiln.passes.export import ExportConfig
>>> check_chain("onnx", [Step("export", ExportConfig())], has_torch_source=False)
Traceback (most recent call last):
...
edgekiln.errors.EdgekilnError: step 1 'export' needs the PyTorch source of the model, which this model does not have
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
            raise EdgekilnError(f"step {i} '{step.name}' needs the PyTorch source of the model, which this model does not have")
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
    import onnxruntime as ort

    from edgekiln.models.intake import load_onnx

    model = load_onnx(artifact.path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {}
        for k, inp in enumerate(sess.get_inputs()):
            # NOTE: every input gets zeros (token-id models such as MiniLM have several); the first
            # uses the artifact's shape, others their declared one with symbolic dims as the first's.
            dims = list(artifact.input_shape) if k == 0 else \
                [d if isinstance(d, int) else (artifact.input_shape[j] if j < len(artifact.input_shape) else 1)
                 for j, d in enumerate(inp.shape)]
            dtype = {"tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                     "tensor(bool)": np.bool_}.get(inp.type, np.float32)
            feeds[inp.name] = np.zeros(dims, dtype=dtype)
        outs = sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise EdgekilnError(f"{artifact.path}: does not run in onnxruntime: {str(exc).splitlines()[0][:240]}") from exc
    return [tuple(o.shape) for o in outs]
