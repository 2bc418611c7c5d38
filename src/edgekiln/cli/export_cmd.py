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
    requant: str = typer.Option("float32-exact", "--requant", help="With --to c: conv/FC/Add requantization, "
                                "float32-exact (bit-exact with onnxruntime) or fixed-point (bit-exact with TFLite "
                                "Micro / CMSIS-NN: int32 multiplier, two roundings; ops it cannot match are refused)."),
) -> None:
    """Export an int8 QDQ model: `--to c` writes a self-contained C99 library with a static arena."""
    exporters = {"c": _export_c, "tflite": _export_tflite}
    if to not in exporters:
        raise EdgekilnError(f"--to {to!r} is not a known target; choose one of: {', '.join(exporters)}")
    if to == "c":
        from edgekiln.codegen.requant_fixed import check_mode

        check_mode(requant)
    elif requant != "float32-exact":
        raise EdgekilnError("--requant applies to --to c (a .tflite always requantizes as the runtime running it)")
    art = load_cli_model(model, input_shape, data={"eval": data})
    if to == "tflite":
        _export_tflite(art, out, prefix, data)
    else:
        _export_c(art, out, prefix, fuse, requant)


def _export_c(model: ModelArtifact, out: Path, prefix: str, fuse: bool = True, requant: str = "float32-exact") -> None:
    from edgekiln.codegen.export import export_c, write_export_report

    res = export_c(model.path, out, prefix=prefix, fuse=fuse, input_shapes=model.input_shapes, requant=requant)
    write_export_report(res, model)
    d = res.to_dict()
    typer.echo(f"wrote {prefix}.h, {prefix}.c, ek_kernels.c/.h, CMakeLists.txt, main.c to {out}")
    typer.echo(f"arena {d['arena_bytes']} B (RAM incl. I/O {d['ram_bytes']} B), flash {d['flash_bytes']} B "
               f"(weights {res.flash['weights']} B), {len(res.plan.schedule)} steps, requantization {requant}; "
               f"report: {out}/report.md")


def _export_tflite(model: ModelArtifact, out: Path, prefix: str, data: Path | None = None) -> None:
    from edgekiln.codegen.tflite import export_tflite

    rep = export_tflite(model, out, eval_npz=data)
    a = rep["arena"]
    typer.echo(f"wrote {out / rep['artifact']} ({rep['tflite_bytes']:,} B); TFLite Micro arena {a['reported_bytes']:,} B "
               f"reported, {a['smallest_running_bytes']:,} B smallest that runs; report: {out}/report.md")
    for rt in ("litert", "tflm"):  # with --data: the int8 outputs against onnxruntime's
        r = rep.get(rt) or {}
        if "identical_fraction" in r:
            typer.echo(f"{rt}: {r['identical_fraction']:.2%} of int8 outputs identical to onnxruntime's, max "
                       f"{r['max_abs_diff_lsb']} LSB" + (f", top-1 {r['top1_agreement']:.2%}" if "top1_agreement" in r else ""))
    if rep.get("per_op"):
        worst = ", ".join(f"{rt} {v} LSB" for rt, v in rep["per_op"]["max_abs_diff_lsb"].items())
        typer.echo(f"each of the {rep['per_op']['n_ops']} ops alone vs the integer reference: at most {worst}")
