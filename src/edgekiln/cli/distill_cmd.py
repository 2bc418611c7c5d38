"""`edgekiln distill`: train a student from a teacher with soft targets (and optionally a feature
hint), optionally also without KD for comparison; a run folder with the before/after keys.

Thin: the options become a :class:`~edgekiln.passes.distill.DistillConfig` (whose fields hold
the help texts) and :func:`edgekiln.api.distill` runs it through the pass pipeline.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgekiln.cli.options import config_option, input_shape_option
from edgekiln.passes.distill import DistillConfig as D


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_command)


def distill_command(
    teacher: str = typer.Argument(..., help="Teacher: a run folder (e.g. from `edgekiln example` or `edgekiln prune`) "
                                            "or file.py:factory with --weights."),
    student: str = typer.Option(..., "--student", help="A zoo builder name (ds_cnn, mobilenet_v2_style, ...), "
                                                       "module:factory, file.py:factory, or 'self' (a pruned "
                                                       "run folder: the model before pruning teaches it)."),
    student_arg: list[str] = typer.Option(None, "--student-arg", help="key=value for the student builder "
                                                                      "(repeatable), e.g. channels=32."),
    weights: Path = typer.Option(None, "--weights", help="Teacher state_dict for a file.py:factory TEACHER."),
    input_shape: list[str] = input_shape_option(),
    temperature: float = config_option(D, "temperature"),
    alpha: float = config_option(D, "alpha"),
    epochs: int = config_option(D, "epochs"),
    lr: float = config_option(D, "lr"),
    mode: str = config_option(D, "mode"),
    embedding_loss: str = config_option(D, "embedding_loss"),
    hint_student: str = config_option(D, "hint_student_layer", "--hint-student"),
    hint_teacher: str = config_option(D, "hint_teacher_layer", "--hint-teacher"),
    hint_weight: float = config_option(D, "hint_weight"),
    augment: bool = config_option(D, "augment"),
    compare: bool = typer.Option(False, "--compare-no-kd", help="Also train the same student without KD "
                                                                "(same seed) and report both."),
    train: Path = typer.Option(None, "--train", help="Training data (.npz with x, y); a run folder's train.npz."),
    eval_: Path = typer.Option(None, "--eval", help="Evaluation data (.npz); a run folder's eval.npz."),
    seed: int = typer.Option(0, "--seed"),
    runs: int = typer.Option(300, "--bench-runs", help="Timed runs per latency measurement."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Distill a teacher into a (smaller) student; report both, and the student without KD if asked."""
    from edgekiln.api import distill
    from edgekiln.models.intake import parse_shapes
    from edgekiln.passes.distill import parse_student_args, resolve_student

    cfg = D.from_dict({"student": resolve_student(student), "student_kwargs": parse_student_args(student_arg or []),
                       "temperature": temperature, "alpha": alpha, "epochs": epochs, "lr": lr, "mode": mode,
                       "embedding_loss": embedding_loss, "hint_student_layer": hint_student,
                       "hint_teacher_layer": hint_teacher, "hint_weight": hint_weight, "augment": augment})
    run = distill(teacher, cfg, data={"train": train, "eval": eval_}, weights=weights,
                  input_shapes=parse_shapes(input_shape), out=out, seed=seed, bench_runs=runs, compare_no_kd=compare,
                  quiet=quiet)
    rep = run.report()
    without = f" (same student without KD: {_f(rep['metric_no_kd'])})" if compare else ""
    line = (f"distill: {rep['before_is']} {rep['metric_name']} {_f(rep['metric_before'])}, student {_f(rep['metric'])}{without}; "
            f"params {rep['params_before']:,} -> {rep['params']:,}; host p50 {rep['latency_ms_before']:.4f} -> "
            f"{rep['latency_ms']:.4f} ms; report: {out / 'report.md'}")
    typer.echo(line)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
