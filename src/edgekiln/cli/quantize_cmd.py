"""`edgekiln quantize`: int8 / int8-dynamic / fp16 / int4-weight with an accuracy budget.

Thin: the options become a :class:`~edgekiln.passes.quantize.QuantizeConfig` (whose fields hold
the help texts) and :func:`edgekiln.api.quantize` does the rest, as it does for Python callers.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgekiln.cli.options import config_option, input_shape_option
from edgekiln.passes.quantize import QuantizeConfig as Q


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)


def quantize_command(
    model: str = typer.Argument(..., help="Float model (.onnx, file.py:factory, or a run folder)."),
    scheme: str = config_option(Q, "scheme"),
    calib: Path = typer.Option(None, "--calib", help="Calibration data (.npz); a run folder's calib.npz by default."),
    eval_: Path = typer.Option(None, "--eval", help="Evaluation data (.npz); a run folder's eval.npz by default."),
    metric: str = typer.Option("accuracy", "--metric", help="accuracy | cosine | sqnr | module:function"),
    max_drop: float = config_option(Q, "max_drop"),
    calibration: str = config_option(Q, "calibration"),
    keep_float: list[str] = config_option(Q, "keep_float"),
    symmetric: bool = config_option(Q, "symmetric_activations", "--symmetric-activations/--asymmetric-activations"),
    per_channel: bool = config_option(Q, "per_channel", "--per-channel/--per-tensor"),
    samples: int = config_option(Q, "calib_samples"),
    equalize: bool = config_option(Q, "equalize"),
    bias_correction: bool = config_option(Q, "bias_correction"),
    adaround: bool = config_option(Q, "adaround"),
    smooth_alpha: float = config_option(Q, "smooth_alpha"),
    rewrites: bool = config_option(Q, "transformer_rewrites", "--transformer-rewrites/--no-transformer-rewrites"),
    outlier_rows: bool = config_option(Q, "outlier_rows", "--outlier-rows/--no-outlier-rows"),
    speed_rule: str = config_option(Q, "speed_rule"),
    runtime: str = config_option(Q, "runtime"),
    activations: str = config_option(Q, "activations"),
    float_layers: bool = config_option(Q, "float_layers"),
    runs: int = typer.Option(200, "--bench-runs", help="Timed runs per latency measurement."),
    input_shape: list[str] = input_shape_option(),
    out: Path = typer.Option(..., "--out"),
) -> None:
    """Quantize a model; report accuracy, size and latency against FP32 on every runtime."""
    from rich.progress import Progress

    from edgekiln.api import quantize
    from edgekiln.models.intake import parse_shapes

    cfg = Q.from_dict({"scheme": scheme, "calibration": calibration, "max_drop": max_drop,
                       "keep_float": tuple(keep_float or ()), "symmetric_activations": symmetric,
                       "per_channel": per_channel, "calib_samples": samples, "equalize": equalize,
                       "bias_correction": bias_correction, "adaround": adaround,
                       "smooth_alpha": smooth_alpha or None, "transformer_rewrites": rewrites,
                       "outlier_rows": outlier_rows, "speed_rule": speed_rule, "runtime": runtime,
                       "activations": activations, "float_layers": float_layers})
    with Progress(transient=True) as bar:
        task = bar.add_task("sensitivity", total=None)
        run = quantize(model, config=cfg, calib=calib, eval=eval_, metric=metric, input_shapes=parse_shapes(input_shape),
                       out=out, bench_runs=runs, progress=lambda i, n: bar.update(task, completed=i, total=n))
    rep = run.report()
    typer.echo(f"{scheme}: {metric} {_f(rep['metric_fp32'])} -> {_f(rep['metric'])}, size {rep['size_ratio']:.3f}x, "
               f"onnxruntime p50 {_f(rep['latency_ms_fp32'])} -> {_f(rep['latency_ms'])} ms; "
               f"fastest runtime: {rep['fastest_runtime']}; report: {out / 'report.md'}")
    for s in rep["slower_than_fp32"]:
        typer.echo(f"warning: slower than FP32 on {s['runtime']} ({s['p50']:.4f} vs {s['fp32_p50']:.4f} ms)")
    v = rep.get("speed_verdict")
    if v:
        typer.echo(f"{scheme} on {v['runtime']}: {v['p50']:.4f} ms vs FP32 on {v['fp32_runtime']}: {v['fp32_p50']:.4f} ms "
                   f"({v['ratio']:.2f}x the time, {v.get('clock', 'wall')} time per call){'' if v['faster'] else ' - NOT faster than FP32 on any runtime here; '}"
                   f"{'' if v['faster'] else 'where the time goes: ' + str(out / 'report.md')}")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
