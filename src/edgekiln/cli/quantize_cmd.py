"""`edgekiln quantize`: int8 / int8-dynamic / fp16 / int4-weight with an accuracy budget."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)


def quantize_command(
    model: str = typer.Argument(..., help="Float model (.onnx, file.py:factory, or a run folder)."),
    scheme: str = typer.Option("int8", "--scheme", help="int8 | int8-dynamic | fp16 | int4-weight"),
    calib: Path = typer.Option(None, "--calib", help="Calibration data (.npz); a run folder's calib.npz by default."),
    eval_: Path = typer.Option(None, "--eval", help="Evaluation data (.npz); a run folder's eval.npz by default."),
    metric: str = typer.Option("accuracy", "--metric", help="accuracy | cosine | sqnr | module:function"),
    max_drop: float = typer.Option(None, "--max-drop", help="Largest allowed metric drop, in its units."),
    calibration: str = typer.Option("minmax", "--calibration", help="minmax | percentile | entropy | mse | auto"),
    keep_float: list[str] = typer.Option(None, "--keep-float", help="Node name to leave in float (repeatable)."),
    symmetric: bool = typer.Option(None, "--symmetric-activations/--asymmetric-activations",
                                   help="int8 zero points. Default: asymmetric; transformers: symmetric "
                                        "except one-sided ranges (GELU outputs)."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor"),
    samples: int = typer.Option(256, "--calib-samples"),
    equalize: bool = typer.Option(False, "--equalize", help="Cross-layer equalization first (int8)."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="Correct each layer's mean shift (int8)."),
    adaround: bool = typer.Option(False, "--adaround",
                                  help="int8: learn each weight's rounding from its layer's output error (slower)."),
    smooth_alpha: float = typer.Option(0.7, "--smooth-alpha",
                                       help="Transformers: SmoothQuant strength in (0, 1); 0 turns smoothing off."),
    rewrites: bool = typer.Option(True, "--transformer-rewrites/--no-transformer-rewrites",
                                  help="Transformers: soft attention-mask fill; int8-dynamic: residual adds kept "
                                       "unfused; int8: only weighted MatMul inputs quantized."),
    outlier_rows: bool = typer.Option(True, "--outlier-rows/--no-outlier-rows",
                                      help="Transformers, int8: massive-activation leading rows in float."),
    runs: int = typer.Option(200, "--bench-runs", help="Timed runs per latency measurement."),
    out: Path = typer.Option(..., "--out"),
) -> None:
    """Quantize a model; report accuracy, size and latency against FP32 on every runtime."""
    from edgekiln.models.intake import load_model, run_folder_data
    from edgekiln.models.metrics import load_npz
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model
    from edgekiln.quant.report import parity, runtime_table, write_quantize_report

    data = run_folder_data(model)
    calib = calib or data.get("calib")
    eval_ = eval_ or data.get("eval")
    if max_drop is not None and eval_ is None:
        from edgekiln.errors import EdgekilnError

        raise EdgekilnError("--max-drop needs evaluation data: pass --eval EVAL.npz")
    cfg = QuantizeConfig.from_dict({"scheme": scheme, "calibration": calibration, "max_drop": max_drop,
                                    "keep_float": tuple(keep_float or ()), "symmetric_activations": symmetric,
                                    "per_channel": per_channel, "calib_samples": samples, "equalize": equalize,
                                    "bias_correction": bias_correction, "adaround": adaround,
                                    "smooth_alpha": smooth_alpha or None, "transformer_rewrites": rewrites,
                                    "outlier_rows": outlier_rows})
    art = load_model(model, work_dir=out / "input")
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("sensitivity", total=None)
        res = quantize_model(art.path, cfg, out, calib=calib, eval_npz=eval_, metric=metric,
                             progress=lambda i, n: bar.update(task, completed=i, total=n))
    runtimes = runtime_table(art.path, res.path, runs=runs, warmup=min(50, runs))
    par = parity(res.path, load_npz(eval_ or calib)) if (eval_ or calib) and cfg.scheme != "fp16" else {}
    write_quantize_report(out, scheme=scheme, metric_name=metric, fp32=art.path, res=res, runtimes=runtimes,
                          parity_result=par, config=cfg.to_dict())
    import json

    rep = json.loads((out / "report.json").read_text())
    typer.echo(f"{scheme}: {metric} {_f(rep['metric_fp32'])} -> {_f(rep['metric'])}, size {rep['size_ratio']:.3f}x, "
               f"onnxruntime p50 {_f(rep['latency_ms_fp32'])} -> {_f(rep['latency_ms'])} ms; "
               f"fastest runtime: {rep['fastest_runtime']}; report: {out / 'report.md'}")
    for s in rep["slower_than_fp32"]:
        typer.echo(f"warning: slower than FP32 on {s['runtime']} ({s['p50']:.4f} vs {s['fp32_p50']:.4f} ms)")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
