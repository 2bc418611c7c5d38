"""`edgekiln place`: put each part of a model on the compute unit of a device that runs it best."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.cli.options import input_shape_option
from edgekiln.errors import EdgekilnError

OBJECTIVES = ("latency", "energy")
PRECISIONS = ("int8", "fp16", "fp32")


def register(app: typer.Typer) -> None:
    app.command("place")(place_command)


def place_command(
    model: str = typer.Argument(..., help="Model (.onnx, file.py:factory, run folder)."),
    target: str = typer.Option(..., "--target", help="Profile name or YAML file (its `units:` are placed on)."),
    objective: str = typer.Option("latency", "--objective", help="latency | energy"),
    precision: str = typer.Option(None, "--precision", help="int8 | fp16 | fp32 (default: from the model)."),
    input_shape: list[str] = input_shape_option(),
    out: Path = typer.Option(None, "--out", help="Write RUN/segments/*.onnx, RUN/placement.json and report.json/md."),
    estimate_only: bool = typer.Option(False, "--estimate-only", help="On host: plan from estimates, measure nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Plan the per-segment placement: the segment table, the fallback ops and why, the gain over the best single unit."""
    from edgekiln.api import place
    from edgekiln.models.intake import parse_shapes
    from edgekiln.targets.place_io import FILE, pct, unit_name

    if objective not in OBJECTIVES:
        raise EdgekilnError(f"--objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if precision is not None and precision not in PRECISIONS:
        raise EdgekilnError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if out is not None and out.exists() and not out.is_dir():
        raise EdgekilnError(f"--out {out}: exists and is not a folder")
    p = place(model, target, objective=objective, precision=precision, input_shapes=parse_shapes(input_shape),
              out=out, measure=not estimate_only)
    if as_json:
        record = json.loads((out / FILE).read_text()) if out else _plain(p)
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(f"{'seg':>3}  {'unit':<16} {'ops':>4} {'MACs':>12} {'est ms':>10} {'in bytes':>10} {'out bytes':>10}")
    for s in p.segments:
        typer.echo(f"{s.index:>3}  {unit_name(s.unit):<16} {len(s.nodes):>4} {int(s.macs):>12} "
                   f"{s.est_ms:>10.4f} {int(s.transfer_in_bytes):>10} "
                   f"{int(s.transfer_out_bytes):>10}")
    for f in p.fallback:
        typer.echo(f"fallback: {_fallback_line(f)}")
    single = dict(p.single_unit)
    best = min((v for v in single.values() if isinstance(v, int | float)), default=None)
    typer.echo(f"{'measured' if p.segments and p.segments[0].source == 'measured' else 'estimated'} "
               f"{p.total_ms:.4f} ms; best single unit {'-' if best is None else f'{best:.4f} ms'}; "
               f"gain {pct(p.gain)}")
    if out:
        typer.echo(f"wrote {out / FILE} and {len(p.segments)} segment file(s) in {out / 'segments'}")


def _fallback_line(f: object) -> str:
    from edgekiln.targets.place_io import fallback_dict

    d = fallback_dict(f)
    return f"{d['unit']}: {d['reason']}"


def _plain(p: object) -> dict[str, object]:
    from edgekiln.targets.place_io import summary

    return summary(p)
