"""`edgekiln bench`: latency percentiles, throughput, memory and size, per runtime."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.errors import EdgekilnError


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


def bench_command(
    model: str = typer.Argument(..., help="Model: .onnx/.tflite/.xml, file.py:factory, or a run folder."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime | openvino | litert | all"),
    threads: int = typer.Option(1, "--threads"),
    batch: int = typer.Option(1, "--batch"),
    warmup: int = typer.Option(50, "--warmup"),
    runs: int = typer.Option(200, "--runs"),
    input_shape: str = typer.Option(None, "--input-shape"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    out: Path = typer.Option(None, "--out", help="Write a run folder with report.json/.md and latency.png."),
) -> None:
    """Measure latency (min/mean/p50/p90/p99), throughput, peak RSS increase and model size."""
    from edgekiln.bench.harness import compare
    from edgekiln.bench.runtimes import REAL, RUNTIMES, available_runtimes

    path = _model_path(model, input_shape)
    names = list(REAL) if runtime == "all" else [runtime]
    if runtime != "all":
        if runtime not in RUNTIMES:
            raise EdgekilnError(f"unknown runtime '{runtime}'; known: {', '.join(RUNTIMES)}, all")
        reason = available_runtimes().get(runtime)
        if reason:
            raise EdgekilnError(f"runtime '{runtime}' is not available: {reason}")
    results = compare(path, names, threads=threads, batch=batch, warmup=warmup, runs=runs, progress=not as_json)
    rows = [r if isinstance(r, dict) else r.to_dict() for r in results]
    if out:
        _write_run(out, path, results)
    if as_json:
        typer.echo(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return
    _table(rows)


def _model_path(model: str, input_shape: str | None) -> Path:
    p = Path(model)
    if p.is_file() and p.suffix.lower() in (".tflite", ".xml"):
        return p
    from edgekiln.models.intake import load_model, parse_shape

    return load_model(model, input_shape=parse_shape(input_shape) if input_shape else None).path


def _table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgekiln.targets.units import format_bytes

    table = Table(title="edgekiln bench")
    for col in ("runtime", "p50 ms", "p90 ms", "p99 ms", "mean ms", "inf/s", "peak RSS +", "size"):
        table.add_column(col, justify="right")
    skipped = []
    for r in rows:
        if "skipped" in r:
            table.add_row(r["runtime"], "skipped", *[""] * 6)
            skipped.append(f"{r['runtime']}: {r['skipped']}")
            continue
        lat = r["latency_ms"]
        table.add_row(r["runtime"], f"{lat['p50']:.4f}", f"{lat['p90']:.4f}", f"{lat['p99']:.4f}", f"{lat['mean']:.4f}",
                      f"{r['throughput']:.0f}", format_bytes(r["peak_rss_bytes"]), format_bytes(r["model_bytes"]))
    console = Console()
    console.print(table)
    for line in skipped:
        console.print(f"skipped {line}")


def _write_run(out: Path, model: Path, results: list) -> None:  # noqa: ANN001
    from edgekiln.report import md_table, new_figure, save_figure, write_report

    measured = [r for r in results if not isinstance(r, dict)]
    fig, ax = new_figure(7, 3.5)
    for r in measured:
        ax.hist(r.samples_ms, bins=50, alpha=0.6, label=f"{r.runtime} (p50 {r.latency_ms['p50']:.3f} ms)")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("runs")
    ax.legend(fontsize=8)
    save_figure(fig, Path(out) / "latency.png")
    rows = [[r.runtime, r.runtime_version, r.latency_ms["p50"], r.latency_ms["p90"], r.latency_ms["p99"],
             r.throughput, r.peak_rss_bytes, r.model_bytes] for r in measured]
    rows += [[r["runtime"], "skipped", r["skipped"], "", "", "", "", ""] for r in results if isinstance(r, dict)]
    md = "\n".join([f"# edgekiln bench: {model.name}", "",
                    md_table(["runtime", "version", "p50 ms", "p90 ms", "p99 ms", "inf/s", "peak RSS + (B)", "size (B)"],
                             rows), "",
                    f"{measured[0].runs if measured else 0} timed runs after {measured[0].warmup if measured else 0} "
                    f"warm-up runs, batch {measured[0].batch if measured else 1}, "
                    f"{measured[0].threads if measured else 1} thread(s).", "", "![latency](latency.png)"])
    write_report(out, command="bench", data={"model": str(model), "results": [
        r if isinstance(r, dict) else r.to_dict() for r in results]}, markdown=md)
