"""Seeded partitions of a labelled dataset over federated clients: IID and Dirichlet(alpha).

Flower Datasets' partitioners work on Hugging Face datasets; ours are numpy arrays that ship
inside packages, so this module partitions index arrays directly. Every sample is assigned to
exactly one client, the result depends only on ``seed``, and no client is left empty.

Dirichlet(alpha) follows the usual label-skew recipe: for every class, the share of each client
is drawn from Dirichlet(alpha * 1); small alpha (0.1) gives clients a few dominant classes,
large alpha (100) approaches IID. :func:`label_skew` measures how far the clients are from
the global label distribution.

>>> import numpy as np
>>> y = np.repeat(np.arange(10), 40)
>>> parts = partition(y, PartitionSpec.parse("dirichlet:0.5"), clients=8, seed=0)
>>> sorted(np.concatenate(parts).tolist()) == list(range(400))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekiln.errors import EdgekilnError

SCHEMES = ("iid", "dirichlet")


@dataclass(frozen=True, kw_only=True)
class PartitionSpec:
    """How samples are spread over clients: ``iid`` or ``dirichlet`` with concentration ``alpha``."""

    scheme: str = "iid"
    alpha: float | None = None   # only for dirichlet; smaller = more skewed

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """``iid`` or ``dirichlet:ALPHA`` (the ``--partition`` flag).

        >>> PartitionSpec.parse("dirichlet:0.5")
        PartitionSpec(scheme='dirichlet', alpha=0.5)
        """
        name, _, arg = text.strip().partition(":")
        if name == "iid" and not arg:
            return cls(scheme="iid")
        if name == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                alpha = -1.0
            if not alpha > 0 or not np.isfinite(alpha):
                raise EdgekilnError(f"--partition {text!r}: dirichlet needs a positive alpha, e.g. dirichlet:0.5")
            return cls(scheme="dirichlet", alpha=alpha)
        raise EdgekilnError(f"--partition {text!r}: expected 'iid' or 'dirichlet:ALPHA'")

    def __str__(self) -> str:
        return "iid" if self.scheme == "iid" else f"dirichlet:{self.alpha:g}"


def partition(y: np.ndarray, spec: PartitionSpec, *, clients: int, seed: int) -> list[np.ndarray]:
    """Sorted index arrays, one per client, covering every row of ``y`` exactly once."""
    y = np.asarray(y)
    if clients < 1:
        raise EdgekilnError(f"--clients must be at least 1, got {clients}")
    if clients > len(y):
        raise EdgekilnError(f"--clients {clients}: more clients than the {len(y)} training samples")
    if spec.scheme == "iid":
        return iid_partition(len(y), clients, seed)
    if spec.scheme == "dirichlet" and spec.alpha is not None:
        return dirichlet_partition(y, clients, spec.alpha, seed)
    raise EdgekilnError(f"unknown partition scheme {spec.scheme!r}; known: {', '.join(SCHEMES)}")


def iid_partition(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into ``clients`` near-equal parts (sizes differ by at most one)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_partition(y: np.ndarray, clients: int, alpha: float, seed: int,
                        min_size: int = 2) -> list[np.ndarray]:
    """Label-skewed parts: for each class, client shares drawn from Dirichlet(alpha).

    Draws are repeated (same generator, so still deterministic) until every client holds at
    least ``min_size`` samples; after 100 draws the smallest clients take samples from the
    largest, so the function always returns.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    need = min(min_size, len(y) // clients)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= need:
            return [np.sort(p) for p in merged]
    # NOTE: reached only for extreme alpha with many clients: top up the smallest parts.
    merged.sort(key=len)
    while len(merged[0]) < need:
        merged[0], merged[-1] = np.concatenate([merged[0], merged[-1][:1]]), merged[-1][1:]
        merged.sort(key=len)
    return [np.sort(p) for p in merged]


def label_histogram(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``(clients, classes)`` sample counts."""
    return np.stack([np.bincount(np.asarray(y)[p], minlength=num_classes) for p in parts])


def label_skew(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 for a perfectly stratified split; 1 - 1/classes ~ 0.9 when every client holds one class.
    """
    hist = label_histogram(y, parts, num_classes).astype(np.float64)
    local = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    glob = hist.sum(0) / hist.sum()
    return float(0.5 * np.abs(local - glob).sum(1).mean())
