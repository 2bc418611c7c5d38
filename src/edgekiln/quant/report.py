"""The `edgekiln quantize` run folder: the model, FP32 vs quantized on every runtime, the
sensitivity table and plot, calibration per tensor, and a parity check across runtimes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.models.run_folder import RunFolder
from edgekiln.quant.parity import first_divergence, runtime_runner
from edgekiln.quant.size import byte_breakdown
from edgekiln.report import md_table, new_figure, save_figure


def runtime_table(fp32: Path, quant: Path, *, runs: int, warmup: int,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """p50/p90 (1 thread, batch 1) of both models on every available runtime that runs ONNX
    (``input_shapes`` fixes dynamic input dimensions, as the intake resolved them)."""
    from edgekiln.execution.runtimes import available_runtimes, runs_file
    from edgekiln.execution.timing import benchmark

    rows = []
    for name, reason in available_runtimes().items():
        if reason or not runs_file(name, fp32):
            continue
        try:
            a = benchmark(fp32, runtime=name, runs=runs, warmup=warmup, input_shapes=input_shapes)
            b = benchmark(quant, runtime=name, runs=runs, warmup=warmup, input_shapes=input_shapes)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot load this model is reported, not fatal
            rows.append({"runtime": name, "error": str(exc).splitlines()[0][:160]})
            continue
        rows.append({"runtime": name, "fp32_p50": a.latency_ms["p50"], "fp32_p90": a.latency_ms["p90"],
                     "p50": b.latency_ms["p50"], "p90": b.latency_ms["p90"],
                     "speedup": a.latency_ms["p50"] / b.latency_ms["p50"]})
    return rows


DIVERGENCE_SAMPLES = 16   # inputs the per-layer localization runs (each through every prefix model)


def parity(quant: Path, data: dict[str, np.ndarray], limit: int = 64) -> dict[str, Any]:
    """Outputs of the quantized model on each runtime against onnxruntime with graph
    optimizations off (the QDQ reference semantics): top-1 agreement, max difference, and the
    first layer whose int8 activations differ by more than 1 LSB, with a likely cause."""
    from edgekiln.execution.feeds import batch_rows, npz_feeds, specs_from_session
    from edgekiln.execution.ort import ort_session
    from edgekiln.execution.runtimes import available_runtimes, load_session

    ref_sess = ort_session(Path(quant), optimize=False)
    rows = batch_rows(npz_feeds(data, specs_from_session(ref_sess), count=limit))
    ref = np.concatenate([ref_sess.run(None, r)[0] for r in rows])
    out: dict[str, Any] = {}
    for name, reason in available_runtimes().items():
        if reason or name == "litert":
            continue
        try:
            sess = load_session(quant, name)
            got = np.concatenate([sess.run(r)[0] for r in rows])
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": str(exc).splitlines()[0][:160]}
            continue
        a, b = got.reshape(len(got), -1), ref.reshape(len(ref), -1)
        out[name] = {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
                     "max_abs_diff": float(np.abs(a - b).max()), "samples": len(a)}
        try:
            out[name]["divergence"] = first_divergence(quant, rows[:DIVERGENCE_SAMPLES], runtime_runner(name),
                                                       runtime=name)
        except Exception as exc:  # noqa: BLE001 - localization is a diagnosis; its failure is reported, not fatal
            out[name]["divergence"] = {"error": str(exc).splitlines()[0][:160]}
    return out


def _divergence_cell(v: dict[str, Any]) -> str:
    d = v.get("divergence") or {}
    if "error" in d:
        return f"not localized: {d['error']}"
    if not d.get("checkpoints"):
        return d.get("note", "-")
    first = d.get("first")
    if first is None:
        return f"none (all {d['checkpoints']} int8 activations within 1 LSB)"
    return (f"`{first['layer']}` ({first['op']}, activation {first['index'] + 1} of {d['checkpoints']}): "
            f"{first['cause']}")


def write_quantize_report(out: Path, *, scheme: str, metric_name: str, fp32: Path, res: Any, runtimes: list[dict],
                          parity_result: dict[str, Any], config: dict[str, Any], model: Any) -> Path:
    """The run folder of `edgekiln quantize`; ``model`` is the quantized ModelArtifact (``res.path``)."""
    size_fp32, size = os.path.getsize(fp32), os.path.getsize(res.path)
    ort = next((r for r in runtimes if r["runtime"] == "onnxruntime" and "p50" in r), None)
    measured = [r for r in runtimes if "p50" in r]
    fastest = min(measured, key=lambda r: r["p50"])["runtime"] if measured else None
    slower = [{"runtime": r["runtime"], "fp32_p50": r["fp32_p50"], "p50": r["p50"]}
              for r in measured if r["p50"] > r["fp32_p50"]]
    data = {
        "scheme": scheme, "metric_name": metric_name, "metric_fp32": res.metric_fp32, "metric": res.metric,
        "drop": None if res.metric is None else res.metric_fp32 - res.metric,
        "model_bytes_fp32": size_fp32, "model_bytes": size, "size_ratio": size / size_fp32,
        "latency_ms_fp32": ort["fp32_p50"] if ort else None, "latency_ms": ort["p50"] if ort else None,
        "latency_by_runtime": runtimes, "fastest_runtime": fastest, "slower_than_fp32": slower,
        "kept_float": res.kept_float, "sensitivity": res.sensitivity, "attempts": res.attempts,
        "calibration": res.calibration, "parity": parity_result, "config": config,
        "rewrites": getattr(res, "rewrites", {}), "adaround": getattr(res, "adaround", {}),
        "speed": getattr(res, "speed", {}),
        "byte_breakdown": byte_breakdown(res.path),
    }
    plot = _sensitivity_plot(out, res.sensitivity)
    lines = [f"# edgekiln quantize: {scheme}", "",
             md_table(["", "FP32", scheme], [
                 [metric_name, _f(res.metric_fp32), _f(res.metric)],
                 ["size (bytes)", size_fp32, f"{size} ({size / size_fp32:.3f}x)"],
                 ["onnxruntime p50 ms (1 thread)", _f(data["latency_ms_fp32"]), _f(data["latency_ms"])]]), "",
             "## Latency by runtime (batch 1, 1 thread)", "",
             md_table(["runtime", "FP32 p50", "FP32 p90", "quantized p50", "quantized p90", "speed-up"],
                      [[r["runtime"], _f(r.get("fp32_p50")), _f(r.get("fp32_p90")), _f(r.get("p50")), _f(r.get("p90")),
                        _f(r.get("speedup")) if "speedup" in r else r.get("error", "")] for r in runtimes]), ""]
    if fastest:
        lines += [f"Fastest runtime for the quantized model on this machine: **{fastest}**.", ""]
    for s in slower:
        lines += [f"**Warning: slower than FP32 on {s['runtime']}**: {s['p50']:.4f} ms vs {s['fp32_p50']:.4f} ms.", ""]
    lines += ["## Parity across runtimes", "",
              md_table(["runtime", "top-1 agreement", "max abs diff", "first layer off by more than 1 LSB"],
                       [[k, _f(v.get("top1_agreement")),
                         _f(v.get("max_abs_diff")) if "max_abs_diff" in v else v.get("error"), _divergence_cell(v)]
                        for k, v in parity_result.items()]), "",
              "Reference: the same QDQ model in onnxruntime with graph optimizations off (the fake-quant "
              "simulation). Each int8 activation is read from the runtime through a prefix of the model ending "
              "there, so the runtime's own fusions apply.", ""]
    rw = data["rewrites"]
    if rw:
        lines += ["## Graph rewrites (int8-dynamic)", "",
                  f"Activation inputs smoothed: {len(rw.get('smoothed', {}))}; attention-mask fills softened: "
                  f"{rw.get('mask_fills', 0)}; residual adds kept out of SkipLayerNormalization: "
                  f"{rw.get('residual_sums', 0)}; embedding tables int8 per row: "
                  f"{', '.join(rw.get('embedding_tables', [])) or 'none'}.", ""]
    if data["adaround"]:
        lines += ["## AdaRound (learned rounding of int8 weights)", "",
                  md_table(["layer", "output MSE, nearest", "output MSE, as stored", "held-out MSE, nearest",
                            "held-out MSE, learned", "kept", "weights moved"],
                           [[k, f"{v['mse_nearest']:.4g}", f"{v['mse']:.4g}", f"{v['held_out_mse_nearest']:.4g}",
                             f"{v['held_out_mse_learned']:.4g}", "yes" if v["kept"] else "no (nearest)",
                             f"{v['flipped_weights']:,} of {v['weights']:,}"] for k, v in data["adaround"].items()]),
                  "", "Output MSE against the float layer on the calibration samples; a fifth of them is held out "
                  "of the fit and decides whether the layer keeps the learned rounding.", ""]
    lines += _speed_lines(data["speed"])
    lines += ["## Where the bytes go", "",
              md_table(["part", "bytes"], [[k, f"{v:,}"] for k, v in data["byte_breakdown"].items()]), ""]
    if res.kept_float:
        lines += [f"Kept in float to meet the budget: {', '.join(res.kept_float)}.", ""]
    if res.sensitivity:
        lines += ["## Per-layer sensitivity (metric with only this layer quantized)", "",
                  md_table(["layer", "metric", "damage", "float weight bytes"],
                           [[r["layer"], _f(r["metric_if_only_this_quantized"]), _f(r["damage"]), r["bytes_float"]]
                            for r in res.sensitivity]), ""]
        if plot:
            lines += [f"![sensitivity]({plot})", ""]
    if res.calibration:
        counts: dict[str, int] = {}
        for m in res.calibration.values():
            counts[m] = counts.get(m, 0) + 1
        lines += ["Calibration method per tensor: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                  + " (full list in report.json).", ""]
    return RunFolder(out).write(command="quantize", model=model, measurements=data, markdown="\n".join(lines))


def _speed_lines(sp: dict[str, Any]) -> list[str]:
    """The "kept float for speed" section: the rule's decision, its measurement, and each layer's reason."""
    if not sp:
        return []
    lines = ["## Kept float for speed (int8 speed rule)", ""]
    if sp.get("p50_ms"):
        p, q = sp["p50_ms"], sp.get("sqnr_db", {})
        lines += [md_table(["form", f"p50 ms on {sp.get('runtime')}", "SQNR dB (calibration samples)"],
                           [["with the rule", _f(p.get("on")), _f(q.get("on"))],
                            ["without", _f(p.get("off")), _f(q.get("off"))]]), ""]
    lines += [f"Rule {sp.get('rule')}: {'applied' if sp.get('applied') else 'not applied'} "
              f"({sp.get('decided_by', 'default')}).", ""]
    fused, floats = sp.get("fused_hardswish") or [], sp.get("float_for_speed") or {}
    if fused:
        lines += [f"HardSigmoid + Mul fused back into HardSwish before quantization: {len(fused)}.", ""]
    if floats:
        lines += [md_table(["layer", "why it stayed float"], [[k, v] for k, v in floats.items()]), ""]
    return lines


def _sensitivity_plot(out: Path, rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    fig, ax = new_figure(8, max(2.5, 0.3 * len(rows)))
    ax.barh([r["layer"] for r in rows][::-1], [r["damage"] for r in rows][::-1])
    ax.set_xlabel("metric drop when only this layer is quantized")
    save_figure(fig, out / "sensitivity.png")
    return "sensitivity.png"


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
