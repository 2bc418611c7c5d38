"""Inputs for a model run: random feeds from input specs, feeds from ``.npz`` files, and the
input specs of an open session.

>>> from edgekiln.execution.specs import TensorSpec
>>> specs = [TensorSpec("ids", (1, 4), "int64"), TensorSpec("x", (1, 2), "float32")]
>>> {k: v.dtype.name for k, v in random_feeds(specs).items()}
{'ids': 'int64', 'x': 'float32'}
>>> npz_feeds({"x": np.zeros((3, 2)), "ids": np.ones((3, 4))}, specs, count=2)["ids"].shape
(2, 4)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.execution.specs import TensorSpec, numpy_dtype

# NOTE: integer inputs are usually indices (token ids, class ids): small non-negative values are
# valid for any embedding table of at least 100 rows. Byte inputs (uint8/int8) use their full range.
INT_HIGH = 100


def random_feeds(specs: Sequence[TensorSpec], *, seed: int = 0) -> dict[str, np.ndarray]:
    """One array per spec: floats standard normal, integers in ``[0, 100)``, uint8/int8 over
    their full range, bools half true. A dimension of -1 (unknown) is refused by name."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if any(d < 0 for d in spec.shape):
            raise EdgekilnError(f"input '{spec.name}' has unknown dimensions {list(spec.shape)}; give its shape "
                                f"with --input-shape {spec.name}=d0,d1,...")
        dtype = np.dtype(spec.dtype)
        if dtype == np.bool_:
            value = rng.random(spec.shape) < 0.5
        elif dtype in (np.uint8, np.int8):
            info = np.iinfo(dtype)
            value = rng.integers(info.min, int(info.max) + 1, size=spec.shape)
        elif dtype.kind in "iu":
            value = rng.integers(0, INT_HIGH, size=spec.shape)
        else:
            value = rng.standard_normal(spec.shape)
        feeds[spec.name] = np.asarray(value).astype(dtype)
    return feeds


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (no pickles), or a one-line error.

    >>> import tempfile
    >>> from edgekiln.testing.tiny import random_npz
    >>> load_npz(random_npz(tempfile.mkdtemp() + "/calib.npz", (1, 1, 8, 8), n=16))["x"].shape
    (16, 1, 8, 8)
    """
    path = Path(path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: data file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise EdgekilnError(f"{path}: not an .npz of arrays ({exc})") from None


def npz_feeds(data: str | Path | Mapping[str, np.ndarray], specs: Sequence[TensorSpec], *, start: int = 0,
              count: int | None = None, where: str | None = None) -> dict[str, np.ndarray]:
    """Arrays of ``data`` (an ``.npz`` path or its arrays) for every input in ``specs``: an
    array named like an input goes to it, ``x`` goes to the first input when no array has that
    name; rows ``start:start+count`` along axis 0, cast to the input's dtype. Scalar inputs
    (shape ``()``) take their array whole."""
    if isinstance(data, (str, Path)):
        where = where or str(data)
        data = load_npz(data)
    where = where or "data"
    names = [s.name for s in specs]
    mapping = {s.name: s.name for s in specs if s.name in data}
    if specs and specs[0].name not in mapping and "x" in data and "x" not in names:
        mapping[specs[0].name] = "x"
    missing = [n for n in names if n not in mapping]
    if missing:
        raise EdgekilnError(f"{where}: has no array for input(s) {', '.join(missing)} "
                            f"(arrays: {', '.join(data) or 'none'})")
    stop = None if count is None else start + count
    feeds = {}
    for spec in specs:
        arr = np.asarray(data[mapping[spec.name]])
        if len(spec.shape) > 0 and arr.ndim > 0:
            arr = arr[start:stop]
        dtype = np.dtype(spec.dtype)
        feeds[spec.name] = arr if arr.dtype == dtype else arr.astype(dtype)
    return feeds


def batch_rows(feeds: Mapping[str, np.ndarray], limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Split batched feeds into batch-1 feed dicts (at most ``limit``); scalars repeat.

    >>> len(batch_rows({"x": np.zeros((5, 2))}, limit=3))
    3
    """
    batched = [np.asarray(v).shape[0] for v in feeds.values() if np.asarray(v).ndim > 0]
    n = min(batched) if batched else 1
    n = n if limit is None else min(n, limit)
    return [{k: (v[i:i + 1] if np.asarray(v).ndim > 0 else v) for k, v in feeds.items()} for i in range(n)]


def calibration_feeds(model_path: str | Path, data: str | Path | Mapping[str, np.ndarray] | np.ndarray,
                      limit: int = 256) -> list[dict[str, np.ndarray]]:
    """One batch-1 feed dict per sample (at most ``limit``) for the inputs of the ONNX model at
    ``model_path``: ``data`` is an ``.npz`` path, named arrays (see :func:`npz_feeds`) or one
    array for the first input.

    >>> feeds = calibration_feeds("model.onnx", "calib.npz", limit=64)    # doctest: +SKIP
    """
    from edgekiln.execution.ort import ort_session

    specs = specs_from_session(ort_session(Path(model_path), optimize=False))
    if isinstance(data, np.ndarray):
        data = {specs[0].name: data}
    return batch_rows(npz_feeds(data, specs, count=limit), limit)


def specs_from_session(session: Any, fixed: Mapping[str, Sequence[int]] | None = None, batch: int = 1
                       ) -> tuple[TensorSpec, ...]:
    """The input specs of an open session (an onnxruntime ``InferenceSession`` or a
    :class:`~edgekiln.execution.runtimes.Session`): a shape in ``fixed`` wins, an unknown first
    dimension becomes ``batch``, other unknown dimensions stay -1."""
    fixed = dict(fixed or {})
    if hasattr(session, "get_inputs"):
        items = [(i.name, list(i.shape), numpy_dtype(i.type)) for i in session.get_inputs()]
    else:
        items = list(zip(session.input_names, session.input_shapes, session.input_dtypes, strict=True))
    specs = []
    for name, shape, dtype in items:
        if name in fixed:
            dims = tuple(int(d) for d in fixed[name])
        else:
            dims = tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0
                         else (batch if k == 0 else -1) for k, d in enumerate(shape))
        specs.append(TensorSpec(name, dims, np.dtype(dtype).name))
    return tuple(specs)
