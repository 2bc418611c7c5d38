"""`edgekiln prune`: structured channel pruning or unstructured magnitude pruning, fine-tuned,
measured before and after, into a run folder (report.json/md, comparison and sensitivity plots).

Thin: the options become a :class:`~edgekiln.passes.prune.PruneConfig` (whose fields hold the
help texts) and :func:`edgekiln.api.prune` runs it through the pass pipeline.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgekiln.cli.options import config_option, input_shape_option
from edgekiln.passes.prune import PruneConfig as P


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)


def prune_command(
    model: str = typer.Argument(..., help="A run folder from `edgekiln example` (or another edgekiln command), or "
                                          "file.py:factory with --weights; pruning needs the PyTorch model."),
    weights: Path = typer.Option(None, "--weights", help="state_dict for a file.py:factory MODEL."),
    input_shape: list[str] = input_shape_option(),
    mode: str = config_option(P, "mode"),
    ratio: float = config_option(P, "ratio"),
    importance: str = config_option(P, "importance"),
    scope: str = config_option(P, "scope"),
    target_macs: float = config_option(P, "target_macs_reduction"),
    target_latency: float = config_option(P, "target_latency_reduction"),
    device: str = config_option(P, "device"),
    sensitivity_drop: float = config_option(P, "sensitivity_max_drop", "--sensitivity-drop"),
    scan: bool = typer.Option(False, "--scan", help="Also plot the per-layer sensitivity curves (25/50/75%)."),
    round_to: int = config_option(P, "round_to"),
    steps: int = config_option(P, "iterative_steps", "--steps"),
    finetune_epochs: int = config_option(P, "finetune_epochs"),
    lr: float = config_option(P, "lr"),
    train: Path = typer.Option(None, "--train", help="Fine-tuning data (.npz with x, y); a run folder's train.npz."),
    calib: Path = typer.Option(None, "--calib", help="Data for the sensitivity scan (.npz with x, y)."),
    eval_: Path = typer.Option(None, "--eval", help="Evaluation data (.npz with x, y); a run folder's eval.npz."),
    seed: int = typer.Option(0, "--seed"),
    runs: int = typer.Option(300, "--bench-runs", help="Timed runs per latency measurement."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Prune a model, fine-tune it, and report accuracy, parameters, MACs and latency before/after."""
    from edgekiln.api import prune
    from edgekiln.models.intake import parse_shapes

    cfg = P.from_dict({"mode": mode, "ratio": ratio, "importance": importance, "scope": scope,
                       "target_macs_reduction": target_macs, "target_latency_reduction": target_latency,
                       "device": device, "sensitivity_max_drop": sensitivity_drop, "round_to": round_to,
                       "iterative_steps": steps, "finetune_epochs": finetune_epochs, "lr": lr})
    run = prune(model, cfg, data={"train": train, "calib": calib, "eval": eval_}, weights=weights,
                input_shapes=parse_shapes(input_shape), out=out, seed=seed, bench_runs=runs, scan=scan, quiet=quiet)
    rep = run.report()
    acc = "-" if rep["metric"] is None else f"{rep['metric_before']:.4f} -> {rep['metric']:.4f}"
    typer.echo(f"{mode} prune: accuracy {acc}, params {rep['params_before']:,} -> {rep['params']:,}, "
               f"MACs {rep['macs_before']:,} -> {rep['macs']:,} ({100 * rep['macs_reduction']:.0f}% removed), "
               f"host p50 {rep['latency_ms_before']:.4f} -> {rep['latency_ms']:.4f} ms; report: {out / 'report.md'}")
    if mode == "unstructured":
        typer.echo(f"note: {rep['note']}")
