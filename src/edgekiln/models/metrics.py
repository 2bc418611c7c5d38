"""Evaluate an ONNX model on an npz file with a metric; higher is always better.

- ``accuracy``: top-1 against labels ``y``.
- ``cosine``: mean cosine similarity of outputs with a reference model's (or saved) outputs; with a
  reference model, every output is compared and each sample scores its worst output.
- ``sqnr``: signal-to-quantization-noise ratio in dB, ``20*log10(|y_ref| / |y - y_ref|)``; with a
  reference model, of the worst output.
- ``module:function``: your own ``f(outputs: np.ndarray, data: dict[str, np.ndarray]) -> float``.

The npz holds ``x`` (the model's first input) or arrays named after the model's inputs
(:func:`edgekiln.execution.feeds.npz_feeds`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.execution.feeds import load_npz

BUILTIN = ("accuracy", "cosine", "sqnr")


def run_outputs(model_path: str | Path, data: dict[str, np.ndarray], *, batch_size: int = 64,
                where: str = "data", runtime: str = "onnxruntime") -> np.ndarray:
    """First output of the model over every row of the data, on ``runtime`` (1 thread).

    >>> run_outputs("model.onnx", {"x": x}, runtime="openvino").shape    # doctest: +SKIP
    (100, 10)
    """
    return run_all_outputs(model_path, data, batch_size=batch_size, where=where, runtime=runtime)[0]


def run_all_outputs(model_path: str | Path, data: dict[str, np.ndarray], *, batch_size: int = 64,
                    where: str = "data", runtime: str = "onnxruntime") -> list[np.ndarray]:
    """Every output of the model over every row of the data, in the model's output order."""
    from edgekiln.execution.feeds import npz_feeds, specs_from_session
    from edgekiln.execution.runtimes import load_session

    sess = load_session(model_path, runtime, threads=1)
    specs = specs_from_session(sess)
    if runtime == "litert":
        # NOTE: LiteRT takes float NCHW feeds and quantizes/transposes them itself: do not cast.
        specs = tuple(dataclasses.replace(s, dtype=np.asarray(data.get(s.name, data.get("x"))).dtype.name)
                      for s in specs)
    feeds = npz_feeds(data, specs, where=where)
    n = len(next(iter(feeds.values())))
    declared = sess.input_shapes[0][0] if sess.input_shapes and sess.input_shapes[0] else None
    if declared is not None and declared > 0:
        batch_size = int(declared)   # the model fixes its batch size
    if _quantizes_at_run_time(model_path):
        # NOTE: dynamic quantization picks one activation range per call: a batch of 64 shares
        # it, so its outputs differ from the batch-1 deployment being measured. Score at batch 1.
        batch_size = 1
    # NOTE: a .tflite gives its outputs in its own dtype and layout (int8, NHWC): compare them as ONNX's
    run = getattr(sess, "run_as_onnx", sess.run)
    outs = [[np.asarray(o) for o in run({k: v[i:i + batch_size] for k, v in feeds.items()})]
            for i in range(0, n, batch_size)]
    return [np.concatenate([batch[j] for batch in outs]) for j in range(len(outs[0]))]


def _quantizes_at_run_time(model_path: str | Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file onnx can read: nothing to special-case
        return False
    return any(n.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeMatMul") for n in model.graph.node)


def evaluate(model_path: str | Path, eval_npz: str | Path, metric: str = "accuracy", *,
             reference_path: str | Path | None = None, batch_size: int = 64, runtime: str = "onnxruntime") -> float:
    """The metric of ``model_path`` on ``eval_npz`` (see module doc), run on ``runtime`` (one of
    :data:`edgekiln.execution.RUNTIMES`; a reference model always runs on onnxruntime).

    >>> evaluate("model.onnx", "eval.npz", "accuracy", runtime="openvino")    # doctest: +SKIP
    0.9812
    """
    return evaluate_detailed(model_path, eval_npz, metric, reference_path=reference_path,
                             batch_size=batch_size, runtime=runtime)["value"]


def evaluate_detailed(model_path: str | Path, eval_npz: str | Path, metric: str = "accuracy", *,
                      reference_path: str | Path | None = None, batch_size: int = 64,
                      runtime: str = "onnxruntime") -> dict[str, Any]:
    """Like :func:`evaluate`, with extra detail (``min`` cosine, the number of samples)."""
    data = load_npz(eval_npz)
    outs = run_all_outputs(model_path, data, batch_size=batch_size, where=str(eval_npz), runtime=runtime)
    out = outs[0]
    if metric == "accuracy":
        if "y" not in data:
            raise EdgekilnError(f"{eval_npz}: the accuracy metric needs labels 'y'")
        y = data["y"].reshape(-1)
        if len(y) != len(out):
            raise EdgekilnError(f"{eval_npz}: {len(y)} labels for {len(out)} inputs")
        return {"value": float((out.reshape(len(out), -1).argmax(1) == y).mean()), "n": len(y)}
    if metric in ("cosine", "sqnr"):
        refs = _reference(reference_path, data, batch_size, str(eval_npz))
        pairs = list(zip(outs, refs, strict=False))   # a saved reference holds the first output only
        if metric == "cosine":
            cos = np.min([_cosine_rows(a, b) for a, b in pairs], axis=0)
            return {"value": float(cos.mean()), "min": float(cos.min()), "n": len(cos), "outputs": len(pairs)}
        return {"value": min(_sqnr_db(a, b) for a, b in pairs), "n": len(out), "outputs": len(pairs)}
    if ":" in metric:
        from edgekiln.models.torch_source import resolve_factory

        fn = resolve_factory(metric)
        return {"value": float(fn(out, data)), "n": len(out)}
    raise EdgekilnError(f"unknown metric '{metric}'; use one of {', '.join(BUILTIN)} or module:function")


def _cosine_rows(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's output with its reference (rows: the first axis)."""
    a, b = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    b = ref.astype(np.float64)
    noise = np.linalg.norm(out.astype(np.float64).reshape(b.shape) - b)
    return float(20 * np.log10(np.linalg.norm(b) / max(noise, 1e-12)))


def _reference(reference_path: str | Path | None, data: dict[str, np.ndarray], batch_size: int,
               where: str) -> list[np.ndarray]:
    """The reference outputs: every output of a reference model, or the one saved array."""
    if reference_path is None:
        if "y" in data and data["y"].dtype.kind == "f":
            return [data["y"]]
        raise EdgekilnError(f"{where}: cosine/sqnr need reference outputs: a reference model, or float 'y' arrays")
    ref = Path(reference_path)
    if ref.suffix == ".npy":
        return [np.load(ref, allow_pickle=False)]
    return run_all_outputs(ref, data, batch_size=batch_size, where=where)
