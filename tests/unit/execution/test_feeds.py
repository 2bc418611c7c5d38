"""Feeds: random inputs of the right dtypes, .npz arrays mapped to the model's inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.execution.feeds import batch_rows, npz_feeds, random_feeds, specs_from_session
from edgekiln.execution.specs import TensorSpec

SPECS = (TensorSpec("ids", (2, 8), "int64"), TensorSpec("img", (2, 3, 4, 4), "uint8"),
         TensorSpec("mask", (2, 8), "bool"), TensorSpec("x", (2, 5), "float32"), TensorSpec("sr", (), "int32"))


def test_random_feeds_have_each_inputs_dtype_shape_and_a_safe_range():
    feeds = random_feeds(SPECS, seed=3)
    got = {k: (v.dtype.name, v.shape) for k, v in feeds.items()}
    assert got == {"ids": ("int64", (2, 8)), "img": ("uint8", (2, 3, 4, 4)), "mask": ("bool", (2, 8)),
                   "x": ("float32", (2, 5)), "sr": ("int32", ())}, got
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 100, (feeds["ids"].min(), feeds["ids"].max())
    assert feeds["mask"].any() and not feeds["mask"].all(), feeds["mask"]
    again = random_feeds(SPECS, seed=3)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds), "same seed, same feeds"


def test_random_feeds_refuse_an_unknown_dimension_by_name():
    with pytest.raises(EdgekilnError, match="input 'x' has unknown dimensions .*--input-shape x="):
        random_feeds([TensorSpec("x", (1, -1))])


def test_npz_feeds_map_x_to_the_first_input_and_names_to_inputs(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.arange(12, dtype=np.float64).reshape(6, 2), aux=np.ones((6, 4)),
             sr=np.array(16000))
    specs = [TensorSpec("input", (1, 2)), TensorSpec("aux", (1, 4), "int64"), TensorSpec("sr", (), "int32")]
    feeds = npz_feeds(tmp_path / "d.npz", specs, start=2, count=3)
    assert sorted(feeds) == ["aux", "input", "sr"]
    np.testing.assert_array_equal(feeds["input"], np.arange(4, 10, dtype=np.float32).reshape(3, 2))
    assert (feeds["input"].dtype, feeds["aux"].dtype, feeds["aux"].shape) == (np.float32, np.int64, (3, 4))
    assert feeds["sr"].dtype == np.int32 and int(feeds["sr"]) == 16000   # scalars are taken whole


def test_npz_feeds_prefer_a_name_over_x_and_name_what_is_missing():
    specs = [TensorSpec("x", (1, 2)), TensorSpec("y", (1, 2))]
    data = {"x": np.zeros((3, 2)), "y": np.ones((3, 2))}
    np.testing.assert_array_equal(npz_feeds(data, specs)["y"], np.ones((3, 2), np.float32))
    with pytest.raises(EdgekilnError, match=r"calib.npz: has no array for input\(s\) y \(arrays: x\)"):
        npz_feeds({"x": np.zeros((3, 2))}, specs, where="calib.npz")


def test_batch_rows_and_specs_from_session(tmp_path):
    rows = batch_rows({"a": np.arange(6).reshape(3, 2), "s": np.array(2)}, limit=2)
    assert [r["a"].tolist() for r in rows] == [[[0, 1]], [[2, 3]]] and int(rows[1]["s"]) == 2

    class Fake:   # the Session protocol
        input_names = ["tok", "img"]
        input_shapes = [[None, 16], [None, 3, None, None]]
        input_dtypes = [np.dtype("int64"), np.dtype("float32")]

    specs = specs_from_session(Fake(), {"img": (1, 3, 32, 32)}, batch=4)
    assert specs == (TensorSpec("tok", (4, 16), "int64"), TensorSpec("img", (1, 3, 32, 32), "float32")), specs
