"""`edgekiln bench`: latency percentiles, throughput, memory and size, per runtime."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.cli.options import input_shape_option


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


def bench_command(
    model: str = typer.Argument(..., help="Model: .onnx/.tflite/.xml, file.py:factory, or a run folder."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime | openvino | litert | all"),
    threads: int = typer.Option(1, "--threads"),
    batch: int = typer.Option(1, "--batch"),
    warmup: int = typer.Option(50, "--warmup"),
    runs: int = typer.Option(200, "--runs"),
    input_shape: list[str] = input_shape_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    out: Path = typer.Option(None, "--out", help="Write a run folder with report.json/.md and latency.png."),
) -> None:
    """Measure latency (min/mean/p50/p90/p99), throughput, peak RSS increase and model size."""
    from edgekiln.api import bench, bench_artifact
    from edgekiln.models.intake import parse_shapes

    shapes = parse_shapes(input_shape)
    art = bench_artifact(model, shapes)
    results = bench(art or model, runtimes=(runtime,), input_shapes=shapes, threads=threads, batch=batch,
                    warmup=warmup, runs=runs, progress=not as_json)
    rows = [r if isinstance(r, dict) else r.to_dict() for r in results]
    if out:
        _write_run(out, art.path if art is not None else Path(model), art, results)
    if as_json:
        typer.echo(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return
    _table(rows)


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


def _write_run(out: Path, model: Path, art, results: list) -> None:  # noqa: ANN001
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.report import md_table, new_figure, save_figure

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
    RunFolder(out).write(command="bench", model=art, markdown=md, measurements={
        "source": str(model), "results": [r if isinstance(r, dict) else r.to_dict() for r in results]})
