"""Export pass: a PyTorch source -> a verified float ONNX model."""

from __future__ import annotations

from dataclasses import dataclass

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import ONNX_FLOAT, TORCH, ModelArtifact
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, provenance_record


@dataclass(frozen=True, kw_only=True)
class ExportConfig(PassConfig):
    """Export the artifact's PyTorch module to ONNX."""

    opset: int = 17  # lowest opset both torch exporters handle reliably (see FIELD-NOTES)
    verify_tolerance: float = 1e-4  # max |onnx - torch| on random inputs, relative to output magnitude

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset must be >= 17 (got {self.opset})")


def run(artifact: ModelArtifact, config: ExportConfig, ctx: PassContext) -> ModelArtifact:
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.models.torch_source import build_module

    if artifact.torch is None:
        raise EdgekilnError("export: the model has no PyTorch source to export")
    module = build_module(artifact.torch)
    out = ctx.work_dir / "model.onnx"
    info = export_to_onnx(module, artifact.input_shape, out, input_name=artifact.input_name,
                          opset=config.opset, verify_tolerance=config.verify_tolerance, seed=ctx.seed)
    record = provenance_record("export", config, artifact, max_abs_error=info["max_abs_error"])
    return artifact.with_pass(kind=ONNX_FLOAT, path=out, record=record)


SPEC = PassSpec(name="export", config_type=ExportConfig, run=run, consumes=frozenset({TORCH, ONNX_FLOAT}),
                produces=ONNX_FLOAT, summary="PyTorch -> verified ONNX (opset >= 17)", needs_torch_source=True)
