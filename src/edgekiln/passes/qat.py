"""QAT pass: quantization-aware fine-tuning of the PyTorch source, exported to the same int8
QDQ ONNX format as post-training quantization.

Fake-quantization (per-channel symmetric weights, EMA-observed int8 activations) is inserted
around every Conv/Linear, the model is fine-tuned on the training data, the weights are
snapped to their int8 grid, and the result goes through the static QDQ quantizer with min-max
calibration, which then reproduces the grid training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import ONNX_FLOAT, ONNX_QDQ, ModelArtifact
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, provenance_record


@dataclass(frozen=True, kw_only=True)
class QATConfig(PassConfig):
    epochs: int = 3                  # fine-tuning epochs with fake-quantization
    lr: float = 5e-4
    observe_steps: int = 100         # steps during which activation ranges are still updated
    calib_samples: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.observe_steps < 1:
            raise ValueError("epochs and observe_steps must be >= 1 and lr > 0")


def run(artifact: ModelArtifact, config: QATConfig, ctx: PassContext) -> ModelArtifact:
    import torch

    from edgekiln.compress.qat import prepare_qat, strip_qat
    from edgekiln.execution.feeds import load_npz
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.models.torch_source import build_module
    from edgekiln.models.training import train_classifier
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    if artifact.torch is None:
        raise EdgekilnError("qat needs the model's PyTorch source")
    path = ctx.train_path or ctx.calib_path
    if path is None:
        raise EdgekilnError("qat needs labelled training data (train.npz)")
    data = load_npz(path)
    if "y" not in data:
        raise EdgekilnError(f"{path}: QAT needs labels 'y'")
    torch.manual_seed(ctx.seed)
    model = prepare_qat(build_module(artifact.torch), observe_steps=config.observe_steps)
    train_classifier(model, data["x"], data["y"], epochs=config.epochs, lr=config.lr, seed=ctx.seed, quiet=ctx.quiet,
                     description="QAT")
    work = Path(ctx.work_dir)
    float_path = work / "qat_float.onnx"
    export_to_onnx(strip_qat(model), artifact.input_shape, float_path, input_name=artifact.input_name, seed=ctx.seed)
    res = quantize_model(float_path, QuantizeConfig(calibration="minmax", calib_samples=config.calib_samples,
                                                     speed_rule="off", activations="int8"), work,
                         calib=ctx.calib_path or path, seed=ctx.seed)
    record = provenance_record("qat", config, artifact)
    return artifact.with_pass(kind=ONNX_QDQ, path=res.path, record=record, torch=None)


SPEC = PassSpec(name="qat", config_type=QATConfig, run=run, consumes=frozenset({ONNX_FLOAT}), produces=ONNX_QDQ,
                summary="quantization-aware fine-tuning, exported as int8 QDQ ONNX", needs_torch_source=True)
