"""`edgekiln learn`: train the model's head on new device samples, in numpy (no torch), and keep
the result only if the old classes did not forget more than a budget.

    edgekiln learn BUNDLE --data new.npz --new-classes 8,9 --out BUNDLE2     # a bundle folder
    edgekiln learn STATE --data shifted.npz                                  # an agent state folder

``new.npz`` holds ``x`` (inputs) and ``y`` (class indices). A bundle is adapted into ``--out``; an
agent state folder in place, through its A/B slots: the adapted model is sealed and switched to
only when accepted, and the agent reports it on its next cycle (docs/fleet-protocol.md).

Exit codes: 0 accepted; 3 rejected by the gate (the old classes dropped more than
``--budget-old-drop``, or the new ones did not gain): nothing changed; 2 bad input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import typer

from edgekiln.errors import EdgekilnError

EXIT_REJECTED = 3
_UNITS = {"": 1, "B": 1, "KB": 1024, "KIB": 1024, "MB": 1024**2, "MIB": 1024**2}


def register(app: typer.Typer) -> None:
    app.command("learn")(learn_command)


def parse_bytes(text: str) -> int:
    """``--replay-bytes``: a byte count with an optional unit, B, KB = KiB = 1024 B, MB = MiB.

    >>> parse_bytes("64KB"), parse_bytes("1MiB"), parse_bytes("0")
    (65536, 1048576, 0)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text or "")
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise EdgekilnError(f"--replay-bytes {text!r}: give bytes with an optional unit B, KB, KiB or MB (e.g. 256KB)")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_classes(text: str | None) -> tuple[int, ...]:
    """``--new-classes 8,9`` as ``(8, 9)``; empty for a domain shift (no new classes)."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise EdgekilnError(f"--new-classes {text!r}: give class numbers separated by commas, e.g. 8,9") from None


def learn_command(
    target: Path = typer.Argument(..., help="A bundle folder (manifest.json) or an agent state folder (state.json)."),
    data: Path = typer.Option(..., "--data", help="Device samples (.npz with x and y)."),
    new_classes: str = typer.Option(None, "--new-classes", help="New class numbers, continuing the model's "
                                    "(8,9 for an 8-class model); omit for a domain shift."),
    scope: str = typer.Option(None, "--scope", help="head (the last dense layer; default) or last-block (the last "
                              "two)."),
    replay_bytes: str = typer.Option(None, "--replay-bytes", help="Cap the replay of old features used (B, KB, "
                                     "KiB, MB; default: the bundle's buffer, built by `bundle --learn-data`)."),
    distill: float = typer.Option(None, "--distill", help="Weight of distillation towards the deployed model "
                                  "(default 0: cross-entropy only)."),
    freeze_old: bool = typer.Option(False, "--freeze-old", help="Keep the old classes' rows of the head."),
    steps: int = typer.Option(None, "--steps", help="Full-batch training steps (default: LearnConfig's)."),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default: LearnConfig's)."),
    optimizer: str = typer.Option(None, "--optimizer", help="adam (default) or sgd (momentum 0.9)."),
    budget_old_drop: float = typer.Option(None, "--budget-old-drop", help="Largest accuracy drop allowed on the "
                                          "old classes' held-out samples, a fraction (default 0.01 = 1 point)."),
    min_new_gain: float = typer.Option(None, "--min-new-gain", help="Gain the new classes (or shifted samples) "
                                       "must exceed (default 0)."),
    holdout: float = typer.Option(None, "--holdout", help="Share of the device samples held out for the gate "
                                  "(default: GateConfig's)."),
    out: Path = typer.Option(None, "--out", help="Folder for the adapted bundle (bundles only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
    seed: int = typer.Option(None, "--seed", help="Seed of the hold-out split and the training (default 0)."),
) -> None:
    """Learn new classes or a domain shift on the device; keep it only if the old classes hold."""
    from edgekiln.fleet.adapt import learn_target, load_samples
    from edgekiln.fleet.agent_crash import checkpoint_from_env
    from edgekiln.runtime.learner import GateConfig, LearnConfig

    replay = parse_bytes(replay_bytes) if replay_bytes is not None else None
    classes = parse_classes(new_classes)
    # NOTE: options left out keep the configs' defaults, documented once, on the config fields
    learn = LearnConfig(**_given(scope=scope, optimizer=optimizer, lr=lr, steps=steps, distill=distill,
                                 freeze_old=freeze_old or None, seed=seed))
    gate = GateConfig(**_given(budget_old_drop=budget_old_drop, min_new_gain=min_new_gain, holdout_share=holdout))
    x, y = load_samples(data)
    result = learn_target(target, x, y, out=out, learn=learn, gate=gate, new_classes=classes,
                          checkpoint=checkpoint_from_env(), replay_bytes=replay)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(summary(result))
    if not result["accepted"]:
        raise typer.Exit(EXIT_REJECTED)


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def summary(result: dict[str, Any]) -> str:
    """The lines ``edgekiln learn`` prints: accuracies before/after with their n, the drop against
    the budget, the verdict, and the cost of learning."""
    m = result.get("metrics") or {}

    def pct(key: str) -> str:
        v = m.get(key)
        return f"{100 * v:.1f}%" if isinstance(v, int | float) else "-"

    def n(key: str) -> str:
        v = m.get(key)
        return f"n={v}, resolution {100 / v:.1f}%" if isinstance(v, int) and v > 0 else "n=?"

    new_label = "new classes" if (result.get("adaptation") or {}).get("classes_after", 0) != \
        (result.get("adaptation") or {}).get("classes_before", 0) else "held-out device samples"
    lines = [f"old classes:  {pct('old_before')} -> {pct('old_after')}  ({n('n_old')})",
             f"{new_label + ':':13s} {pct('new_before')} -> {pct('new_after')}  ({n('n_new')})",
             f"drop on old classes {pct('old_drop')} (budget {pct('budget')})"]
    cost = []
    if isinstance(m.get("ms_per_step"), int | float):
        cost.append(f"{m['ms_per_step']:.2f} ms per step")
    for key, label in (("peak_bytes", "peak"), ("replay_bytes", "replay")):
        if isinstance(m.get(key), int | float):
            cost.append(f"{label} {m[key] / 1024:.1f} KiB")
    if cost:
        lines.append(", ".join(cost))
    where = {"state": f"active slot {result.get('slot')}", "bundle": str(result.get("out"))}.get(
        str(result.get("target")), "")
    if result.get("accepted"):
        lines.append(f"accepted: adaptation {result.get('id')} -> {where}")
    else:
        lines.append(f"rejected: {'; '.join(result.get('reasons') or ['the gate refused it'])} (nothing changed)")
    return "\n".join(lines)
