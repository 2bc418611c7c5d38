"""The replay buffer: capacity from bytes, a reservoir that keeps every row with the same chance,
and storage that round-trips (int8 exactly)."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.replay import ReplayBuffer


@pytest.mark.parametrize(("capacity_bytes", "dim", "storage", "rows"),
                         [(65536, 128, "float16", 65536 // 258), (65536, 128, "int8", 65536 // 130),
                          (262144, 576, "float16", 227), (100, 4, "float16", 10), (9, 4, "float16", 0)])
def test_capacity_is_bytes_over_row_bytes(capacity_bytes, dim, storage, rows):
    buf = ReplayBuffer(capacity_bytes, dim, storage=storage, qparams=(0.1, 0) if storage == "int8" else None)
    assert buf.capacity == rows, (buf.capacity, rows)
    buf.add(np.ones((rows + 7, dim), np.float32), np.zeros(rows + 7, np.int64))
    assert len(buf) == rows and buf.seen == rows + 7
    assert buf.nbytes == rows * buf.row_bytes <= capacity_bytes, (buf.nbytes, capacity_bytes)


def test_reservoir_keeps_each_row_with_equal_probability():
    """10 rows offered to a buffer of 5, 4,000 seeded runs: each row is held with p = 0.5."""
    runs, counts = 4000, np.zeros(10)
    for seed in range(runs):
        buf = ReplayBuffer(5 * (1 * 2 + 2), 1, seed=seed)
        assert buf.capacity == 5
        buf.add(np.arange(10, dtype=np.float32).reshape(10, 1), np.arange(10))
        counts[buf.arrays()[1]] += 1
    freq = counts / runs
    sigma = np.sqrt(0.5 * 0.5 / runs)
    assert np.all(np.abs(freq - 0.5) <= 3 * sigma), f"inclusion frequencies {freq.round(4)}, 3 sigma = {3 * sigma:.4f}"


def test_save_load_round_trip_and_continues_deterministically(tmp_path):
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(2000, 8, seed=3)
    buf.add(rng.standard_normal((300, 8)).astype(np.float32), rng.integers(0, 10, 300))
    back = ReplayBuffer.load(buf.save(tmp_path / "replay.npz"))
    for a, b in zip(buf.arrays(), back.arrays(), strict=True):
        assert np.array_equal(a, b)
    assert back.state() == buf.state()
    more = rng.standard_normal((50, 8)).astype(np.float32), rng.integers(0, 10, 50)
    again = ReplayBuffer.load(tmp_path / "replay.npz")
    back.add(*more)
    again.add(*more)
    assert np.array_equal(back.arrays()[0], again.arrays()[0])


def test_int8_storage_is_exact_for_dequantized_features():
    """An int8 variant's features are DequantizeLinear outputs (q - zp) * s: stored as int8 with
    the same s and zp they come back bit-exact, and about twice as many fit."""
    scale, zp = np.float32(0.0371), -11
    q = np.random.default_rng(2).integers(-128, 128, (64, 16))
    feats = ((q - zp).astype(np.float32) * scale).astype(np.float32)
    buf = ReplayBuffer(64 * 18, 16, storage="int8", qparams=(float(scale), zp))
    buf.add(feats, np.arange(64) % 10)
    got, labels = buf.arrays()
    assert got.dtype == np.float32 and np.array_equal(got, feats), np.abs(got - feats).max()
    assert labels.tolist() == (np.arange(64) % 10).tolist()
    assert (buf.capacity, ReplayBuffer(64 * 18, 16).capacity) == (64, 33)   # 1152 B: 18 B rows vs 34 B rows


def test_bad_inputs_are_refused():
    with pytest.raises(EdgekilnError, match="storage"):
        ReplayBuffer(100, 4, storage="float32")
    with pytest.raises(EdgekilnError, match="scale, zero_point"):
        ReplayBuffer(100, 4, storage="int8")
    buf = ReplayBuffer(100, 4)
    with pytest.raises(EdgekilnError, match="3 features"):
        buf.add(np.ones((2, 3), np.float32), np.zeros(2, np.int64))
    with pytest.raises(EdgekilnError, match="class indices"):
        buf.add(np.ones((1, 4), np.float32), np.array([-1]))
