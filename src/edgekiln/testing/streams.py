"""Seeded data streams for on-device learning: class clusters and a rotated/shifted domain.

numpy only (no torch, no scipy), so the tests, the benchmark and the demo make the same data.

>>> x, y = class_clusters(2, classes=(0, 1), seed=0)
>>> x.shape, y.tolist()
((4, 1, 8, 8), [0, 0, 1, 1])
>>> img = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
>>> bool((rotate_shift(img, 90.0) == np.rot90(img, axes=(-2, -1))).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CENTRE_SEED = 7919   # NOTE: a class's centre depends only on its index: models and streams agree


def class_centre(c: int, shape: tuple[int, ...] = (1, 8, 8)) -> np.ndarray:
    """Class ``c``'s mean image: seeded noise smoothed by a 3x3 box, scaled to unit std."""
    raw = np.random.default_rng([CENTRE_SEED, int(c)]).standard_normal(shape)
    pad = np.pad(raw, [(0, 0)] * (raw.ndim - 2) + [(1, 1), (1, 1)], mode="wrap")
    h, w = shape[-2:]
    smooth = sum(pad[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return (smooth / smooth.std()).astype(np.float32)


def class_clusters(n_per_class: int, *, classes: Sequence[int] = tuple(range(8)), shape: tuple[int, ...] = (1, 8, 8),
                   noise: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` samples of each class: its centre plus Gaussian noise of std ``noise``.
    Returns ``x`` (float32, ``(n, *shape)``) and ``y`` (int64), grouped by class."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in classes:
        xs.append(class_centre(c, shape)[None] + noise * rng.standard_normal((n_per_class, *shape)))
        ys.append(np.full(n_per_class, int(c), np.int64))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def rotate_shift(x: np.ndarray, degrees: float | tuple[float, float], shift: float | tuple[float, float] = 0.0,
                 seed: int = 0) -> np.ndarray:
    """Rotate each image of ``x`` (``[..., H, W]``) counter-clockwise about its centre and move it by
    ``shift`` pixels right and down, with bilinear interpolation and zeros outside. A range
    ``(lo, hi)`` draws each sample's angle (and shift) uniformly with ``seed``, the angle's sign
    too. 90 degrees is exactly ``np.rot90``; 0 degrees and no shift is the identity."""
    x = np.asarray(x, np.float32)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, *lead[1:], h, w) if lead else x.reshape(1, h, w)
    n = flat.shape[0]
    rng = np.random.default_rng(seed)
    if isinstance(degrees, tuple):
        angles = rng.uniform(*degrees, size=n) * rng.choice([-1.0, 1.0], size=n)
    else:
        angles = np.full(n, float(degrees))
    shifts = rng.uniform(*shift, size=n) if isinstance(shift, tuple) else np.full(n, float(shift))
    out = np.empty_like(flat)
    for k in range(n):
        out[k] = _warp(flat[k], np.deg2rad(angles[k]), shifts[k])
    return out.reshape(x.shape)


def _warp(img: np.ndarray, theta: float, shift: float) -> np.ndarray:
    h, w = img.shape[-2:]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    di, dj = ii - shift - cy, jj - shift - cx
    c, s = np.cos(theta), np.sin(theta)
    # NOTE: the inverse map of a counter-clockwise rotation (rows grow downwards); rounded to 1e-9
    # so that 90 degrees lands on pixel centres exactly and interpolates with weights 0 and 1.
    src_i = np.round(cy + c * di + s * dj, 9)
    src_j = np.round(cx - s * di + c * dj, 9)
    i0, j0 = np.floor(src_i).astype(int), np.floor(src_j).astype(int)
    fi, fj = (src_i - i0).astype(np.float32), (src_j - j0).astype(np.float32)
    out = np.zeros_like(img)
    for di_, dj_, wgt in ((0, 0, (1 - fi) * (1 - fj)), (1, 0, fi * (1 - fj)), (0, 1, (1 - fi) * fj), (1, 1, fi * fj)):
        r, q = i0 + di_, j0 + dj_
        ok = (r >= 0) & (r < h) & (q >= 0) & (q < w) & (wgt != 0)
        vals = np.zeros_like(img)
        vals[..., ok] = img[..., r[ok], q[ok]]
        out = out + vals * wgt
    return out
