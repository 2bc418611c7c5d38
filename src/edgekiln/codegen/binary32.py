"""Conv/FC requantization that rounds exactly as binary32 (IEEE float32) arithmetic does, in integers.

ONNX ``QLinearConv``/``QLinearMatMul`` define the output as ``round(acc * s) + zp`` with the
float32 scale ``s = x_scale * w_scale / y_scale``, and onnxruntime's integer kernels compute it in
float32: ``rint(float(acc) * s)``, ties to even. A 31-bit fixed-point multiplier with one rounding
(:mod:`edgekiln.quant.fixed_point`) gives the *exact* rounding of ``acc * s`` instead, which differs
from the float32 result whenever ``acc * s`` lies within a float32 ulp of a .5 boundary (~1e-6 of
the outputs per layer). One such flipped LSB propagates through every later layer: on the
MobileNet-style int8 model the final outputs differed from onnxruntime on ~1.1% of the logits.

Here the same three roundings float32 hardware performs are done on integers, with the float32
scale split at export time into a 24-bit significand ``mant`` and a right shift ``rshift``
(``s == mant * 2**-rshift`` exactly)::

    a = round24(|acc|)            # float(acc): keep 24 significant bits, ties to even
    p = round24(a * mant)         # the float32 product (a * mant < 2**55 fits in 64 bits)
    q = round_half_even(p / 2**rshift)
    y = sign(acc) * q             # float multiplication is sign-symmetric

``ek_requant_b32`` in ``c/ek_kernels.c`` is the same arithmetic (unsigned 64-bit, no float, no
builtins); :func:`requant_binary32` is the numpy reference and is tested against numpy's own
float32 arithmetic. Subnormal products are not special-cased: they are below ``2**-126`` and round
to 0 either way.
"""

from __future__ import annotations

import numpy as np

from edgekiln.errors import EdgekilnError

#: largest right shift stored; any larger shift gives 0 too, because ``p < 2**56``.
MAX_RSHIFT = 62
#: significant bits binary32 keeps.
SIGNIFICAND_BITS = 24


def onnx_qlinear_scale(x_scale: float, w_scale: np.ndarray | float, y_scale: float) -> np.ndarray:
    """``x_scale * w_scale / y_scale`` evaluated in float32, left to right (as onnxruntime does).

    >>> float(onnx_qlinear_scale(0.5, 0.25, 0.5)[0])
    0.25
    """
    f = np.float32
    w = np.atleast_1d(np.asarray(w_scale, dtype=f))
    return ((f(x_scale) * w).astype(f) / f(y_scale)).astype(f)


def binary32_multiplier(scale: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Split float32 scales into ``(mant, rshift)`` int32 arrays with ``scale == mant * 2**-rshift``.

    ``mant`` is in ``[2**23, 2**24)`` (0 for a zero scale); ``rshift`` is at most 62.

    >>> binary32_multiplier(np.float32(0.75))
    (array([12582912], dtype=int32), array([24], dtype=int32))
    """
    s = np.atleast_1d(np.asarray(scale, dtype=np.float32)).astype(np.float64)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise EdgekilnError(f"requantization scale {s[~np.isfinite(s) | (s < 0)][0]!r} must be finite and >= 0")
    frac, exp = np.frexp(s)  # s = frac * 2**exp, frac in [0.5, 1)
    mant = np.rint(frac * (1 << SIGNIFICAND_BITS)).astype(np.int64)  # exact for a float32
    rshift = SIGNIFICAND_BITS - exp.astype(np.int64)
    if np.any((mant != 0) & (rshift < 1)):
        raise EdgekilnError(f"requantization scale {float(s.max())!r} is too large (>= 2**23)")
    rshift = np.where(mant == 0, 1, np.minimum(rshift, MAX_RSHIFT))
    return mant.astype(np.int32), rshift.astype(np.int32)


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative int64 values below ``2**62``, exactly."""
    _, e = np.frexp(v.astype(np.float64))
    e = e.astype(np.int64)
    # float64(v) can round up to the next power of two: then 2**(e-1) > v and e is one too big
    too_big = (e > 0) & ((np.int64(1) << np.maximum(e - 1, 0)) > v)
    return np.where(v == 0, 0, e - too_big)


def _round_shift_half_even(v: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``v / 2**n`` rounded to nearest, ties to even, for ``v >= 0`` and ``n >= 0``."""
    q = v >> n
    rem = v - (q << n)
    half = np.where(n > 0, np.int64(1) << np.maximum(n - 1, 0), 1)  # n == 0: rem is 0, never a tie
    up = (rem > half) | ((rem == half) & (q % 2 == 1) & (n > 0))
    return q + up


def round24(v: np.ndarray) -> np.ndarray:
    """Non-negative integers rounded to their 24 most significant bits, ties to even."""
    v = np.asarray(v, dtype=np.int64)
    n = np.maximum(_bit_length(v) - SIGNIFICAND_BITS, 0)
    return _round_shift_half_even(v, n) << n


def requant_binary32(acc: np.ndarray | int, mant: np.ndarray | int, rshift: np.ndarray | int) -> np.ndarray:
    """``rint(float32(float32(acc) * s))`` for ``s = mant * 2**-rshift``, exactly, on int64; saturated to int32.

    ``acc`` is int32-ranged; ``mant``/``rshift`` broadcast (per channel on the last axis).

    >>> m, t = binary32_multiplier(np.float32(0.5))
    >>> requant_binary32(np.array([1, 3, -1, -3]), m, t).tolist()   # 0.5, 1.5, -0.5, -1.5: ties to even
    [0, 2, 0, -2]
    """
    acc = np.asarray(acc, dtype=np.int64)
    mant = np.asarray(mant, dtype=np.int64)
    rshift = np.asarray(rshift, dtype=np.int64)
    a = round24(np.abs(acc))
    p = round24(a * mant)
    q = _round_shift_half_even(p, np.broadcast_to(rshift, p.shape))
    q = np.minimum(q, (1 << 31) - 1)
    return np.where(acc < 0, -q, q).astype(np.int64)
