"""`edgekiln bundle` (run folders -> deployment bundle) and `edgekiln run` (infer from a bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.errors import EdgekilnError


def register(app: typer.Typer) -> None:
    app.command("bundle")(bundle_command)
    app.command("run")(run_command)


def bundle_command(
    runs: list[Path] = typer.Argument(..., help="Run folders (quantize, optimize, example, ...), one variant each."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to create."),
    name: str = typer.Option("model", "--name"),
    version: str = typer.Option("1", "--version"),
    default: str = typer.Option(None, "--default", help="Default variant name (first run folder's otherwise)."),
    learn_data: Path = typer.Option(None, "--learn-data",
                                    help="Labelled npz (x, y; e.g. RUN/train.npz): add a replay buffer of its "
                                         "features and held-out eval features per variant, for `edgekiln learn`."),
    replay_bytes: str = typer.Option("256KB", "--replay-bytes",
                                     help="Replay buffer size per variant with --learn-data (B, KB = KiB, MB). "
                                          "64KB missed a 1% forgetting budget on MNIST; 256KB met it."),
    learn_scope: str = typer.Option("head", "--learn-scope",
                                    help="Which tail the replay's features feed: head | last-block."),
) -> None:
    """Build a deployment bundle: manifest + model variants + health-check samples."""
    from edgekiln.runtime.bundle import LearnData, build_bundle

    learn = None
    if learn_data is not None:
        from edgekiln.cli.learn_cmd import parse_bytes
        from edgekiln.runtime.head_split import SCOPES

        if not learn_data.is_file():
            raise EdgekilnError(f"--learn-data {learn_data}: file not found")
        if learn_scope not in SCOPES:
            raise EdgekilnError(f"--learn-scope must be one of {', '.join(SCOPES)}, not {learn_scope!r}")
        learn = LearnData(data=learn_data, replay_bytes=parse_bytes(replay_bytes), scope=learn_scope)
    manifest = build_bundle(list(runs), out, name=name, version=version, default=default, learn=learn)
    typer.echo(f"bundle {manifest.name} v{manifest.version} -> {out} "
               f"({', '.join(f'{v.name}: {v.size_bytes / 1024:.1f} KB' for v in manifest.variants)})")
    for variant, entry in manifest.learn.items():
        import numpy as np

        with np.load(Path(out) / entry["holdout"]) as held:
            n = int(held["y"].size)
        note = "" if n else (" (no sample: the run folder has no labelled eval data; `learn` gates on the device's "
                             "own held-out samples only and refuses new classes without old-class samples)")
        typer.echo(f"  learn {variant}: replay {entry['replay']} ({entry['storage']}, cut {entry['cut']}), "
                   f"holdout {entry['holdout']}: {n} samples{note}")


def run_command(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    input: Path = typer.Option(..., "--input", help="Input tensor (.npy)."),
    variant: str = typer.Option(None, "--variant", help="Variant to use (default: the bundle's default)."),
    threads: int = typer.Option(1, "--threads"),
    repeat: int = typer.Option(1, "--repeat", help="Run the input this many times (for the latency stats)."),
    output: Path = typer.Option(None, "--output", help="Write the output tensor (.npy)."),
    device: str = typer.Option("auto", "--device",
                               help="auto | cpu | an onnxruntime provider present here (cuda, tensorrt, ...)."),
) -> None:
    """Run a bundle on an input and print the output summary and latency stats as JSON.

    A variant the bundle places (manifest `placements`, from `edgekiln place`) runs as its chain of
    segments; "placement" then shows each segment's source and time."""
    import numpy as np

    from edgekiln.runtime.engine import Runtime

    if not input.is_file():
        raise EdgekilnError(f"{input}: file not found")
    try:
        x = np.load(input, allow_pickle=False)
    except ValueError as exc:
        raise EdgekilnError(f"{input}: not a .npy array ({exc})") from None
    rt = Runtime(bundle, threads=threads, device=device)
    y = None
    for _ in range(max(1, repeat)):
        y = rt.infer(x, variant=variant)
    if output:
        import io

        from edgekiln.fileio import atomic_write_bytes

        buf = io.BytesIO()
        np.save(buf, y)
        atomic_write_bytes(output, buf.getvalue())
    summary = {"output_shape": list(y.shape), "top1": y.reshape(y.shape[0], -1).argmax(1).tolist(), **rt.stats(),
               "device": _short(rt.providers[0]), "providers": list(rt.providers)}
    placed = rt.placement(rt.current)
    if placed:
        chain = rt.session(rt.current)
        summary["placement"] = {"file": placed, "sources": list(getattr(chain, "sources", [])),
                                "last_ms": [round(t, 4) for t in getattr(chain, "last_ms", [])]}
    typer.echo(json.dumps(summary, indent=2))


def _short(provider: str) -> str:
    from edgekiln.execution.runtimes import DEVICES

    return next((k for k, v in DEVICES.items() if v == provider), provider)
