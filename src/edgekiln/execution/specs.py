"""What a model takes: named tensors with a fixed shape and a dtype, and the one dtype table.

Every layer above describes inputs with :class:`TensorSpec`; every conversion between the
type names of onnxruntime (``tensor(float)``), ONNX (``TensorProto.FLOAT``) and numpy goes
through the tables here.

>>> TensorSpec("x", (1, 3, 8, 8), "float32").nbytes
768
>>> numpy_dtype("tensor(int64)")
dtype('int64')
>>> onnx_elem_dtype(7)
dtype('int64')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# onnxruntime's type names -> numpy. Types numpy cannot hold (bfloat16, float8, int4) are absent.
ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool", "tensor(string)": "object",
}
# ONNX TensorProto.DataType numbers -> numpy (the same set).
ONNX_ELEM_TYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "object",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
}


def numpy_dtype(ort_type: str) -> np.dtype:
    """numpy dtype for an onnxruntime type name; float32 for types numpy cannot hold."""
    return np.dtype(ORT_TYPES.get(ort_type, "float32"))


def onnx_elem_dtype(elem_type: int) -> np.dtype:
    """numpy dtype for an ONNX ``TensorProto`` element type number."""
    return np.dtype(ONNX_ELEM_TYPES.get(int(elem_type), "float32"))


@dataclass(frozen=True)
class TensorSpec:
    """One model input (or output): its name, its fully resolved shape and its numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TensorSpec:
        return TensorSpec(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data.get("dtype", "float32")))
