"""`edgekiln measure-mcu`: run a generated C library on an emulated Cortex-M and count its instructions."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("measure-mcu")(measure_mcu_command)


def measure_mcu_command(
    path: Path = typer.Argument(..., help="Folder written by `edgekiln export --to c`, or a run folder with one in c/."),
    cpu: str = typer.Option("cortex-m4", "--cpu", help="cortex-m4 (QEMU mps2-an386) or cortex-m7 (mps2-an500)."),
    opt: str = typer.Option("O2", "--opt", help="arm-none-eabi-gcc optimization level: O2, Os, O3, O1 or O0."),
    data: Path = typer.Option(None, "--data", help="Inputs: .npz with array x (model input layout), or one array per "
                              "input name; default: seeded random int8 inputs."),
    model: Path = typer.Option(None, "--model", help="The QDQ .onnx the library came from (default: the one in "
                               "report.json); its integer reference gives the expected outputs."),
    limit: int = typer.Option(10, "--limit", help="Run the first N inputs (instructions are reported for each)."),
    out: Path = typer.Option(None, "--out", help="Write report.json, report.md and the ELF files (build/) here."),
) -> None:
    """Instructions per inference (total and per layer) under QEMU, sizes, arena, stack; outputs vs the reference."""
    from edgekiln.api import measure_mcu

    rep = measure_mcu(path, cpu=cpu, opt=opt, data=data, model=model, limit=limit, out=out)
    s = rep["sizes"]
    typer.echo(f"{rep['cpu']} ({rep['board']}, -{rep['opt']}): {rep['instructions_per_inference']:,} instructions "
               f"per inference ({rep['instructions_per_mac']} per MAC); text {s['text']:,} B, data {s['data']:,} B, "
               f"bss {s['bss']:,} B; arena {rep['arena_bytes']:,} B; stack {rep['stack_bytes']:,} B")
    for r in rep["layers"]:
        if r["instructions"]:
            per_mac = f", {r['instructions_per_mac']} per MAC" if r["instructions_per_mac"] is not None else ""
            typer.echo(f"  step {r['step']} {r['kind']} {r['name']}: {r['instructions']:,}{per_mac}")
    typer.echo(f"outputs match the integer reference on {rep['inputs']['n']} inputs: {rep['outputs_match']}"
               + (f"; report: {out}/report.md" if out else ""))
    if not rep["outputs_match"]:
        # NOTE: SystemExit, not typer.Exit: click swallows Exit when app() runs with standalone_mode=False.
        raise SystemExit(1)
