"""Fixed-point multipliers: exact against an independent rational formula (Python ints / Fraction)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.quant.fixed_point import multiply_by_quantized_multiplier, quantize_multiplier

SEED = 0


def _expected(acc: int, m: int, shift: int) -> int:
    """round-half-up of acc * m / 2**(31 - shift), computed with exact rationals."""
    return math.floor(Fraction(acc * m, 2 ** (31 - shift)) + Fraction(1, 2))


@pytest.mark.parametrize("real", [1e-9, 3.3e-4, 0.0123, 0.25, 0.5, 0.75, 0.999999, 1.0, 1.7, 255.0])
def test_quantize_multiplier_range_and_accuracy(real):
    m, shift = quantize_multiplier(real)
    assert 2**30 <= m < 2**31, f"mantissa {m} out of [2^30, 2^31) for {real}"
    approx = m * 2.0 ** (shift - 31)
    assert abs(approx - real) <= real * 2.0**-30, f"{real}: got {approx}"


def test_quantize_multiplier_edges():
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(1e-12) == (0, 0)  # would need a shift beyond 62 bits
    assert quantize_multiplier(0.5) == (2**30, 0)
    # a fraction that rounds up to 1.0 moves to the next exponent
    assert quantize_multiplier(1 - 2.0**-40) == (2**30, 1)
    with pytest.raises(EdgekilnError, match="multiplier"):
        quantize_multiplier(-0.5)


def test_multiply_matches_rational_formula_on_random_values():
    rng = np.random.default_rng(SEED)
    accs = rng.integers(-(2**31), 2**31, 2000, dtype=np.int64)
    accs[:4] = [-(2**31), 2**31 - 1, 0, -1]
    reals = rng.uniform(1e-6, 0.99, 2000)
    for acc, real in zip(accs, reals, strict=True):
        m, s = quantize_multiplier(float(real))
        got = int(multiply_by_quantized_multiplier(np.int64(acc), m, s))
        assert got == _expected(int(acc), m, s), f"acc={acc} real={real} seed={SEED}"


def test_ties_round_toward_positive_infinity_for_negative_accumulators():
    m, s = quantize_multiplier(0.5)
    accs = np.arange(-7, 8, dtype=np.int64)
    got = multiply_by_quantized_multiplier(accs, m, s).tolist()
    assert got == [_expected(int(a), m, s) for a in accs]
    assert got[:4] == [-3, -3, -2, -2]  # -3.5 -> -3, -3 -> -3, -2.5 -> -2, -2 -> -2


def test_per_channel_broadcast_and_saturation():
    ms = [quantize_multiplier(r) for r in (0.25, 0.5, 3.0)]
    m = np.array([p[0] for p in ms])
    s = np.array([p[1] for p in ms])
    acc = np.array([[10, 10, 10], [2**31 - 1, 2**31 - 1, 2**31 - 1]], np.int64)
    got = multiply_by_quantized_multiplier(acc, m, s)
    assert got[0].tolist() == [3, 5, 30]  # 2.5 -> 3 (tie up), 5, 30
    assert got[1, 2] == 2**31 - 1, "x3 of the int32 maximum saturates"
