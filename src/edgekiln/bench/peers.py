"""The tools users would otherwise reach for, run the way their docs show, for comparisons.

Each function takes a float ONNX model and the same calibration data edgekiln gets, and writes
the peer's quantized model. ``ort_static_default`` keeps onnxruntime's defaults on purpose
(that is the baseline a user gets); the others use the settings the field notes found best.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return Reader()


def calibration_feeds(model_path: str | Path, calib: Mapping[str, np.ndarray] | np.ndarray,
                      limit: int = 256) -> list[dict[str, np.ndarray]]:
    """One feed dict per sample (batch 1), from an array (single input) or named arrays."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    arrays = {names[0]: np.asarray(calib)} if isinstance(calib, np.ndarray) else {n: np.asarray(calib[n]) for n in names}
    n = min(limit, len(next(iter(arrays.values()))))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]


def ort_static_default(fp32: str | Path, feeds: list[dict[str, np.ndarray]], out: str | Path) -> Path:
    """onnxruntime ``quantize_static`` with its defaults (QDQ, per-tensor, MinMax)."""
    from onnxruntime.quantization import quantize_static

    quantize_static(str(fp32), str(out), _reader(feeds))
    return Path(out)


def ort_dynamic_per_channel(fp32: str | Path, out: str | Path) -> Path:
    """onnxruntime ``quantize_dynamic`` on MatMul/Gemm with int8 per-channel weights (the fast
    setting on this CPU; Conv -> ConvInteger is 4-6x slower, so it is left float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
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

    quantized = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(quantized, str(out))
    return Path(out)


def openvino_session(path: str | Path, *, threads: int = 1, f32: bool = True,
                     fixed_shape: Mapping[str, list[int]] | None = None) -> Any:
    """A compiled OpenVINO model called like ``session(feeds) -> list of outputs``; with
    ``fixed_shape`` (input name -> shape) compiled for that shape only.

    NOTE: OpenVINO runs bf16 on AMX CPUs unless told f32; int8 layers stay int8 either way.
    """
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()
    model = core.read_model(str(path))
    if fixed_shape:
        model.reshape({i.get_any_name(): fixed_shape[i.get_any_name()] for i in model.inputs})
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer(feeds)
        return [np.asarray(result[o]) for o in compiled.outputs]

    return run


def onnxruntime_session(path: str | Path, *, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(None, feeds)


def time_session(run: Any, feeds: dict[str, np.ndarray], *, warmup: int = 50, runs: int = 300) -> dict[str, float]:
    """p50/p90 latency (ms) of ``run(feeds)`` after a warm-up, perf_counter per call."""
    import time

    for _ in range(warmup):
        run(feeds)
    t = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run(feeds)
        t[i] = (time.perf_counter() - start) * 1000.0
    return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)), "mean": float(t.mean())}


def time_interleaved(runs: Mapping[str, Any], feeds: Mapping[str, dict[str, np.ndarray]], *, warmup: int = 10,
                     rounds: int = 40, per_round: int = 5) -> dict[str, dict[str, float]]:
    """p50/p90 latency (ms) of several ``run(feeds)`` measured round-robin: each round times
    ``per_round`` calls of every model in turn, so load from other processes on a shared machine
    falls on all of them alike instead of on whichever happened to run during a busy spell."""
    import time

    for name, run in runs.items():
        for _ in range(warmup):
            run(feeds[name])
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run(feeds[name])
                samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
                   "mean": float(np.mean(t))} for name, t in samples.items()}


def predict(run: Any, arrays: Mapping[str, np.ndarray], batch: int = 1) -> np.ndarray:
    """Outputs of ``run`` over every row of ``arrays`` (first output, concatenated)."""
    n = len(next(iter(arrays.values())))
    outs = [run({k: v[i:i + batch] for k, v in arrays.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs)
