"""`edgekiln targets` (list device profiles) and `edgekiln fits` (check a model against one)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.cli.options import input_shape_option


def register(app: typer.Typer) -> None:
    app.command("targets")(targets_command)
    app.command("fits")(fits_command)


def targets_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the device profiles (built-in and yours) with their budgets and sources."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from edgekiln.targets.profiles import list_profiles
    from edgekiln.targets.units import format_bytes

    profiles = list_profiles()
    if as_json:
        # NOTE: a unit's op list is a frozenset: JSON gets it sorted
        typer.echo(json.dumps([asdict(p) for p in profiles], indent=2,
                              default=lambda o: sorted(o) if isinstance(o, frozenset) else str(o)))
        return
    table = Table(title="device profiles")
    for col in ("name", "kind", "flash", "RAM", "clock", "precisions", "int8 GMAC/s", "fp32 GMAC/s", "units"):
        table.add_column(col, no_wrap=True)
    for p in profiles:
        peak = {k: f"{v / 1e9:.2f}" for k, v in p.peak_macs_per_s.items()}
        units = ", ".join(f"{u.name} ({u.type})" for u in p.units) if p.units else "cpu (implicit)"
        table.add_row(p.name, p.kind, format_bytes(p.flash_bytes), format_bytes(p.ram_bytes), f"{p.clock_hz / 1e6:.0f} MHz",
                      ",".join(p.precisions), peak.get("int8", "-"), peak.get("fp32", "-"), units)
    console = Console()
    console.print(table)
    console.print("sources and assumptions: `edgekiln targets --json` (field 'source') and docs/targets.md")


def fits_command(
    model: str = typer.Argument(..., help="Model (.onnx, file.py:factory, run folder)."),
    target: str = typer.Option(..., "--target", help="Profile name or YAML file."),
    precision: str = typer.Option(None, "--precision", help="int8 | fp16 | fp32 (default: from the model)."),
    max_latency_ms: float = typer.Option(None, "--max-latency-ms"),
    max_ram: str = typer.Option(None, "--max-ram", help="e.g. 256KB (default: the profile's RAM)."),
    max_flash: str = typer.Option(None, "--max-flash", help="e.g. 1MB (default: the profile's flash)."),
    input_shape: list[str] = input_shape_option(),
    as_json: bool = typer.Option(False, "--json"),
    out: Path = typer.Option(None, "--out", help="Write a run folder with report.json/report.md."),
) -> None:
    """Check flash, RAM, estimated latency and energy against a device; exit 3 if it does not fit."""
    from edgekiln.api import fits
    from edgekiln.models.intake import parse_shapes

    report = fits(model, target, precision=precision, max_latency_ms=max_latency_ms, max_ram=max_ram,
                  max_flash=max_flash, input_shapes=parse_shapes(input_shape), out=out)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print(report)
    if not report.fits:
        raise typer.Exit(3)


def _print(report) -> None:  # noqa: ANN001
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.target} ({report.kind}, {report.precision})")
    for col in ("budget", "model needs", "device has", "margin", "ok"):
        table.add_column(col)
    for key, m in report.metrics.items():
        table.add_row(key, m.describe(m.value), m.describe(m.budget), m.describe(m.margin) if m.margin is not None else "-",
                      "[green]yes" if m.ok else "[red]NO")
    console = Console()
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(f"RAM from: {report.ram_source}; latency: {report.latency_source}")
    console.print("[green]fits[/]" if report.fits else "[red]does not fit:[/] " + "; ".join(report.exceeded))
