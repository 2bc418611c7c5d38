"""Packaged datasets: fixed stratified splits, exact sizes, reproducible documented preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.models.datasets import Splits, load_dataset, stratified_sample


def _rows(x: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in x.reshape(len(x), -1))


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def mnist() -> Splits:
    return load_dataset("mnist", seed=0)


def test_digits_sizes_and_stratification(digits):
    assert digits.sizes() == {"train": 1438, "calib": 300, "eval": 359}
    assert digits.input_shape == (1, 1, 8, 8) and digits.num_classes == 10
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.int64
    assert digits.train_x.shape[1:] == (1, 8, 8)
    from sklearn.datasets import load_digits

    # Largest-remainder quotas: every class gets its proportional share, rounded up or down.
    eval_share = np.bincount(load_digits().target) * (359 / 1797)
    calib_share = np.bincount(digits.train_y) * (300 / 1438)
    for split, labels, share in (("eval", digits.eval_y, eval_share), ("calib", digits.calib_y, calib_share)):
        counts = np.bincount(labels, minlength=10)
        assert np.all(np.abs(counts - share) < 1), f"{split} per-class counts {counts} vs shares {share.round(1)}"


def test_train_and_eval_partition_the_dataset_and_calib_comes_from_train(digits):
    from sklearn.datasets import load_digits

    p = digits.preprocessing
    raw = load_digits().data.astype(np.float64)
    # The documented formula, applied by hand, reproduces the arrays exactly (as multisets of rows).
    full = ((raw * p["scale"] - p["mean"]) / p["std"]).astype(np.float32)
    assert _rows(np.concatenate([digits.train_x, digits.eval_x])) == _rows(full)
    train_rows = set(_rows(digits.train_x))
    assert all(r in train_rows for r in _rows(digits.calib_x)), "calibration samples must come from train"


def test_same_seed_gives_identical_arrays_other_seed_differs():
    a, b = load_dataset("digits", seed=7), load_dataset("digits", seed=7)
    for field in ("train_x", "train_y", "calib_x", "calib_y", "eval_x", "eval_y"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{field} differs (seed 7)")
    c = load_dataset("digits", seed=8)
    assert _rows(a.eval_x) != _rows(c.eval_x), "seeds 7 and 8 gave the same eval split"


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_normalized_training_pixels_have_zero_mean_unit_std(name, digits, mnist):
    s = {"digits": digits, "mnist": mnist}[name]
    mean, std = float(s.train_x.mean()), float(s.train_x.std())
    # Fixed constants (not re-measured per split), so allow a small deviation.
    assert abs(mean) < 0.05 and abs(std - 1) < 0.05, f"{name}: train mean {mean:.4f}, std {std:.4f} (seed 0)"
    assert s.preprocessing["formula"] == "(pixel * scale - mean) / std" and s.preprocessing["layout"] == "NCHW"


def test_mnist_is_the_packaged_5000_images(mnist):
    assert mnist.sizes() == {"train": 4000, "calib": 500, "eval": 1000}
    assert mnist.train_x.shape == (4000, 1, 28, 28) and mnist.eval_x.dtype == np.float32
    assert np.bincount(mnist.eval_y).tolist() == [100] * 10
    assert np.bincount(mnist.calib_y).tolist() == [50] * 10
    # Background pixels (0) map to -mean/std.
    background = -mnist.preprocessing["mean"] / mnist.preprocessing["std"]
    assert np.isclose(mnist.train_x.min(), background, atol=1e-6), (mnist.train_x.min(), background)


def test_stratified_sample_is_exact_and_proportional():
    y = np.array([0] * 7 + [1] * 2 + [2] * 11)
    idx = stratified_sample(y, 7, seed=3)
    assert len(idx) == 7 and len(np.unique(idx)) == 7
    # Shares 2.45, 0.70, 3.85 -> floors 2, 0, 3; the two left over go to the largest remainders (2, then 1).
    assert np.bincount(y[idx]).tolist() == [2, 1, 4]
    np.testing.assert_array_equal(idx, stratified_sample(y, 7, seed=3))
    with pytest.raises(ValueError, match="cannot draw 21"):
        stratified_sample(y, 21, seed=0)


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(EdgekilnError, match="unknown dataset 'cifar10'; known: mnist, digits"):
        load_dataset("cifar10")
