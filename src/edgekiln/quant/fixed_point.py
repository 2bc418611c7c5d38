"""Fixed-point requantization multipliers (Jacob et al. 2018, "integer-arithmetic-only inference").

A real multiplier ``r > 0`` (e.g. ``s_in * s_w / s_out``) is stored as an int32 mantissa
``m`` in ``[2**30, 2**31)`` and a power-of-two exponent ``shift`` so that
``r ~= m * 2**(shift - 31)``.

Applying it to an int32 accumulator uses ONE rounding step on the exact 64-bit product:

    total = 31 - shift                      # 1 <= total <= 62, checked at export time
    y = floor((acc * m + 2**(total - 1)) / 2**total)

i.e. round-half-up (ties go toward +infinity), then saturate to int32. ``acc * m`` fits in a
signed 64-bit integer because ``|acc| < 2**31`` and ``m < 2**31``. The generated C
(``ek_requant`` in ``ek_kernels.c``) implements exactly this arithmetic with a portable floor
shift, so Python and C agree bit for bit.

NOTE: gemmlowp/TFLM classically use two roundings (saturating rounding doubling high multiply,
then a rounding right shift); newer TFLM builds offer this single-rounding variant too. One
rounding is simpler to state, to test against a closed formula and to reproduce in C.
"""

from __future__ import annotations

import math

import numpy as np

from edgekiln.errors import EdgekilnError

#: smallest and largest total right shift the C kernel accepts (``31 - shift``).
MIN_TOTAL_SHIFT = 1
MAX_TOTAL_SHIFT = 62


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Return ``(mantissa, shift)`` with ``real ~= mantissa * 2**(shift - 31)``.

    ``mantissa`` is in ``[2**30, 2**31)``; a multiplier of 0 (or one below ``2**-31`` that
    would need a right shift beyond 62 bits) returns ``(0, 0)``.

    >>> quantize_multiplier(0.5)
    (1073741824, 0)
    >>> quantize_multiplier(0.75)
    (1610612736, 0)
    """
    real = float(real)
    if not math.isfinite(real) or real < 0:
        raise EdgekilnError(f"requantization multiplier {real!r} must be finite and >= 0")
    if real == 0.0:
        return 0, 0
    frac, exp = math.frexp(real)  # real = frac * 2**exp, frac in [0.5, 1)
    mantissa = round(frac * (1 << 31))
    if mantissa == 1 << 31:  # frac rounded up to 1.0
        mantissa //= 2
        exp += 1
    total = 31 - exp
    if total > MAX_TOTAL_SHIFT:
        return 0, 0
    if total < MIN_TOTAL_SHIFT:
        raise EdgekilnError(f"requantization multiplier {real!r} is too large (>= 2**30) for int32 fixed point")
    return int(mantissa), int(exp)


def multiply_by_quantized_multiplier(acc: np.ndarray | int, mantissa: np.ndarray | int,
                                     shift: np.ndarray | int) -> np.ndarray:
    """``floor((acc * mantissa + 2**(t-1)) / 2**t)`` with ``t = 31 - shift``, saturated to int32.

    ``acc``, ``mantissa`` and ``shift`` broadcast (per-channel multipliers on the last axis).
    Integer-exact, the same arithmetic as ``ek_requant`` in the generated C.

    >>> int(multiply_by_quantized_multiplier(np.int64(3), *quantize_multiplier(0.5)))  # 1.5 -> 2
    2
    >>> int(multiply_by_quantized_multiplier(np.int64(-3), *quantize_multiplier(0.5)))  # -1.5 -> -1
    -1
    """
    acc = np.asarray(acc, dtype=np.int64)
    mantissa = np.asarray(mantissa, dtype=np.int64)
    total = 31 - np.asarray(shift, dtype=np.int64)
    total = np.where(mantissa == 0, 1, total)  # a zero multiplier gives 0 whatever the shift
    prod = acc * mantissa + (np.int64(1) << (total - 1))
    out = prod >> total  # numpy's >> on signed ints is an arithmetic (floor) shift
    return np.clip(out, -(1 << 31), (1 << 31) - 1).astype(np.int64)
