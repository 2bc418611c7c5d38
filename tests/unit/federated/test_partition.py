"""Partitioners: every sample assigned once, seeded, and the Dirichlet skew is measurable."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.federated.partition import PartitionSpec, label_histogram, label_skew, partition

# Labels shaped like the MNIST training part: 10 classes, 400 each.
LABELS = np.repeat(np.arange(10), 400)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:100"])
@pytest.mark.parametrize("seed", [0, 3])
def test_every_sample_assigned_exactly_once(spec: str, seed: int) -> None:
    parts = partition(LABELS, PartitionSpec.parse(spec), clients=20, seed=seed)
    joined = np.concatenate(parts)
    assert len(parts) == 20
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS))), f"{spec} seed {seed}: duplicates or gaps"
    assert min(len(p) for p in parts) >= 2, f"{spec} seed {seed}: smallest client {min(map(len, parts))}"


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_same_seed_same_partition_other_seed_differs(spec: str) -> None:
    a = partition(LABELS, PartitionSpec.parse(spec), clients=20, seed=7)
    b = partition(LABELS, PartitionSpec.parse(spec), clients=20, seed=7)
    c = partition(LABELS, PartitionSpec.parse(spec), clients=20, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in partition(LABELS, PartitionSpec.parse("iid"), clients=7, seed=0)]
    assert max(sizes) - min(sizes) <= 1, sizes


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    # Mean total-variation distance to the global label mix: ~0 for IID, ~0.9 for one class per client.
    skew = {spec: np.mean([label_skew(LABELS, partition(LABELS, PartitionSpec.parse(spec), clients=20, seed=s), 10)
                           for s in range(3)])
            for spec in ("iid", "dirichlet:100", "dirichlet:0.5", "dirichlet:0.1")}
    assert skew["iid"] < 0.15, skew
    assert skew["iid"] < skew["dirichlet:100"] + 0.05 < skew["dirichlet:0.5"] < skew["dirichlet:0.1"], skew
    assert skew["dirichlet:0.5"] > 0.35, f"Dirichlet(0.5) skew {skew['dirichlet:0.5']:.3f} <= 0.35"


def test_histogram_counts_add_up_to_the_class_sizes() -> None:
    parts = partition(LABELS, PartitionSpec.parse("dirichlet:0.5"), clients=20, seed=0)
    hist = label_histogram(LABELS, parts, 10)
    assert hist.shape == (20, 10)
    assert hist.sum(0).tolist() == [400] * 10


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:abc", "shards:2", "iid:3"])
def test_bad_partition_flag_is_a_user_error(text: str) -> None:
    with pytest.raises(EdgekilnError, match="--partition"):
        PartitionSpec.parse(text)


def test_more_clients_than_samples_is_a_user_error() -> None:
    with pytest.raises(EdgekilnError, match="more clients"):
        partition(np.arange(5), PartitionSpec.parse("iid"), clients=6, seed=0)
