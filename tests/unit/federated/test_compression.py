"""Int8 update compression: exact against an independent formula, error bound in units of the
scale, and the byte count Flower puts on the wire."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from edgekiln.federated.compression import (
    SCALE_SUFFIX,
    decode_update,
    dequantize_int8,
    encode_update,
    quantize_int8,
)


def _reference_q(x: np.ndarray, scale: float) -> np.ndarray:
    """Independent formula: round half to even of x / scale, in Python floats, clamped to +-127."""
    return np.array([max(-127, min(127, round(float(v) / scale))) if scale else 0 for v in x.ravel()],
                    np.int64).reshape(x.shape)


def test_per_tensor_matches_the_formula_with_ties_and_saturation() -> None:
    scale = 0.5 / 127 * 2          # max |x| = 1.0 below
    x = np.array([1.0, -1.0, 0.0, 0.5 * scale, 1.5 * scale, -2.5 * scale, 0.3], np.float32)
    q, s = quantize_int8(x, "tensor")
    assert s.shape == () and float(s) == pytest.approx(1.0 / 127)
    assert q.dtype == np.int8
    assert q.tolist() == _reference_q(x, float(s)).tolist()
    assert q[:2].tolist() == [127, -127]           # the grid is symmetric: -128 is never used
    assert q[3:6].tolist() == [0, 2, -2]           # exact .5 ties round to even


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_channel_error_is_at_most_half_a_scale(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Channels of very different magnitude: per-channel scales keep the small ones precise.
    x = (rng.standard_normal((16, 8, 3, 3)) * np.logspace(-4, 0, 16)[:, None, None, None]).astype(np.float32)
    q, s = quantize_int8(x, "channel")
    assert s.shape == (16,)
    err = np.abs(dequantize_int8(q, s) - x).reshape(16, -1).max(1)
    ratio = float((err / s).max())
    assert ratio <= 0.5 + 1e-4, f"seed {seed}: max error {ratio:.5f} scales > 0.5"
    for c in range(16):
        assert q[c].tolist() == _reference_q(x[c], float(s[c])).tolist(), f"seed {seed} channel {c}"


def test_per_channel_beats_per_tensor_on_uneven_channels() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 32)) * np.logspace(-3, 0, 8)[:, None]).astype(np.float32)
    err_c = np.abs(dequantize_int8(*quantize_int8(x, "channel")) - x).mean()
    err_t = np.abs(dequantize_int8(*quantize_int8(x, "tensor")) - x).mean()
    assert err_c < err_t / 2, f"per-channel mean error {err_c:.2e} vs per-tensor {err_t:.2e}"


def test_all_zero_update_round_trips_without_nan() -> None:
    q, s = quantize_int8(np.zeros((4, 3), np.float32), "channel")
    assert not q.any() and not s.any()
    assert not np.isnan(dequantize_int8(q, s)).any()


def _mnist_like_weights(seed: int) -> dict[str, np.ndarray]:
    """The tensor shapes of edgekiln.models.zoo.mnist_cnn (98,442 parameters)."""
    rng = np.random.default_rng(seed)
    shapes = {"0.weight": (16, 1, 3, 3), "0.bias": (16,), "3.weight": (32, 16, 3, 3), "3.bias": (32,),
              "6.weight": (64, 32, 3, 3), "6.bias": (64,), "10.weight": (128, 576), "10.bias": (128,),
              "12.weight": (10, 128), "12.bias": (10,)}
    return {k: (rng.standard_normal(v) * 0.1).astype(np.float32) for k, v in shapes.items()}


def test_encode_decode_round_trip_and_bytes_on_the_wire() -> None:
    ref = _mnist_like_weights(0)
    rng = np.random.default_rng(1)
    local = {k: v + (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in ref.items()}
    payload = encode_update(local, ref, "channel")
    assert all(payload[k].dtype == np.int8 for k in ref)
    rebuilt = decode_update(payload, ref)
    for k in ref:
        scale = payload[k + SCALE_SUFFIX]
        bound = (scale.reshape(-1, *([1] * (ref[k].ndim - 1))) if scale.ndim else scale) / 2
        # NOTE: the float32 sum ref + delta adds up to one ulp of the weight on top of scale / 2.
        slack = np.spacing(np.abs(local[k]).max())
        assert np.all(np.abs(rebuilt[k] - local[k]) <= bound + slack), k
    float_bytes = ArrayRecord({k: Array(v) for k, v in local.items()}).count_bytes()
    int8_bytes = ArrayRecord({k: Array(v) for k, v in payload.items()}).count_bytes()
    ratio = float_bytes / int8_bytes
    assert ratio >= 3.5, f"float32 {float_bytes} B / int8 {int8_bytes} B = {ratio:.3f}x < 3.5x"
    assert int8_bytes < 98_442 + 6_000, f"int8 payload {int8_bytes} B for 98,442 parameters"


def test_non_float_tensors_travel_unchanged() -> None:
    ref = {"w": np.ones((2, 2), np.float32), "num_batches_tracked": np.array(3, np.int64)}
    local = {"w": np.full((2, 2), 1.5, np.float32), "num_batches_tracked": np.array(5, np.int64)}
    payload = encode_update(local, ref)
    assert "num_batches_tracked" + SCALE_SUFFIX not in payload
    rebuilt = decode_update(payload, ref)
    assert int(rebuilt["num_batches_tracked"]) == 5
    assert np.allclose(rebuilt["w"], 1.5, atol=0.5 / 127)
