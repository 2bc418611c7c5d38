"""Run an int8 ``.tflite`` in LiteRT and in TFLite Micro and compare with onnxruntime on the QDQ model.

Layout convention (the writer's): rank-4 tensors are NHWC in the ``.tflite`` and NCHW in ONNX
and in eval ``.npz`` files, so rank-4 inputs are transposed NCHW -> NHWC before they are fed and
rank-4 outputs NHWC -> NCHW after. Inputs are quantized with the ``.tflite`` input tensor's scale
and zero point (the same parameters as the QDQ model's input QuantizeLinear); onnxruntime's float
output is mapped back onto the int8 grid of the ``.tflite`` output tensor, which is exact because
the QDQ graph ends in a DequantizeLinear with those same parameters.

Integer differences are counted in LSB of the output scale. TFLM is the integer reference: LiteRT
(with its default XNNPACK delegate) may differ from it by 1 LSB on a few per-channel outputs.

>>> rep = compare_tflite("model.tflite", "model_qdq.onnx", x)  # doctest: +SKIP
>>> rep["tflm"]["top1_agreement"], rep["tflm"]["max_abs_diff_lsb"]  # doctest: +SKIP
(1.0, 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError


def _nchw_to_tflite(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.ndim == 4:  # always, by the writer's convention (a C == H == W input looks the same both ways)
        x = x.transpose(0, 2, 3, 1)
    if tuple(x.shape) != tuple(shape):
        raise EdgekilnError(f"eval input shape {x.shape} does not match the .tflite input {tuple(shape)}")
    return x


def _tflite_to_nchw(y: np.ndarray) -> np.ndarray:
    return y.transpose(0, 3, 1, 2) if y.ndim == 4 else y


def quantize_for(x: np.ndarray, scale: float, zero_point: int, dtype: Any = np.int8) -> np.ndarray:
    """Quantize float ``x`` as ONNX QuantizeLinear does: round half to even, then saturate."""
    info = np.iinfo(dtype)
    q = np.rint(x.astype(np.float64) / np.float64(np.float32(scale))) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def _quantize_inputs(x: np.ndarray, det: dict[str, Any]) -> np.ndarray:
    """Float NCHW batch -> int8 batch in the .tflite's layout (each sample batch-1 shaped)."""
    shape = tuple(int(s) for s in det["shape"])
    return np.stack([quantize_for(_nchw_to_tflite(x[i: i + 1], shape), det["scale"], det["zero_point"],
                                  det["dtype"]) for i in range(x.shape[0])])


def _litert(tflite_path: str | Path, threads: int) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(tflite_path), num_threads=threads)
    it.allocate_tensors()
    ind, outd = it.get_input_details()[0], it.get_output_details()[0]
    in_det = {"shape": ind["shape"], "scale": float(ind["quantization"][0]),
              "zero_point": int(ind["quantization"][1]), "dtype": ind["dtype"], "index": ind["index"]}
    out_q = {"scale": float(outd["quantization"][0]), "zero_point": int(outd["quantization"][1]),
             "index": outd["index"]}
    return it, in_det, out_q


def _tflm(tflite_path: str | Path, arena_size: int | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from tflite_micro.python.tflite_micro import runtime

    data = Path(tflite_path).read_bytes()
    # NOTE: a generous arena on purpose; the arena *size* is measured separately, in child
    # processes, by edgekiln.codegen.tflite.tflm.tflm_arena (a too-small arena can crash the process).
    it = runtime.Interpreter.from_bytes(data, arena_size=arena_size or max(1 << 20, 10 * len(data)))
    ind, outd = it.get_input_details(0), it.get_output_details(0)
    iq, oq = ind["quantization_parameters"], outd["quantization_parameters"]
    in_det = {"shape": ind["shape"], "scale": float(iq["scales"][0]), "zero_point": int(iq["zero_points"][0]),
              "dtype": ind["dtype"]}
    return it, in_det, {"scale": float(oq["scales"][0]), "zero_point": int(oq["zero_points"][0])}


def run_litert_int8(tflite_path: str | Path, xq: np.ndarray, *, threads: int = 1) -> np.ndarray:
    """Run pre-quantized inputs ``xq`` (N, *tflite input shape) in LiteRT; outputs in .tflite layout."""
    it, ind, out_q = _litert(tflite_path, threads)
    outs = []
    for q in xq:
        it.set_tensor(ind["index"], np.ascontiguousarray(q))
        it.invoke()
        outs.append(it.get_tensor(out_q["index"]).copy())
    return np.stack(outs)


def run_tflm_int8(tflite_path: str | Path, xq: np.ndarray, *, arena_size: int | None = None) -> np.ndarray:
    """Run pre-quantized inputs ``xq`` (N, *tflite input shape) in TFLM; outputs in .tflite layout."""
    it, _, _ = _tflm(tflite_path, arena_size)
    outs = []
    for q in xq:
        it.set_input(np.ascontiguousarray(q), 0)
        it.invoke()
        outs.append(np.array(it.get_output(0), copy=True))
    return np.stack(outs)


def _to_batch(y: np.ndarray) -> np.ndarray:
    """(N, 1, ...) per-sample outputs -> (N, ...) in ONNX layout."""
    return np.concatenate([_tflite_to_nchw(s) for s in y], axis=0)


def run_litert(tflite_path: str | Path, x: np.ndarray, *, threads: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Run float NCHW ``x`` (batch N) one sample at a time in LiteRT; return int8 outputs and output qparams."""
    _, ind, out_q = _litert(tflite_path, threads)
    y = run_litert_int8(tflite_path, _quantize_inputs(x, ind), threads=threads)
    return _to_batch(y), {"scale": out_q["scale"], "zero_point": out_q["zero_point"]}


def run_tflm(tflite_path: str | Path, x: np.ndarray, *, arena_size: int | None = None) -> tuple[np.ndarray, dict]:
    """Run float NCHW ``x`` in TFLite Micro's Python interpreter; return int8 outputs and output qparams."""
    _, ind, out_q = _tflm(tflite_path, arena_size)
    return _to_batch(run_tflm_int8(tflite_path, _quantize_inputs(x, ind), arena_size=arena_size)), out_q


def run_ort_int8(qdq_onnx_path: str | Path, x: np.ndarray, out_q: dict[str, Any]) -> np.ndarray:
    """onnxruntime on the QDQ model (1 thread), its float output put back on the int8 output grid."""
    from edgekiln.execution.ort import ort_session

    sess = ort_session(Path(qdq_onnx_path))
    name = sess.get_inputs()[0].name
    y = np.concatenate([sess.run(None, {name: x[i: i + 1].astype(np.float32)})[0] for i in range(x.shape[0])])
    return quantize_for(y, out_q["scale"], out_q["zero_point"])


def compare_int8(y: np.ndarray, ref: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement (last axis) and the histogram of ``|y - ref|`` in LSB."""
    if y.shape != ref.shape:
        raise EdgekilnError(f"output shapes differ: {y.shape} vs reference {ref.shape}")
    diff = np.abs(y.astype(np.int32) - ref.astype(np.int32)).ravel()
    values, counts = np.unique(diff, return_counts=True)
    out: dict[str, Any] = {
        "n_inputs": int(y.shape[0]),
        "n_outputs": int(diff.size),
        "identical_fraction": float(np.mean(diff == 0)),
        "max_abs_diff_lsb": int(diff.max(initial=0)),
        "diff_histogram_lsb": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
    }
    if y.ndim == 2:
        flat_y, flat_r = y.reshape(len(y), -1), ref.reshape(len(ref), -1)
        agree = flat_y.argmax(1) == flat_r.argmax(1)
        out["top1_agreement"] = float(np.mean(agree))
        # NOTE: with every output within 1 LSB, the top-1 can only flip where the reference's
        # top-2 margin is <= 2 LSB; agreement on the other inputs is the meaningful check.
        top2 = np.sort(flat_r.astype(np.int32), axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2
        out["top1_clear_margin_inputs"] = int(clear.sum())
        out["top1_agreement_clear_margin"] = float(np.mean(agree[clear])) if clear.any() else 1.0
        if labels is not None and np.issubdtype(np.asarray(labels).dtype, np.integer):
            out["accuracy"] = float(np.mean(flat_y.argmax(1) == np.asarray(labels).ravel()[: len(y)]))
    return out


def compare_tflite(tflite_path: str | Path, qdq_onnx_path: str | Path, x: np.ndarray,
                   labels: np.ndarray | None = None, *, runtimes: tuple[str, ...] = ("litert", "tflm")) -> dict:
    """Run ``x`` through each runtime and compare with onnxruntime; returns ``{runtime: comparison}``.

    A runtime that cannot be imported is reported as ``{"skipped": reason}`` instead of failing.
    """
    x = np.asarray(x, dtype=np.float32)
    runners = {"litert": run_litert, "tflm": run_tflm}
    result: dict[str, Any] = {}
    ref: np.ndarray | None = None
    for name in runtimes:
        try:
            y, out_q = runners[name](tflite_path, x)
        except ImportError as exc:
            result[name] = {"skipped": f"{name} not installed ({exc.name})"}
            continue
        if ref is None:
            ref = run_ort_int8(qdq_onnx_path, x, out_q)
        cmp = compare_int8(y, ref, labels)
        if "accuracy" in cmp:
            cmp["onnxruntime_accuracy"] = float(np.mean(ref.reshape(len(ref), -1).argmax(1)
                                                        == np.asarray(labels).ravel()[: len(ref)]))
        result[name] = cmp
    return result
