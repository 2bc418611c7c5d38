"""Run folders of `edgekiln prune` and `edgekiln distill`: the same before/after measurement
(metric, parameters, MACs, size, host latency p50/p90) for both and a comparison plot, written
through :class:`edgekiln.models.run_folder.RunFolder`, so the folder feeds the next command
(``edgekiln quantize runs/pruned``).

NOTE: measuring host latency uses the timing loop of ``edgekiln.execution``, imported inside
:func:`measure`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPORT_KEYS = ("metric_before", "metric", "params_before", "params", "macs_before", "macs", "latency_ms_before",
               "latency_ms")


def measure(onnx_path: str | Path, eval_npz: str | Path | None, *, metric: str = "accuracy",
            reference: str | Path | None = None, runs: int = 200) -> dict[str, Any]:
    """Parameters and MACs (ONNX analysis, as `edgekiln inspect` counts them), file size, the metric
    on ``eval_npz`` (None without it) and onnxruntime latency (1 thread, batch 1, p50/p90 in ms)."""
    from edgekiln.execution.timing import benchmark
    from edgekiln.models.analysis import analyze
    from edgekiln.models.metrics import evaluate

    info = analyze(onnx_path)
    bench = benchmark(onnx_path, runtime="onnxruntime", threads=1, batch=1, warmup=min(50, runs), runs=runs)
    value = None
    if eval_npz is not None:
        value = float(evaluate(onnx_path, eval_npz, metric, reference_path=reference))
    return {"metric": value, "params": int(info.params), "macs": int(info.macs), "model_bytes": int(info.model_bytes),
            "peak_activation_bytes": int(info.peak_activation_bytes), "latency_ms": float(bench.latency_ms["p50"]),
            "latency_ms_p90": float(bench.latency_ms["p90"])}


def before_after(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The flat keys docs/report-schema.md promises: ``metric_before``/``metric``, ... plus ratios."""
    out: dict[str, Any] = {}
    for key in ("metric", "params", "macs", "model_bytes", "latency_ms", "latency_ms_p90", "peak_activation_bytes"):
        out[f"{key}_before"], out[key] = before[key], after[key]
    out["drop"] = None if before["metric"] is None or after["metric"] is None else before["metric"] - after["metric"]
    out["macs_reduction"] = 1 - after["macs"] / before["macs"] if before["macs"] else None
    out["size_ratio"] = after["model_bytes"] / before["model_bytes"]
    out["speedup_p50"] = before["latency_ms"] / after["latency_ms"] if after["latency_ms"] else None
    return out


def comparison_table(keys: Mapping[str, Any], metric_name: str, labels: tuple[str, str] = ("before", "after")) -> str:
    from edgekiln.report import md_table

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [[metric_name, f(keys["metric_before"], ".4f"), f(keys["metric"], ".4f")],
            ["parameters", f"{keys['params_before']:,}", f"{keys['params']:,}"],
            ["MACs", f"{keys['macs_before']:,}", f"{keys['macs']:,}"],
            ["model bytes", f"{keys['model_bytes_before']:,}", f"{keys['model_bytes']:,}"],
            ["host p50 ms (onnxruntime, 1 thread)", f(keys["latency_ms_before"], ".4f"), f(keys["latency_ms"], ".4f")],
            ["host p90 ms", f(keys["latency_ms_p90_before"], ".4f"), f(keys["latency_ms_p90"], ".4f")]]
    return md_table(["", *labels], rows)


def plot_comparison(keys: Mapping[str, Any], path: str | Path, metric_name: str,
                    labels: tuple[str, str] = ("before", "after")) -> Path:
    """Bars of the after/before ratio of parameters, MACs, size and latency, and the two metrics."""
    from edgekiln.report import new_figure, save_figure

    fig, (ax1, ax2) = new_figure(9, 3.5, ncols=2)
    names = ["params", "macs", "model_bytes", "latency_ms"]
    ratios = [keys[n] / keys[f"{n}_before"] if keys[f"{n}_before"] else 0.0 for n in names]
    ax1.bar(["parameters", "MACs", "size", "host p50"], ratios, color="tab:blue")
    ax1.axhline(1.0, color="grey", linestyle=":")
    ax1.set_ylabel(f"{labels[1]} / {labels[0]}")
    for i, r in enumerate(ratios):
        ax1.text(i, r, f"{r:.2f}", ha="center", va="bottom", fontsize=8)
    if keys["metric_before"] is not None and keys["metric"] is not None:
        vals = [keys["metric_before"], keys["metric"]]
        ax2.bar(list(labels), vals, color=["tab:grey", "tab:green"])
        ax2.set_ylim(min(vals) - 0.05, min(1.0, max(vals) + 0.02) if metric_name == "accuracy" else max(vals) * 1.02)
        for i, v in enumerate(vals):
            ax2.text(i, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel(metric_name)
    return save_figure(fig, path)


def write_prune_report(out: Path, *, keys: Mapping[str, Any], config: Any, result: Any,
                       sensitivity: Mapping[str, Any] | None) -> dict[str, Any]:
    """report.json/report.md, comparison.png and (with a scan) sensitivity.png for `edgekiln prune`;
    ``result`` is the pruned artifact (its ``data`` names the files it was tuned and evaluated on)."""
    from edgekiln.compress.sensitivity import Group, SensitivityPoint, plot_sensitivity
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.report import md_table

    record = dict(result.provenance[-1])
    plots = [plot_comparison(keys, out / "comparison.png", "accuracy").name]
    if sensitivity:
        pts = [SensitivityPoint(**p) for p in sensitivity["points"]]
        groups = [Group(g["name"], tuple(g["members"]), g["channels"]) for g in sensitivity.get("groups", [])]
        plots.append(plot_sensitivity(pts, sensitivity["baseline"], out / "sensitivity.png", groups=groups).name)
    unstructured = config.mode == "unstructured"
    data: dict[str, Any] = {
        **keys, "metric_name": "accuracy", "mode": config.mode, "config": config.to_dict(),
        "ratio": record.get("ratio", config.ratio), "layer_ratios": record.get("layer_ratios"),
        "sensitivity": sensitivity, "plots": plots,
    }
    if unstructured:
        data.update({"dense_bytes": record.get("dense_bytes"), "sparse_compressed_bytes":
                     record.get("sparse_compressed_bytes"), "note": record.get("note")})
    md = [f"# prune ({config.mode})", "", comparison_table(keys, "accuracy"), ""]
    if unstructured:
        md.append("Same dense work before and after (zeros are still multiplied): any host latency difference "
                  "above is measurement noise.")
    elif keys.get("macs_reduction") is not None:
        md.append(f"MACs removed: {100 * keys['macs_reduction']:.1f}%; speed-up (host p50): "
                  f"{keys['speedup_p50']:.2f}x; size ratio {keys['size_ratio']:.3f}.")
    if unstructured:
        md += ["", f"Weights: {record.get('dense_bytes'):,} bytes dense, {record.get('sparse_compressed_bytes'):,} "
               "bytes as compressed sparse (CSR + zlib).", "", f"**Note: {record.get('note')}.**"]
    if data["layer_ratios"]:
        md += ["", "Per-layer ratios from the sensitivity scan:", "",
               md_table(["group", "ratio"], sorted(data["layer_ratios"].items()))]
    md += ["", *[f"![{p}]({p})" for p in plots]]
    run = RunFolder(out)
    run.write(command="prune", model=result, measurements=data, markdown="\n".join(md))
    return run.report()


def write_distill_report(out: Path, *, keys: Mapping[str, Any], config: Any, result: Any, metric_name: str,
                         no_kd: Mapping[str, Any] | None) -> dict[str, Any]:
    """report.json/report.md and comparison.png (teacher vs student) for `edgekiln distill`."""
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.report import md_table

    record = dict(result.provenance[-1])
    # NOTE: with student "self" (after a prune) the input is the student before KD, not the teacher.
    labels = ("before KD", "after KD") if config.student == "self" else ("teacher", "student")
    plots = [plot_comparison(keys, out / "comparison.png", metric_name, labels=labels).name]
    data: dict[str, Any] = {
        **keys, "metric_name": metric_name, "config": config.to_dict(), "student": config.student,
        "before_is": "student before KD" if config.student == "self" else "teacher",
        "student_kwargs": dict(config.student_kwargs), "params_ratio": keys["params"] / keys["params_before"],
        "metric_no_kd": None if no_kd is None else no_kd["metric"],
        "kd_gain": None if no_kd is None or keys["metric"] is None else keys["metric"] - no_kd["metric"],
        "history": record.get("history"), "plots": plots,
    }
    md = [f"# distill: {config.student} from the teacher", "",
          f"Temperature {config.temperature}, alpha {config.alpha} (soft-target weight), {config.epochs} epochs, "
          f"mode {config.mode}" + (f", hint {config.hint_student_layer} -> {config.hint_teacher_layer} "
                                   f"(weight {config.hint_weight})" if config.hint_student_layer else "") + ".", "",
          comparison_table(keys, metric_name, labels=labels), "",
          f"Student parameters: {data['params_ratio']:.3f}x the input model's."]
    if no_kd is not None:
        md += ["", md_table(["student trained", metric_name], [["with KD", f"{keys['metric']:.4f}"],
                                                               ["without KD (same seed)", f"{no_kd['metric']:.4f}"]])]
    md += ["", *[f"![{p}]({p})" for p in plots]]
    run = RunFolder(out)
    run.write(command="distill", model=result, measurements=data, markdown="\n".join(md))
    return run.report()
