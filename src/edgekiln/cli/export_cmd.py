"""`edgekiln export`: turn an int8 QDQ ONNX model into a deployable artifact (`--to c` or `--to tflite`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgekiln.cli.options import input_shape_option, load_cli_model
from edgekiln.errors import EdgekilnError

if TYPE_CHECKING:
    from edgekiln.models.artifact import ModelArtifact


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


def export_command(
    model: str = typer.Argument(..., help="An int8 QDQ .onnx model or a run folder holding one (from `edgekiln "
                                          "quantize --scheme int8` or `edgekiln optimize`)."),
    to: str = typer.Option(..., "--to", help="Target format: c (integer C99 library) or tflite."),
    out: Path = typer.Option(..., "--out", help="Output folder (library files, report.json, report.md)."),
    prefix: str = typer.Option("model", "--prefix", help="C name prefix: NAME.h, NAME_invoke()."),
    data: Path = typer.Option(None, "--data", help="With --to tflite: eval .npz to check LiteRT and TFLite Micro "
                              "against onnxruntime."),
    input_shape: list[str] = input_shape_option(),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="With --to c: fuse conv->pool pairs into one kernel "
                              "that never stores the full conv output (smaller arena; bit-identical results)."),
) -> None:
    """Export an int8 QDQ model: `--to c` writes a self-contained C99 library with a static arena."""
    exporters = {"c": _export_c, "tflite": _export_tflite}
    if to not in exporters:
        raise EdgekilnError(f"--to {to!r} is not a known target; choose one of: {', '.join(exporters)}")
    art = load_cli_model(model, input_shape, data={"eval": data})
    if to == "tflite":
        _export_tflite(art, out, prefix, data)
    else:
        _export_c(art, out, prefix, fuse)


def _export_c(model: ModelArtifact, out: Path, prefix: str, fuse: bool = True) -> None:
    from edgekiln.codegen.export import export_c, write_export_report

    res = export_c(model.path, out, prefix=prefix, fuse=fuse)
    write_export_report(res, model)
    d = res.to_dict()
    typer.echo(f"wrote {prefix}.h, {prefix}.c, ek_kernels.c/.h, CMakeLists.txt, main.c to {out}")
    typer.echo(f"arena {d['arena_bytes']} B (RAM incl. I/O {d['ram_bytes']} B), flash {d['flash_bytes']} B "
               f"(weights {res.flash['weights']} B), {len(res.plan.schedule)} steps; report: {out}/report.md")


def _export_tflite(model: ModelArtifact, out: Path, prefix: str, data: Path | None = None) -> None:
    from edgekiln.codegen.tflite import export_tflite

    rep = export_tflite(model, out, eval_npz=data)
    a = rep["arena"]
    typer.echo(f"wrote {out / rep['artifact']} ({rep['tflite_bytes']:,} B); TFLite Micro arena {a['reported_bytes']:,} B "
               f"reported, {a['smallest_running_bytes']:,} B smallest that runs; report: {out}/report.md")
