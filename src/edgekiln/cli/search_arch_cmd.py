"""`edgekiln search-arch`: find the lightweight architecture that fits a device budget."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("search-arch")(search_arch_command)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def search_arch_command(
    data: Path = typer.Option(..., "--data", help="A run folder with train.npz and eval.npz (e.g. from `edgekiln "
                                                   "example`), or a train .npz (then give --eval)."),
    eval_: Path = typer.Option(None, "--eval", help="Evaluation data (.npz with x, y)."),
    target: str = typer.Option("cortex-m4", "--target", help="Device profile name or YAML file."),
    max_ram: str = typer.Option(None, "--max-ram", help="RAM budget, e.g. 256KB (default: the profile's)."),
    max_flash: str = typer.Option(None, "--max-flash", help="Flash budget, e.g. 1MB (default: the profile's)."),
    max_latency: str = typer.Option(None, "--max-latency", help="Latency budget on the target, e.g. 50ms."),
    families: str = typer.Option("ds_cnn,mobilenet_v1_style,mobilenet_v2_style", "--families",
                                 help="Comma-separated: ds_cnn, mobilenet_v1_style, mobilenet_v2_style, "
                                      "squeezenet_style."),
    width: str = typer.Option("0.25,0.5,1.0", "--width", help="Width multipliers."),
    depth: str = typer.Option("2,4,6", "--depth", help="Numbers of blocks."),
    resolution: str = typer.Option("", "--resolution", help="Input sides in pixels (default: the data's)."),
    kernel: str = typer.Option("3,5", "--kernel", help="Kernel sizes."),
    candidates: int = typer.Option(6, "--candidates", help="Promising architectures trained briefly."),
    epochs: int = typer.Option(3, "--epochs", help="Brief training epochs per candidate."),
    final_epochs: int = typer.Option(20, "--final-epochs", help="Epochs for the selected architecture."),
    baseline: str = typer.Option(None, "--baseline", help="A model to compare with (fills the *_before keys)."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Search width, depth, resolution and kernel sizes for the most accurate model that fits."""
    from edgekiln.errors import EdgekilnError
    from edgekiln.search.arch import ArchBudget, ArchSearchConfig, ArchSpace, search_architecture
    from edgekiln.search.arch_report import write_arch_report
    from edgekiln.targets.units import parse_bytes

    if data.is_dir():
        train_npz, eval_npz, calib_npz = data / "train.npz", eval_ or data / "eval.npz", data / "calib.npz"
    else:
        train_npz, eval_npz, calib_npz = data, eval_, None
    for p in (train_npz, eval_npz):
        if p is None or not Path(p).is_file():
            raise EdgekilnError(f"{p or '--eval'}: data file not found (give a run folder or --data TRAIN --eval EVAL)")
    try:
        space = ArchSpace(families=tuple(f.strip() for f in families.split(",") if f.strip()), width=_floats(width),
                          depth=_ints(depth), resolution=_ints(resolution), kernel=_ints(kernel))
    except ValueError as exc:
        raise EdgekilnError(f"search space: {exc}") from None
    try:
        latency = float(max_latency.lower().removesuffix("ms")) if max_latency else None
    except ValueError:
        raise EdgekilnError(f"--max-latency '{max_latency}': expected milliseconds like 50ms") from None
    cfg = ArchSearchConfig(space=space, budget=ArchBudget(target=target, max_ram_bytes=parse_bytes(max_ram) if max_ram
                                                          else None,
                                                          max_flash_bytes=parse_bytes(max_flash) if max_flash else None,
                                                          max_latency_ms=latency),
                           candidates=candidates, epochs=epochs, final_epochs=final_epochs, seed=seed)
    base = None
    if baseline:
        from edgekiln.compress.report import measure
        from edgekiln.models.intake import load_model
        from edgekiln.models.run_folder import RunFolder

        base = measure(load_model(baseline, work_dir=RunFolder(out).work_dir / "baseline").path, eval_npz)
    result = search_architecture(train_npz, eval_npz, out, cfg, calib_npz=calib_npz if calib_npz and
                                 Path(calib_npz).is_file() else None, quiet=quiet)
    rep = write_arch_report(out, result, cfg, base)
    typer.echo(f"search-arch: {result.best.label}, accuracy {rep['metric']:.4f} (int8 {rep['metric_int8']:.4f}); "
               f"int8 flash {rep['flash_bytes']:,.0f} B, RAM {rep['ram_bytes']:,.0f} B on {target}: "
               f"{'fits' if rep['fits'] else 'does NOT fit'}; {rep['space_size']} architectures, {rep['trained']} "
               f"trained, {result.seconds:.0f} s; report: {out / 'report.md'}")
    if not rep["fits"]:
        raise typer.Exit(3)
