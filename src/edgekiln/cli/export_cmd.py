"""`edgekiln export`: turn an int8 QDQ ONNX model into a deployable artifact (`--to c` or `--to tflite`)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekiln.errors import EdgekilnError


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


def export_command(
    model: Path = typer.Argument(..., help="An int8 QDQ .onnx model (from `edgekiln quantize --scheme int8`)."),
    to: str = typer.Option(..., "--to", help="Target format: c (integer C99 library) or tflite."),
    out: Path = typer.Option(..., "--out", help="Output folder (library files, report.json, report.md)."),
    prefix: str = typer.Option("model", "--prefix", help="C name prefix: NAME.h, NAME_invoke()."),
    data: Path = typer.Option(None, "--data", help="With --to tflite: eval .npz to check LiteRT and TFLite Micro "
                              "against onnxruntime."),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="With --to c: fuse conv->pool pairs into one kernel "
                              "that never stores the full conv output (smaller arena; bit-identical results)."),
) -> None:
    """Export an int8 QDQ model: `--to c` writes a self-contained C99 library with a static arena."""
    exporters = {"c": _export_c, "tflite": _export_tflite}
    if to not in exporters:
        raise EdgekilnError(f"--to {to!r} is not a known target; choose one of: {', '.join(exporters)}")
    if to == "tflite":
        _export_tflite(model, out, prefix, data)
    else:
        _export_c(model, out, prefix, fuse)


def _export_c(model: Path, out: Path, prefix: str, fuse: bool = True) -> None:
    from edgekiln.codegen.export import export_c, write_export_report

    res = export_c(model, out, prefix=prefix, fuse=fuse)
    write_export_report(res, str(model))
    d = res.to_dict()
    typer.echo(f"wrote {prefix}.h, {prefix}.c, ek_kernels.c/.h, CMakeLists.txt, main.c to {out}")
    typer.echo(f"arena {d['arena_bytes']} B (RAM incl. I/O {d['ram_bytes']} B), flash {d['flash_bytes']} B "
               f"(weights {res.flash['weights']} B), {len(res.plan.schedule)} steps; report: {out}/report.md")


def _export_tflite(model: Path, out: Path, prefix: str, data: Path | None = None) -> None:
    from edgekiln.codegen.tflite import export_tflite

    rep = export_tflite(model, out, eval_npz=data)
    a = rep["arena"]
    typer.echo(f"wrote {rep['artifact']} ({rep['tflite_bytes']:,} B); TFLite Micro arena {a['reported_bytes']:,} B "
               f"reported, {a['smallest_running_bytes']:,} B smallest that runs; report: {out}/report.md")
