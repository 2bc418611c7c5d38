"""The tools users would otherwise reach for, run the way their docs show, for comparisons.

Each function takes a float ONNX model and the same calibration data edgekiln gets, and writes
the peer's quantized model. ``ort_static_default`` keeps onnxruntime's defaults on purpose
(that is the baseline a user gets); the others use the settings the field notes found best.
Peers that run onnxruntime on the model get it with the IR version and opset onnxruntime reads
(:func:`edgekiln.execution.readable_file`), as edgekiln's own passes do.
Every model, edgekiln's and the peers', is run and timed the same way: through edgekiln's runtime
adapters (:func:`edgekiln.execution.load_session`) and its one timing loop
(:func:`edgekiln.execution.time_round_robin`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.execution import latency_stats, load_session, lower_for_ort, readable_file
from edgekiln.execution.timing import time_round_robin_wall_and_cpu
from edgekiln.quant.calibration import calibration_reader

Feeds = dict[str, np.ndarray]


def ort_static_default(fp32: str | Path, feeds: list[dict[str, np.ndarray]], out: str | Path) -> Path:
    """onnxruntime ``quantize_static`` with its defaults (QDQ, per-tensor, MinMax)."""
    from onnxruntime.quantization import quantize_static

    quantize_static(str(readable_file(fp32, Path(out).parent)), str(out), calibration_reader(feeds))
    return Path(out)


def ort_dynamic_per_channel(fp32: str | Path, out: str | Path) -> Path:
    """onnxruntime ``quantize_dynamic`` on MatMul/Gemm with int8 per-channel weights (the fast
    setting on this CPU; Conv -> ConvInteger is 4-6x slower, so it is left float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(readable_file(fp32, Path(out).parent)), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     weight_type=QuantType.QInt8)
    return Path(out)


def nncf_openvino(fp32: str | Path, feeds: list[dict[str, np.ndarray]], out_xml: str | Path,
                  *, transformer: bool = False) -> Path:
    """``nncf.quantize`` on the OpenVINO model (its recommended flow); writes OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    single = len(feeds[0]) == 1
    data = nncf.Dataset([next(iter(f.values())) if single else f for f in feeds])
    kwargs: dict[str, Any] = {"subset_size": len(feeds)}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, data, **kwargs)
    ov.save_model(quantized, str(out_xml))
    return Path(out_xml)


def nncf_openvino_cosine_budget(fp32: str | Path, feeds: list[dict[str, np.ndarray]],
                                evals: list[tuple[dict[str, np.ndarray], np.ndarray]], out_xml: str | Path,
                                *, max_drop: float) -> Path:
    """``nncf.quantize_with_accuracy_control`` on the OpenVINO model: NNCF's own answer to an
    accuracy budget (layers go back to float until the mean cosine with ``evals``' reference
    embeddings drops by at most ``max_drop``). Writes OpenVINO IR.

    NOTE: default model type: with ``ModelType.TRANSFORMER`` (SmoothQuant) each revert made MiniLM
    worse here (drop 0.009 -> 0.53 -> 0.63 -> ...) and the search gave up.
    """
    import nncf
    import openvino as ov

    def mean_cosine(compiled: Any, data: Any) -> tuple[float, list[float]]:
        out, values = compiled.outputs[0], []
        for sample, ref in data:
            emb = np.asarray(compiled(sample)[out]).reshape(-1)
            values.append(float(emb @ ref / (np.linalg.norm(emb) * np.linalg.norm(ref))))
        return float(np.mean(values)), values

    nncf.set_log_level(logging.WARNING)   # NOTE: it logs every revert at INFO
    model = ov.Core().read_model(str(fp32))
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(feeds), nncf.Dataset(evals), validation_fn=mean_cosine, max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=len(feeds))
    ov.save_model(quantized, str(out_xml))
    return Path(out_xml)


def nncf_onnx(fp32: str | Path, feeds: list[dict[str, np.ndarray]], out: str | Path) -> Path:
    """``nncf.quantize`` on the ONNX model: a QDQ ONNX model that onnxruntime runs."""
    import nncf
    import onnx

    quantized = nncf.quantize(lower_for_ort(onnx.load(str(fp32))), nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(quantized, str(out))
    return Path(out)


def openvino_session(path: str | Path, *, threads: int = 1,
                     fixed_shape: Mapping[str, Sequence[int]] | None = None) -> Callable[[Feeds], list[np.ndarray]]:
    """``run(feeds) -> outputs`` of ``path`` (ONNX or OpenVINO IR) in edgekiln's OpenVINO adapter
    (f32 precision hint, one stream, latency hint); with ``fixed_shape`` (input name -> shape)
    compiled for that shape only."""
    shapes = {k: tuple(v) for k, v in fixed_shape.items()} if fixed_shape else None
    return load_session(path, "openvino", threads=threads, input_shapes=shapes).run


def onnxruntime_session(path: str | Path, *, threads: int = 1) -> Callable[[Feeds], list[np.ndarray]]:
    """``run(feeds) -> outputs`` of ``path`` in edgekiln's onnxruntime adapter (CPU, sequential)."""
    return load_session(path, "onnxruntime", threads=threads).run


def time_interleaved(runs: Mapping[str, Callable[[Feeds], Any]], feeds: Mapping[str, Feeds], *, warmup: int = 10,
                     rounds: int = 40, per_round: int = 5) -> dict[str, dict[str, float]]:
    """Latency statistics (ms; p50, p90, mean, ... of wall time, and ``cpu_p50``: this process's CPU time
    per call) of several ``run(feeds)`` timed round-robin: each round times ``per_round`` calls of every
    model in turn, so load from other processes on a shared machine falls on all of them alike
    instead of on whichever happened to run during a busy spell."""
    calls = {name: functools.partial(run, feeds[name]) for name, run in runs.items()}
    wall, cpu = time_round_robin_wall_and_cpu(calls, rounds=rounds, warmup=warmup, per_turn=per_round)
    return {name: {**latency_stats(t), "cpu_p50": float(np.median(cpu[name]))} for name, t in wall.items()}


def predict(run: Any, arrays: Mapping[str, np.ndarray], batch: int = 1) -> np.ndarray:
    """Outputs of ``run`` over every row of ``arrays`` (first output, concatenated)."""
    n = len(next(iter(arrays.values())))
    outs = [run({k: v[i:i + batch] for k, v in arrays.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs)
