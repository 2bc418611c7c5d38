"""Quantization parameters and the rounding of ONNX ``QuantizeLinear`` (pure numpy).

``quantize(x) = saturate(round_half_to_even(x / scale) + zero_point)``, the exact semantics of
ONNX QuantizeLinear, so fake-quantization here predicts what onnxruntime computes.
Ranges always include 0, so real zero (padding, ReLU output) is exactly representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}


@dataclass(frozen=True)
class QParams:
    scale: np.ndarray          # float32, shape () or (channels,)
    zero_point: np.ndarray     # int32, same shape
    qmin: int
    qmax: int
    axis: int | None = None    # channel axis for per-channel parameters


def compute_qparams(lo: float | np.ndarray, hi: float | np.ndarray, *, dtype: str = "int8", symmetric: bool = False,
                    narrow_range: bool = False, axis: int | None = None) -> QParams:
    """Scale and zero point covering [lo, hi] (widened to include 0).

    Symmetric: zero point 0 (the middle of the range for unsigned types) and
    ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)``; ``narrow_range`` drops -128 so the int8
    grid is [-127, 127], as per-channel weight quantizers do.

    >>> q = compute_qparams(-1.0, 3.0)
    >>> float(q.scale), int(q.zero_point)
    (0.01568627543747425, -64)
    """
    qmin, qmax = RANGES[dtype]
    if narrow_range and dtype == "int8":
        qmin = -127
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        scale = absmax / ((qmax - qmin) / 2.0)
        zp = np.full_like(scale, 0 if qmin < 0 else (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = np.round(qmin - lo / np.where(scale == 0, 1.0, scale))
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zp = np.clip(zp, qmin, qmax).astype(np.int32)
    return QParams(scale, zp, qmin, qmax, axis)


def _bcast(a: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None or a.ndim == 0:
        return a
    shape = [1] * x.ndim
    shape[axis] = -1
    return a.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """ONNX QuantizeLinear: round half to even, add the zero point, saturate."""
    x = np.asarray(x, np.float32)
    scale, zp = _bcast(qp.scale, x, qp.axis), _bcast(qp.zero_point, x, qp.axis)
    q = np.rint(x / scale) + zp          # np.rint rounds half to even
    return np.clip(q, qp.qmin, qp.qmax).astype(np.int32)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    scale, zp = _bcast(qp.scale, q, qp.axis), _bcast(qp.zero_point, q, qp.axis)
    return ((np.asarray(q, np.int32) - zp) * scale).astype(np.float32)


def fake_quant(x: np.ndarray, qp: QParams) -> np.ndarray:
    return dequantize(quantize(x, qp), qp)
