"""`edgekiln inspect`: parameters, MACs, bytes, peak activation memory and op compatibility."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekiln.cli.options import input_shape_option


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)


def inspect_command(
    model: str = typer.Argument(..., help="Model: .onnx, file.py:factory, TorchScript/.pt2, or a run folder."),
    input_shape: list[str] = input_shape_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the analysis as JSON on stdout (nothing else)."),
    out: Path = typer.Option(None, "--out", help="Run folder for report.json, report.md and analysis.png."),
) -> None:
    """Show what a model costs: per-layer params/MACs/activations, totals and compatibility."""
    import json
    import sys

    from edgekiln.api import inspect
    from edgekiln.models.intake import parse_shapes

    analysis = inspect(model, input_shapes=parse_shapes(input_shape), out=out)
    if json_out:
        sys.stdout.write(json.dumps(analysis.to_dict()) + "\n")
        return
    _print_rich(analysis, model)
    if out is not None:
        typer.echo(f"wrote {out}/report.json, report.md, analysis.png")


def _print_rich(analysis, label: str) -> None:  # noqa: ANN001 - ModelAnalysis, imported lazily
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from edgekiln.models.analysis_report import human_bytes, human_count

    a = analysis
    table = Table(title=f"{label}: layers", show_lines=False)
    for col, justify in (("step", "right"), ("name", "left"), ("op", "left"), ("output", "left"),
                         ("params", "right"), ("MACs", "right"), ("activations", "right")):
        table.add_column(col, justify=justify)
    hidden = 0
    for i, layer in enumerate(a.layers):
        if layer.constant:
            hidden += 1
            continue
        table.add_row(str(i), escape(layer.name), escape(layer.op), "x".join(map(str, layer.output_shape or ())) or "?",
                      f"{layer.params:,}", f"{layer.macs:,}", human_bytes(layer.activation_bytes),
                      style="bold" if i == a.peak_step else None)
    console = Console()
    console.print(table)
    if hidden:
        console.print(f"({hidden} constant node(s) folded: weight DequantizeLinear, Constant, ...)")
    peak_layer = a.layers[a.peak_step].name if a.layers else "-"
    lines = [
        f"parameters        {a.params:,}",
        f"MACs              {a.macs:,} ({human_count(a.macs)})",
        f"model file        {human_bytes(a.model_bytes)}",
        f"weights           {human_bytes(a.weight_bytes)}",
        f"inputs + outputs  {human_bytes(a.io_bytes)}",
        f"peak activations  {human_bytes(a.peak_activation_bytes)} at step {a.peak_step} ({peak_layer})",
    ]
    for consumer, items in a.unsupported.items():
        if items:
            what = "stays float" if consumer == "int8-qdq" else "unsupported"
            ops = sorted({i.partition(" (")[0] for i in items})
            lines.append(f"{consumer:<17} {what}: {', '.join(ops)} ({len(items)} node(s))")
        else:
            lines.append(f"{consumer:<17} all ops supported")
    console.print(Panel(Text("\n".join(lines)), title="totals", expand=False))
