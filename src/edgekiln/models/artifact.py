"""The artifact that flows through the pipeline: a model file plus what is known about it.

An artifact is immutable; a pass returns a new one with one more provenance entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Artifact kinds, in the order the compile path produces them.
TORCH = "torch"            # a PyTorch module (factory + state_dict), exportable
ONNX_FLOAT = "onnx"        # a float32 ONNX model
ONNX_QDQ = "onnx-qdq"      # int8 QuantizeLinear/DequantizeLinear ONNX model
ONNX_FP16 = "onnx-fp16"
ONNX_INT4W = "onnx-int4w"  # int4 weight-only (MatMulNBits)
C_LIBRARY = "c-library"
TFLITE = "tflite"
KINDS = (TORCH, ONNX_FLOAT, ONNX_QDQ, ONNX_FP16, ONNX_INT4W, C_LIBRARY, TFLITE)


@dataclass(frozen=True, kw_only=True)
class TorchSource:
    """How to rebuild the PyTorch module: ``factory`` is ``"pkg.mod:fn"`` or ``"file.py:fn"``."""

    factory: str
    factory_kwargs: Mapping[str, Any] = field(default_factory=dict)
    state_dict: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "factory_kwargs": dict(self.factory_kwargs),
                "state_dict": str(self.state_dict) if self.state_dict else None}


@dataclass(frozen=True, kw_only=True)
class ModelArtifact:
    """A model on disk. ``path`` is the ONNX file for every ONNX kind."""

    kind: str
    path: Path
    input_name: str
    input_shape: tuple[int, ...]
    torch: TorchSource | None = None
    provenance: tuple[Mapping[str, Any], ...] = ()

    def with_pass(self, *, kind: str, path: Path, record: Mapping[str, Any], **changes: Any) -> ModelArtifact:
        """A new artifact produced by a pass, with ``record`` appended to the provenance."""
        return replace(self, kind=kind, path=Path(path), provenance=(*self.provenance, dict(record)), **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "torch": self.torch.to_dict() if self.torch else None,
            "provenance": [dict(p) for p in self.provenance],
        }
