"""`edgekiln targets` (list device profiles) and `edgekiln fits` (check a model against one)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.cli.options import input_shape_option, load_cli_model


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
        typer.echo(json.dumps([asdict(p) for p in profiles], indent=2))
        return
    table = Table(title="device profiles")
    for col in ("name", "kind", "flash", "RAM", "clock", "precisions", "int8 GMAC/s", "fp32 GMAC/s"):
        table.add_column(col, no_wrap=True)
    for p in profiles:
        peak = {k: f"{v / 1e9:.2f}" for k, v in p.peak_macs_per_s.items()}
        table.add_row(p.name, p.kind, format_bytes(p.flash_bytes), format_bytes(p.ram_bytes), f"{p.clock_hz / 1e6:.0f} MHz",
                      ",".join(p.precisions), peak.get("int8", "-"), peak.get("fp32", "-"))
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
    from edgekiln.models.analysis import analyze
    from edgekiln.models.run_folder import RunFolder, precision_of
    from edgekiln.search.trial import c_backend_footprint
    from edgekiln.targets.fit import estimate_fit
    from edgekiln.targets.profiles import load_profile
    from edgekiln.targets.units import parse_bytes

    profile = load_profile(target)
    art = load_cli_model(model, input_shape, work_dir=RunFolder(out).work_dir / "model" if out else None)
    info = analyze(art.path, art.input_shapes)
    prec = precision or precision_of(art.kind)
    measured = None
    if profile.measured:
        from edgekiln.execution.timing import benchmark

        measured = benchmark(art.path, runtime="onnxruntime", threads=1, runs=200,
                             input_shapes=art.input_shapes).latency_ms["p50"]
    c_fp = c_backend_footprint(art.path, art.kind, profile)
    report = estimate_fit(profile, weight_bytes=c_fp.flash["weights"] + c_fp.flash["params"] if c_fp else info.weight_bytes,
                          code_bytes=c_fp.flash["code_estimate"] if c_fp else 0,
                          peak_activation_bytes=c_fp.ram_bytes if c_fp else info.peak_activation_bytes,
                          io_bytes=0 if c_fp else info.io_bytes, macs=info.macs, precision=prec,
                          measured_latency_ms=measured, max_latency_ms=max_latency_ms,
                          max_ram_bytes=parse_bytes(max_ram) if max_ram else None,
                          max_flash_bytes=parse_bytes(max_flash) if max_flash else None)
    data = report.to_dict()
    data["ram_source"] = "C backend memory plan (arena incl. I/O)" if c_fp else "analysis (peak activations)"
    data["flash_source"] = "C backend (arrays + params + code estimate)" if c_fp else "analysis (weights only)"
    if out:
        RunFolder(out).write(command="fits", model=art, measurements=data, markdown=report.render_markdown())
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        _print(report, data["ram_source"])
    if not report.fits:
        raise typer.Exit(3)


def _print(report, ram_source: str) -> None:  # noqa: ANN001
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
    console.print(f"RAM from: {ram_source}; latency: {report.latency_source}")
    console.print("[green]fits[/]" if report.fits else "[red]does not fit:[/] " + "; ".join(report.exceeded))
