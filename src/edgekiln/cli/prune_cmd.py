"""`edgekiln prune`: structured channel pruning or unstructured magnitude pruning, fine-tuned,
measured before and after, into a run folder (report.json/md, comparison and sensitivity plots)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)


def prune_command(
    model: str = typer.Argument(..., help="A run folder from `edgekiln example` (or another edgekiln command), or "
                                          "file.py:factory with --weights; pruning needs the PyTorch model."),
    weights: Path = typer.Option(None, "--weights", help="state_dict for a file.py:factory MODEL."),
    input_shape: str = typer.Option(None, "--input-shape", help="e.g. 1x1x28x28, for a file.py:factory MODEL."),
    mode: str = typer.Option("structured", "--mode", help="structured (channels: smaller and faster) | "
                                                         "unstructured (weights: compresses only)."),
    ratio: float = typer.Option(0.5, "--ratio", help="Share of channels (structured) or weights removed."),
    importance: str = typer.Option("l1", "--importance", help="l1 | l2 | taylor (data-driven) | bn-scale."),
    scope: str = typer.Option("per-layer", "--scope", help="per-layer (same ratio everywhere) | global."),
    target_macs: float = typer.Option(None, "--target-macs-reduction",
                                      help="Choose the ratio that removes this share of MACs (0.5 = half)."),
    target_latency: float = typer.Option(None, "--target-latency-reduction",
                                         help="Choose the ratio that cuts the estimated latency on --device by this."),
    device: str = typer.Option("cortex-m7", "--device", help="Device profile for --target-latency-reduction."),
    sensitivity_drop: float = typer.Option(None, "--sensitivity-drop",
                                           help="Per-layer ratios from a sensitivity scan: each layer's largest "
                                                "ratio within this accuracy drop (0.01 = 1 point)."),
    scan: bool = typer.Option(False, "--scan", help="Also plot the per-layer sensitivity curves (25/50/75%)."),
    round_to: int = typer.Option(None, "--round-to", help="Keep channel counts multiples of this (e.g. 8)."),
    steps: int = typer.Option(1, "--steps", help="Iterative schedule: prune -> fine-tune this many times."),
    finetune_epochs: int = typer.Option(5, "--finetune-epochs", help="Epochs after each step (0: none)."),
    lr: float = typer.Option(2e-3, "--lr"),
    train: Path = typer.Option(None, "--train", help="Fine-tuning data (.npz with x, y); a run folder's train.npz."),
    calib: Path = typer.Option(None, "--calib", help="Data for the sensitivity scan (.npz with x, y)."),
    eval_: Path = typer.Option(None, "--eval", help="Evaluation data (.npz with x, y); a run folder's eval.npz."),
    seed: int = typer.Option(0, "--seed"),
    runs: int = typer.Option(300, "--bench-runs", help="Timed runs per latency measurement."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Prune a model, fine-tune it, and report accuracy, parameters, MACs and latency before/after."""
    from rich.progress import Progress

    from edgekiln.compress.report import before_after, measure, share_data, write_prune_report
    from edgekiln.errors import EdgekilnError
    from edgekiln.models.intake import load_model, parse_shape, run_folder_data
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.prune import PruneConfig
    from edgekiln.passes.prune import run as prune

    cfg = PruneConfig.from_dict({"mode": mode, "ratio": ratio, "importance": importance, "scope": scope,
                                 "target_macs_reduction": target_macs, "target_latency_reduction": target_latency,
                                 "device": device, "sensitivity_max_drop": sensitivity_drop, "round_to": round_to,
                                 "iterative_steps": steps, "finetune_epochs": finetune_epochs, "lr": lr})
    data = run_folder_data(model)
    data.update({k: v for k, v in (("train", train), ("calib", calib), ("eval", eval_)) if v is not None})
    if "train" not in data:
        raise EdgekilnError("prune needs fine-tuning data: pass --train TRAIN.npz (x, y) or a run folder with train.npz")
    art = load_model(model, weights=weights, input_shape=parse_shape(input_shape) if input_shape else None,
                     work_dir=out / "input")
    before = measure(art.path, data.get("eval"), runs=runs)
    ctx = PassContext(work_dir=out, train_path=data["train"], calib_path=data.get("calib"),
                      eval_path=data.get("eval"), seed=seed, quiet=quiet)
    result = prune(art, cfg, ctx)
    scan_result = result.provenance[-1].get("sensitivity")
    if scan and scan_result is None:
        from edgekiln.compress.sensitivity import scan_artifact

        with Progress(disable=quiet, transient=True) as bar:
            task = bar.add_task("sensitivity scan", total=None)
            scan_result = scan_artifact(art, data.get("calib") or data["train"], importance=cfg.importance,
                                        progress=lambda i, n: bar.update(task, completed=i, total=n))
    keys = before_after(before, measure(result.path, data.get("eval"), runs=runs))
    share_data(data, out)
    rep = write_prune_report(out, keys=keys, config=cfg, result=result, sensitivity=scan_result)
    acc = "-" if rep["metric"] is None else f"{rep['metric_before']:.4f} -> {rep['metric']:.4f}"
    typer.echo(f"{mode} prune: accuracy {acc}, params {rep['params_before']:,} -> {rep['params']:,}, "
               f"MACs {rep['macs_before']:,} -> {rep['macs']:,} ({100 * rep['macs_reduction']:.0f}% removed), "
               f"host p50 {rep['latency_ms_before']:.4f} -> {rep['latency_ms']:.4f} ms; report: {out / 'report.md'}")
    if mode == "unstructured":
        typer.echo(f"note: {rep['note']}")
