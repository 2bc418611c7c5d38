"""The artifact that flows through the pipeline: a model file plus what is known about it.

An artifact is immutable; a pass returns a new one with one more provenance entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekiln.execution.specs import TensorSpec

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

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> TorchSource:
        sd = data.get("state_dict")
        return TorchSource(factory=str(data["factory"]), factory_kwargs=dict(data.get("factory_kwargs") or {}),
                           state_dict=Path(sd) if sd else None)


@dataclass(frozen=True, kw_only=True)
class ModelArtifact:
    """A model on disk. ``path`` is the ONNX file for every ONNX kind.

    ``inputs`` are every model input, fully resolved (name, shape, dtype); the first is the
    primary input, which :attr:`input_name` and :attr:`input_shape` return. ``data`` names the
    ``.npz`` files (``calib``, ``eval``, ``train``) the model was made or evaluated with.

    >>> from edgekiln.execution.specs import TensorSpec
    >>> a = ModelArtifact(kind=ONNX_FLOAT, path=Path("m.onnx"),
    ...                   inputs=(TensorSpec("x", (1, 3, 8, 8)), TensorSpec("sr", (), "int64")))
    >>> a.input_name, a.input_shape, [i.dtype for i in a.inputs]
    ('x', (1, 3, 8, 8), ['float32', 'int64'])
    """

    kind: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    torch: TorchSource | None = None
    provenance: tuple[Mapping[str, Any], ...] = ()
    data: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a ModelArtifact needs at least one input")

    @property
    def input_name(self) -> str:
        """Name of the primary (first) input."""
        return self.inputs[0].name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the primary (first) input."""
        return self.inputs[0].shape

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every input (what sessions and analysis take)."""
        return {i.name: i.shape for i in self.inputs}

    def with_pass(self, *, kind: str, path: Path, record: Mapping[str, Any], **changes: Any) -> ModelArtifact:
        """A new artifact produced by a pass, with ``record`` appended to the provenance."""
        return replace(self, kind=kind, path=Path(path), provenance=(*self.provenance, dict(record)), **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "inputs": [i.to_dict() for i in self.inputs],
            "torch": self.torch.to_dict() if self.torch else None,
            "provenance": [dict(p) for p in self.provenance],
            "data": {k: str(v) for k, v in self.data.items()},
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> ModelArtifact:
        """The inverse of :meth:`to_dict`."""
        torch = data.get("torch")
        return ModelArtifact(kind=str(data["kind"]), path=Path(data["path"]),
                             inputs=tuple(TensorSpec.from_dict(i) for i in data["inputs"]),
                             torch=TorchSource.from_dict(torch) if torch else None,
                             provenance=tuple(data.get("provenance") or ()),
                             data={k: Path(v) for k, v in (data.get("data") or {}).items()})
