"""Activation calibration: collect statistics, then choose each tensor's range.

Statistics are gathered by running the float model in onnxruntime with the chosen intermediate
tensors exposed as extra outputs, batch by batch. Per tensor we keep the exact min/max and a
bounded, seeded reservoir of values (at most ``RESERVOIR`` per tensor), so memory stays flat
however large the calibration set is.

Methods (each returns a range that contains 0):
- ``minmax``: the observed extremes.
- ``percentile``: the 0.01 / 99.99 percentiles (clips rare outliers).
- ``entropy``: the clipping threshold minimizing the KL divergence between the tensor's
  histogram and its 255-level quantized version (the TensorRT calibration procedure).
- ``mse``: the clipping ratio minimizing the mean squared error of fake-quantization.
- ``auto``: per tensor that feeds a Conv/Gemm/MatMul, the candidate (of the four above)
  whose fake-quantized input gives the smallest error in *that layer's output* on calibration
  samples; other tensors use ``mse``. The winner per tensor is recorded.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekiln.quant.qparams import compute_qparams, fake_quant

RESERVOIR = 200_000
METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
QUANTIZED_OPS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat",
                 "Relu", "Clip", "Sigmoid", "Softmax", "Reshape", "Flatten", "Transpose", "Resize", "Gather",
                 "Squeeze", "Unsqueeze", "Split", "LeakyRelu", "ConvTranspose", "Where", "Pad", "Sub", "Div"}


# NOTE: a range whose smaller side is under this share of its larger one (GELU and ReLU outputs)
# is quantized asymmetrically when symmetry is left to the tensor: symmetric int8 would leave
# half of its levels unused there. Two-sided tensors go symmetric, which OpenVINO runs faster.
ONE_SIDED = 0.25


@dataclass(frozen=True)
class TensorRange:
    lo: float
    hi: float
    method: str
    symmetric: bool = False


def one_sided(lo: float, hi: float) -> bool:
    """Whether a range is (nearly) all on one side of zero."""
    return min(-lo, hi) < ONE_SIDED * max(-lo, hi)


def calibration_reader(feeds: Sequence[dict[str, np.ndarray]]) -> Any:
    """onnxruntime's ``CalibrationDataReader`` over ``feeds`` (one feed dict per calibration
    batch), rewindable, for ``onnxruntime.quantization.quantize_static``.

    >>> x = np.zeros((1, 4), np.float32)
    >>> reader = calibration_reader([{"x": x}, {"x": x + 1}])
    >>> [float(f["x"].sum()) for f in iter(reader.get_next, None)]
    [0.0, 4.0]
    >>> reader.rewind(); reader.get_next()["x"].shape
    (1, 4)
    """
    from onnxruntime.quantization import CalibrationDataReader

    class _FeedsReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _FeedsReader()


@dataclass
class TensorStats:
    lo: float = np.inf
    hi: float = -np.inf
    seen: int = 0
    sample: np.ndarray | None = None
    keys: np.ndarray | None = None


def default_tensors(model: Any) -> list[str]:
    """Float activations that a QDQ quantizer quantizes: inputs/outputs of quantizable ops
    (graph inputs included, weights excluded)."""
    inits = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        for t in [*node.input, *node.output]:
            if t and t not in inits and t not in names:
                names.append(t)
    return names


def collect(model: Any, feeds: Sequence[dict[str, np.ndarray]], tensors: Sequence[str], *, seed: int = 0,
            batch: int = 16) -> dict[str, TensorStats]:
    """Run ``model`` on ``feeds`` (one dict per sample) and gather statistics for ``tensors``."""
    from edgekiln.execution.ort import intermediates_runner

    run = intermediates_runner(model, tensors)
    batch = fixed_batch(model) or batch
    rng = np.random.default_rng(seed)
    stats = {t: TensorStats() for t in tensors}
    for i in range(0, len(feeds), batch):
        chunk = feeds[i:i + batch]
        joined = {k: np.concatenate([f[k] for f in chunk]) for k in chunk[0]}
        values = run(joined)
        for t in tensors:
            if t not in values:
                continue
            v = np.asarray(values[t])
            if v.dtype.kind != "f":
                continue
            _update(stats[t], v.reshape(-1).astype(np.float32), rng)
    return {t: s for t, s in stats.items() if s.seen}


def fixed_batch(model: Any) -> int | None:
    """The first input's batch size when the model fixes it (then samples cannot be stacked)."""
    inits = {i.name for i in model.graph.initializer}
    for i in model.graph.input:
        if i.name not in inits:
            dims = i.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return None


def _update(s: TensorStats, v: np.ndarray, rng: np.random.Generator) -> None:
    """Exact min/max; a uniform sample of everything seen so far (each value gets a random key,
    the ``RESERVOIR`` smallest keys are kept: the same sample however the data is batched)."""
    s.lo, s.hi = min(s.lo, float(v.min())), max(s.hi, float(v.max()))
    keys = rng.random(len(v))
    vals = v
    if s.sample is not None:
        vals, keys = np.concatenate([s.sample, v]), np.concatenate([s.keys, keys])
    if len(vals) > RESERVOIR:
        idx = np.argpartition(keys, RESERVOIR)[:RESERVOIR]
        vals, keys = vals[idx], keys[idx]
    s.sample, s.keys = vals, keys
    s.seen += len(v)


def range_for(s: TensorStats, method: str, *, symmetric: bool = False) -> tuple[float, float]:
    """The calibration range of one tensor by one method."""
    x = s.sample if s.sample is not None else np.array([s.lo, s.hi], np.float32)
    if method == "minmax":
        return s.lo, s.hi
    if method == "percentile":
        lo, hi = np.percentile(x, [0.01, 99.99])
        return float(min(lo, 0.0)), float(max(hi, 0.0))
    if method == "mse":
        return _mse_range(x, s.lo, s.hi, symmetric)
    if method == "entropy":
        return _entropy_range(x, s.lo, s.hi)
    raise ValueError(f"unknown calibration method {method!r}")


def _mse_range(x: np.ndarray, lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    best, best_err = (lo, hi), np.inf
    for r in np.linspace(0.2, 1.0, 41):
        cand = (min(lo * r, 0.0), max(hi * r, 0.0))
        qp = compute_qparams(*cand, symmetric=symmetric)
        err = float(np.mean((fake_quant(x, qp) - x) ** 2))
        if err < best_err - 1e-15:
            best, best_err = cand, err
    return float(best[0]), float(best[1])


def _entropy_range(x: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """KL-divergence thresholds, searched separately for the positive and the negative side
    (each side gets its share of the 255 levels); a side holding under 1% of the values keeps
    its extreme, since a threshold fitted to a handful of values is noise."""
    pos, neg = x[x > 0], -x[x < 0]
    n = max(len(x), 1)
    levels_pos = max(16, int(round(255 * len(pos) / max(len(pos) + len(neg), 1))))
    hi_t = _kl_threshold(pos, levels_pos) if len(pos) > 0.01 * n else hi
    lo_t = -_kl_threshold(neg, max(16, 255 - levels_pos)) if len(neg) > 0.01 * n else lo
    return float(max(lo, min(lo_t, 0.0))), float(min(hi, max(hi_t, 0.0)))


def _kl_threshold(a: np.ndarray, levels: int, bins: int = 2048) -> float:
    top = float(a.max()) if len(a) else 0.0
    if top == 0:
        return 0.0
    hist, edges = np.histogram(a, bins=bins, range=(0, top))
    hist = hist.astype(np.float64)
    best_t, best_kl = top, np.inf
    for i in range(max(levels, 16), bins + 1, 16):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()           # clipped mass goes to the last bin
        q = np.zeros(i)                      # quantize into `levels` groups, spread back uniformly
        for g in np.array_split(np.arange(i), levels):
            nz = hist[g] > 0
            if nz.any():
                q[g[nz]] = hist[g].sum() / nz.sum()
        mask = p > 0
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-12)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_t = kl, float(edges[i])
    return best_t


def choose_ranges(model: Any, feeds: Sequence[dict[str, np.ndarray]], method: str, *,
                  tensors: Sequence[str] | None = None, symmetric: bool | None = False,
                  seed: int = 0) -> dict[str, TensorRange]:
    """Calibrate every tensor (default: :func:`default_tensors`) with ``method``; ``symmetric``
    None lets each tensor choose: asymmetric when its range is :func:`one_sided`."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    names = list(tensors) if tensors is not None else default_tensors(model)
    # NOTE: the accuracy-budget search and the form choice quantize the same graph with the same
    # samples dozens of times (each layer kept float in turn): collecting the statistics was 3.5 of
    # the 6.3 s each such quantization took on MNASNet-0.5. Same graph, samples and settings: same ranges.
    key = _ranges_key(model, feeds, method, names, symmetric, seed)
    if key in _RANGES:
        _RANGES.move_to_end(key)
        return dict(_RANGES[key])
    out = _choose_ranges(model, feeds, method, names, symmetric, seed)
    _RANGES[key] = dict(out)
    while len(_RANGES) > RANGES_KEPT:
        _RANGES.popitem(last=False)
    return out


RANGES_KEPT = 8   # calibrations remembered in this process (a few KB each)
_RANGES: OrderedDict[str, dict[str, TensorRange]] = OrderedDict()


def _ranges_key(model: Any, feeds: Sequence[dict[str, np.ndarray]], method: str, names: Sequence[str],
                symmetric: bool | None, seed: int) -> str:
    """A digest of everything :func:`choose_ranges` reads: the graph and weights, the samples, the settings."""
    h = hashlib.blake2b(digest_size=20)
    h.update(model.graph.SerializeToString(deterministic=True))
    for f in feeds:
        for k in sorted(f):
            v = np.ascontiguousarray(f[k])
            h.update(f"{k}:{v.dtype}:{v.shape}".encode())
            h.update(v.data)
    h.update(repr((method, list(names), symmetric, seed)).encode())
    return h.hexdigest()


def _choose_ranges(model: Any, feeds: Sequence[dict[str, np.ndarray]], method: str, names: list[str],
                   symmetric: bool | None, seed: int) -> dict[str, TensorRange]:
    stats = collect(model, feeds, names, seed=seed)
    sym = {t: (not one_sided(s.lo, s.hi)) if symmetric is None else symmetric for t, s in stats.items()}
    if method != "auto":
        out = {t: TensorRange(*range_for(s, method, symmetric=sym[t]), method, sym[t]) for t, s in stats.items()}
    else:
        out = _auto(model, feeds, stats, sym)
    # NOTE: graph outputs (logits, embeddings) are never clipped: clipping the largest logit
    # changes the prediction, which no per-tensor error measure sees.
    for o in model.graph.output:
        if o.name in stats:
            out[o.name] = TensorRange(stats[o.name].lo, stats[o.name].hi, "minmax", sym[o.name])
    return out


def _auto(model: Any, feeds: Sequence[dict[str, np.ndarray]], stats: dict[str, TensorStats],
          symmetric: dict[str, bool]) -> dict[str, TensorRange]:
    """Per layer input: the candidate range with the smallest error in the layer's own output."""
    out = {t: TensorRange(*range_for(s, "mse", symmetric=symmetric[t]), "mse", symmetric[t]) for t, s in stats.items()}
    inits = {i.name: i for i in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[0] in stats]
    if not layers:
        return out
    sample = feeds[: min(16, len(feeds))]
    acts = _activations(model, sample, [n.input[0] for n in layers])
    for node in layers:
        t = node.input[0]
        x = acts.get(t)
        if x is None:
            continue
        run = _single_node(node, inits, model)
        if run is None:
            continue
        ref = run(x)
        best, best_err, sym = None, np.inf, symmetric[t]
        for m in ("minmax", "percentile", "entropy", "mse"):
            lo, hi = range_for(stats[t], m, symmetric=sym)
            err = float(np.mean((run(fake_quant(x, compute_qparams(lo, hi, symmetric=sym))) - ref) ** 2))
            if err < best_err:
                best, best_err = TensorRange(lo, hi, m, sym), err
        out[t] = best
    return out


def _activations(model: Any, feeds: Sequence[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    from edgekiln.execution.ort import run_with_intermediates

    step = fixed_batch(model) or len(feeds)
    batches = [{k: np.concatenate([f[k] for f in feeds[i:i + step]]) for k in feeds[0]}
               for i in range(0, len(feeds), step)]
    return run_with_intermediates(model, batches, names)


def _single_node(node: Any, inits: dict[str, Any], model: Any) -> Any:
    """A callable running just ``node`` (its weights included) in onnxruntime."""
    import onnx
    from onnx import helper

    from edgekiln.execution.ort import ort_session

    if any(i and i not in inits for i in node.input[1:]):
        return None  # a second activation input (MatMul of two activations): not a layer with weights
    x_name, y_name = node.input[0], node.output[0]
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(y_name, onnx.TensorProto.FLOAT, None)],
                              [inits[i] for i in node.input[1:] if i])
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    try:
        sess = ort_session(m)
    except Exception:  # noqa: BLE001
        return None
    return lambda x: sess.run(None, {x_name: x.astype(np.float32)})[0]
