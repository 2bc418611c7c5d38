"""`edgekiln verify-c`: compile a generated C library, run it and compare with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("verify-c")(verify_c_command)


def verify_c_command(
    lib_dir: Path = typer.Argument(..., help="Folder written by `edgekiln export --to c`."),
    data: Path = typer.Option(..., "--data", help="Evaluation inputs: .npz with array x (model input layout), or one array per "
                       "input name for a model with several inputs."),
    model: Path = typer.Option(None, "--model", help="The QDQ .onnx (default: the one recorded in report.json)."),
    valgrind: bool = typer.Option(True, "--valgrind/--no-valgrind", help="Also run under valgrind if installed."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N inputs."),
) -> None:
    """Host-compile and run the C library; identical top-1, >= 99% identical int8 outputs, none off by > 1
    (against onnxruntime; a `--requant fixed-point` library against TFLite Micro: all identical)."""
    from rich.console import Console
    from rich.table import Table

    from edgekiln.codegen.verify import summary_rows, verify_c
    from edgekiln.fileio import atomic_write_json

    res = verify_c(lib_dir, data, model=model, valgrind=valgrind, limit=limit)
    table = Table(title=f"verify-c {lib_dir} ({res.n_inputs} inputs)")
    for col in ("check", "measured", "threshold", "status"):
        table.add_column(col)
    for row in summary_rows(res):
        table.add_row(*row)
    Console(highlight=False).print(table)
    atomic_write_json(Path(lib_dir) / "verify.json", res.to_dict())
    typer.echo("PASS" if res.passed else "FAIL")
    if not res.passed:
        # NOTE: SystemExit, not typer.Exit: click swallows Exit when app() runs with standalone_mode=False.
        raise SystemExit(1)
