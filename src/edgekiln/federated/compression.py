"""Int8 compression of model updates (client -> server), pure numpy.

A client sends ``delta = local_weights - global_weights`` instead of its weights, each tensor as
symmetric int8 ``q = clip(round(delta / scale), -127, 127)`` with ``scale = max|delta| / 127``
over the whole tensor (``tensor``) or per output channel, i.e. along axis 0 (``channel``;
1-D tensors such as biases always get one scale). The server rebuilds
``global + q * scale``. Rounding is to nearest (ties to even), so every element's error is at
most ``scale / 2``; -128 is never used, which keeps the grid symmetric around 0.

>>> import numpy as np
>>> d = np.array([[0.25, -1.0], [0.02, -0.005]], np.float32)
>>> q, s = quantize_int8(d, "channel")
>>> q.tolist(), [round(float(v), 5) for v in s]
([[32, -127], [127, -32]], [0.00787, 0.00016])
>>> float(np.abs(dequantize_int8(q, s) - d).max()) <= float(s.max()) / 2
True
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgekiln.errors import EdgekilnError

GRANULARITIES = ("tensor", "channel")
QMAX = 127
SCALE_SUFFIX = "::scale"


def quantize_int8(delta: np.ndarray, granularity: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)``: int8 values of ``delta`` and float32 scales (shape ``()`` or ``(channels,)``)."""
    if granularity not in GRANULARITIES:
        raise EdgekilnError(f"unknown int8 granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")
    x = np.asarray(delta, np.float32)
    if granularity == "channel" and x.ndim >= 2:
        amax = np.abs(x.reshape(x.shape[0], -1)).max(1)
    else:
        amax = np.asarray(np.abs(x).max() if x.size else 0.0)
    scale = np.asarray(amax / QMAX, np.float32)
    # NOTE: an all-zero tensor/channel gets scale 0; divide by 1 there so q is 0, not NaN.
    divisor = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / _broadcast(divisor, x.ndim)), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q * scale`` as float32 (``scale`` broadcast along axis 0 when per channel)."""
    return (q.astype(np.float32) * _broadcast(np.asarray(scale, np.float32), q.ndim)).astype(np.float32)


def _broadcast(scale: np.ndarray, ndim: int) -> np.ndarray:
    return scale.reshape((-1,) + (1,) * (ndim - 1)) if scale.ndim == 1 and ndim >= 1 else scale


def encode_update(local: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  granularity: str = "channel") -> dict[str, np.ndarray]:
    """The int8 payload of ``local - reference``: ``name`` -> int8, ``name::scale`` -> float32.

    Non-float tensors (e.g. BatchNorm's ``num_batches_tracked``) are sent as they are.
    """
    if list(local) != list(reference):
        raise ValueError("local and reference weights name different tensors")
    out: dict[str, np.ndarray] = {}
    for name, value in local.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            out[name] = value
            continue
        q, scale = quantize_int8(value.astype(np.float32) - np.asarray(reference[name], np.float32), granularity)
        out[name], out[name + SCALE_SUFFIX] = q, scale
    return out


def decode_update(payload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights rebuilt from :func:`encode_update`'s payload: ``reference + q * scale``."""
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        if name not in payload:
            raise ValueError(f"compressed update lacks tensor {name!r}")
        ref = np.asarray(ref)
        if name + SCALE_SUFFIX in payload:
            delta = dequantize_int8(payload[name], payload[name + SCALE_SUFFIX])
            out[name] = (ref.astype(np.float32) + delta).astype(ref.dtype)
        else:
            out[name] = np.asarray(payload[name])
    return out
