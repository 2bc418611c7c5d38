"""Evaluate an ONNX model on an npz file with a metric; higher is always better.

- ``accuracy``: top-1 against labels ``y``.
- ``cosine``: mean cosine similarity of outputs with a reference model's (or saved) outputs.
- ``sqnr``: signal-to-quantization-noise ratio in dB, ``20*log10(|y_ref| / |y - y_ref|)``.
- ``module:function``: your own ``f(outputs: np.ndarray, data: dict[str, np.ndarray]) -> float``.

The npz holds ``x`` (the model's single input) or arrays named after the model's inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

BUILTIN = ("accuracy", "cosine", "sqnr")


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: data file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise EdgekilnError(f"{path}: not an .npz of arrays ({exc})") from None


def model_feeds(session: Any, data: dict[str, np.ndarray], where: str = "data") -> dict[str, np.ndarray]:
    """Arrays for every model input: ``x`` for a single-input model, else by input name."""
    inputs = session.get_inputs()
    if "x" in data and len(inputs) == 1:
        return {inputs[0].name: data["x"]}
    missing = [i.name for i in inputs if i.name not in data]
    if missing:
        raise EdgekilnError(f"{where}: has no array for input(s) {', '.join(missing)} (arrays: {', '.join(data)})")
    return {i.name: data[i.name] for i in inputs}


def run_outputs(model_path: str | Path, data: dict[str, np.ndarray], *, batch_size: int = 64,
                where: str = "data") -> np.ndarray:
    """First output of the model over every row of the data (onnxruntime, 1 thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    feeds = model_feeds(sess, data, where)
    types = {i.name: i.type for i in sess.get_inputs()}
    n = len(next(iter(feeds.values())))
    if _quantizes_at_run_time(model_path):
        # NOTE: dynamic quantization picks one activation range per call: a batch of 64 shares
        # it, so its outputs differ from the batch-1 deployment being measured. Score at batch 1.
        batch_size = 1
    outs = []
    for i in range(0, n, batch_size):
        batch = {k: _cast(v[i:i + batch_size], types[k]) for k, v in feeds.items()}
        outs.append(sess.run(None, batch)[0])
    return np.concatenate(outs)


def _quantizes_at_run_time(model_path: str | Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file onnx can read: nothing to special-case
        return False
    return any(n.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeMatMul") for n in model.graph.node)


def _cast(a: np.ndarray, ort_type: str) -> np.ndarray:
    want = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}.get(ort_type)
    return a.astype(want) if want is not None and a.dtype != want else a


def evaluate(model_path: str | Path, eval_npz: str | Path, metric: str = "accuracy", *,
             reference_path: str | Path | None = None, batch_size: int = 64) -> float:
    """The metric of ``model_path`` on ``eval_npz`` (see module doc)."""
    return evaluate_detailed(model_path, eval_npz, metric, reference_path=reference_path,
                             batch_size=batch_size)["value"]


def evaluate_detailed(model_path: str | Path, eval_npz: str | Path, metric: str = "accuracy", *,
                      reference_path: str | Path | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Like :func:`evaluate`, with extra detail (``min`` cosine, the number of samples)."""
    data = load_npz(eval_npz)
    out = run_outputs(model_path, data, batch_size=batch_size, where=str(eval_npz))
    if metric == "accuracy":
        if "y" not in data:
            raise EdgekilnError(f"{eval_npz}: the accuracy metric needs labels 'y'")
        y = data["y"].reshape(-1)
        if len(y) != len(out):
            raise EdgekilnError(f"{eval_npz}: {len(y)} labels for {len(out)} inputs")
        return {"value": float((out.reshape(len(out), -1).argmax(1) == y).mean()), "n": len(y)}
    if metric in ("cosine", "sqnr"):
        ref = _reference(reference_path, data, batch_size, str(eval_npz))
        a, b = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
        if metric == "cosine":
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            return {"value": float(cos.mean()), "min": float(cos.min()), "n": len(cos)}
        noise = np.linalg.norm(a - b)
        return {"value": float(20 * np.log10(np.linalg.norm(b) / max(noise, 1e-12))), "n": len(a)}
    if ":" in metric:
        from edgekiln.models.torch_source import resolve_factory

        fn = resolve_factory(metric)
        return {"value": float(fn(out, data)), "n": len(out)}
    raise EdgekilnError(f"unknown metric '{metric}'; use one of {', '.join(BUILTIN)} or module:function")


def _reference(reference_path: str | Path | None, data: dict[str, np.ndarray], batch_size: int,
               where: str) -> np.ndarray:
    if reference_path is None:
        if "y" in data and data["y"].dtype.kind == "f":
            return data["y"]
        raise EdgekilnError(f"{where}: cosine/sqnr need reference outputs: a reference model, or float 'y' arrays")
    ref = Path(reference_path)
    if ref.suffix == ".npy":
        return np.load(ref, allow_pickle=False)
    return run_outputs(ref, data, batch_size=batch_size, where=where)
