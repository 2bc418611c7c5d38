"""`edgekiln optimize`: flags (or a YAML recipe) -> Recipe -> search -> run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekiln.cli.options import input_shape_option


def register(app: typer.Typer) -> None:
    app.command("optimize")(optimize_command)


def optimize_command(
    model: str = typer.Argument(None, help="Model: .onnx, file.py:factory, or a run folder from `edgekiln example`."),
    recipe: Path = typer.Option(None, "--recipe", help="YAML recipe; flags given as well override its fields."),
    input_shape: list[str] = input_shape_option(),
    calib: str = typer.Option(None, "--calib", help="Calibration data (.npz with x)."),
    eval_: str = typer.Option(None, "--eval", help="Evaluation data (.npz with x, y)."),
    metric: str = typer.Option(None, "--metric", help="accuracy | cosine | sqnr | module:function (default: "
                               "accuracy when --eval holds labels y, else cosine against the input model)."),
    target: str = typer.Option(None, "--target", help="Device profile name or YAML file (see `edgekiln targets`)."),
    max_drop: float = typer.Option(None, "--max-drop", help="Largest allowed metric drop, in its units (0.01 = 1 point)."),
    max_latency_ms: float = typer.Option(None, "--max-latency-ms", help="Latency budget on the target (ms)."),
    max_ram: str = typer.Option(None, "--max-ram", help="RAM budget, e.g. 256KB (default: the profile's RAM)."),
    max_flash: str = typer.Option(None, "--max-flash", help="Flash budget, e.g. 1MB (default: the profile's flash)."),
    prefer: str = typer.Option(None, "--prefer", help="latency | size | accuracy: which feasible model wins."),
    trials: int = typer.Option(None, "--trials",
                               help="Number of trials (distinct pipelines; fewer when the space holds fewer)."),
    timeout: float = typer.Option(None, "--timeout", help="Seconds for the search (default 600; 0: no limit): no "
                                  "trial starts near it, one trial gets a sixth to a third of it; the best so far is kept."),
    seed: int = typer.Option(None, "--seed"),
    workers: int = typer.Option(None, "--workers", help="Trials run in parallel on this machine."),
    executor: str = typer.Option(None, "--executor", help="local | ray"),
    address: str = typer.Option(None, "--address", help="Ray cluster address (with --executor ray)."),
    mcu_library: bool = typer.Option(None, "--mcu-library/--no-mcu-library", help="Microcontroller targets: "
                                     "judge each candidate by its C library, run on the emulated CPU (QEMU) where "
                                     "installed, and write the selected one to OUT/c with its verify-c and "
                                     "measure-mcu results (default); --no-mcu-library: estimates only, no c/."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search stored in --out."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Find the best model that fits the target and budget, with the evidence."""
    from edgekiln.api import make_recipe, optimize
    from edgekiln.search.recipe import load_recipe
    from edgekiln.targets.units import parse_bytes

    base = load_recipe(recipe).to_dict() if recipe else {}
    if prefer is not None:
        base["prefer"] = prefer
    constraints = {key: value for key, value in (
        ("max_drop", max_drop), ("max_latency_ms", max_latency_ms),
        ("max_ram_bytes", parse_bytes(max_ram) if max_ram else None),
        ("max_flash_bytes", parse_bytes(max_flash) if max_flash else None)) if value is not None}
    search = {key: value for key, value in (
        ("trials", trials), ("timeout_s", timeout), ("seed", seed), ("workers", workers), ("executor", executor),
        ("ray_address", address), ("mcu_library", mcu_library)) if value is not None}
    rec = make_recipe(model, recipe=base, target=target, calib=calib, eval=eval_, metric=metric,
                      input_shapes=input_shape or None, constraints=constraints, search=search)
    if not quiet:
        from edgekiln.search.optimize import chosen_metric

        note = chosen_metric(rec)[1]
        if note:
            print(note, flush=True)
    result = _run(optimize, rec, out, resume, quiet)
    _print_summary(result, rec)


def _run(optimize, rec, out, resume, quiet):  # noqa: ANN001, ANN202 - thin progress wrapper
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgekiln.errors import BudgetNotMet

    columns = [TextColumn("[bold]optimize"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task("FP32 baseline, then trial 1 running", total=rec.search.trials)

        def on_trial(c):  # noqa: ANN001, ANN202
            status = "fits" if c.feasible else (c.state if c.state != "complete" else "no fit")
            lat = f" {c.latency_ms_host:.3g} ms" if c.latency_ms_host is not None else ""
            if c.mcu and "instructions" in c.mcu:   # its C library, measured on the emulated CPU
                lat = f" {c.mcu['instructions']:,} instructions ({c.latency_ms_target_est:.3g} ms on {rec.target})"
            if not quiet:
                bar.console.print(f"trial #{c.number} {c.label}: {status}{lat}, drop {_num(c.drop)} ({c.seconds:.0f} s)"
                                  + (f" — {c.error[:240]}" if c.error else ""))
            bar.update(task, advance=1, description="next trial running")

        try:
            return optimize(recipe=rec, out=out, resume=resume, quiet=quiet, on_trial=on_trial)
        except BudgetNotMet as exc:
            raise BudgetNotMet(f"{exc} (report: {out / 'report.md'})") from None


def _print_summary(result, rec) -> None:  # noqa: ANN001
    from rich.console import Console
    from rich.table import Table

    from edgekiln.search.report import HEADERS, table_rows

    console = Console()
    # NOTE: one column per model, one row per measure: readable in an 80-column terminal, where a
    # row per model squeezed the selected pipeline to "prune… -> quant…".
    table = Table(title=f"edgekiln optimize -> {rec.target}")
    models = [result.baseline] + ([result.selected] if result.selected else [])
    table.add_column("")
    for label in ["baseline", "selected"][:len(models)]:
        table.add_column(label, overflow="fold")
    rows = table_rows(models)
    for i, header in enumerate(HEADERS[1:], start=1):
        table.add_row(header, *[str(row[i]) for row in rows])
    console.print(table)
    if result.interrupted:
        console.print("[yellow]interrupted: the best model so far is saved; continue with --resume[/]")
    elif result.stop:
        console.print(f"[yellow]{result.stop}; continue with --resume (and a larger --timeout)[/]")
    versus = result.out_dir / "report.json"
    if versus.is_file():
        import json

        from edgekiln.search.report import deployment_summary

        written = json.loads(versus.read_text())
        v = written.get("vs_fp32") or {}
        if v.get("selected_is_fp32") and v.get("faster_here"):
            console.print(f"FP32 is kept: trial(s) {', '.join(map(str, v['faster_here']))} ran faster than FP32 here "
                          f"within the budget, but FP32 ranks first on {rec.target}'s latency, then accuracy "
                          "(why: report.md)")
        elif v.get("selected_is_fp32"):
            console.print("no candidate is faster than FP32 within the budget: FP32 is kept (why: report.md)")
        elif v.get("speedup"):
            console.print(f"selected: {v['speedup']:.2f}x the speed of FP32 on this machine")
        for line in deployment_summary(written.get("deployment"), result.out_dir):
            console.print(line)
    if result.exhausted:
        console.print(f"the search space holds {sum(not c.budget_round for c in result.candidates)} distinct "
                      "pipeline(s): every one was tried")
    console.print(f"report: {result.out_dir / 'report.md'} (also report.html, report.json); "
                  f"model: {result.out_dir / 'model.onnx'}")


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
