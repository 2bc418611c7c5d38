"""`edgekiln distill`: train a student from a teacher with soft targets (and optionally a feature
hint), optionally also without KD for comparison; a run folder with the before/after keys."""

from __future__ import annotations

from pathlib import Path

import typer


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
    temperature: float = typer.Option(4.0, "--temperature", help="Softmax temperature of the soft targets."),
    alpha: float = typer.Option(0.7, "--alpha", help="Weight of the soft-target loss (1 - alpha: hard labels)."),
    epochs: int = typer.Option(8, "--epochs"),
    lr: float = typer.Option(2e-3, "--lr"),
    mode: str = typer.Option("logits", "--mode", help="logits (classifiers) | embedding (match the outputs)."),
    embedding_loss: str = typer.Option("cosine", "--embedding-loss", help="embedding mode: cosine | mse."),
    hint_student: str = typer.Option("", "--hint-student", help="Student layer for a feature hint (module name)."),
    hint_teacher: str = typer.Option("", "--hint-teacher", help="Teacher layer the hint matches."),
    hint_weight: float = typer.Option(1.0, "--hint-weight"),
    augment: bool = typer.Option(False, "--augment", help="Small random affine transforms (images)."),
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
    from edgekiln.compress.report import before_after, measure, share_data, write_distill_report
    from edgekiln.errors import EdgekilnError
    from edgekiln.models.intake import load_model, run_folder_data
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.distill import DistillConfig, parse_student_args, resolve_student
    from edgekiln.passes.distill import run as distill

    data = run_folder_data(teacher)
    data.update({k: v for k, v in (("train", train), ("eval", eval_)) if v is not None})
    if "train" not in data:
        raise EdgekilnError("distill needs training data: pass --train TRAIN.npz or a run folder with train.npz")
    fields = {"student": resolve_student(student), "student_kwargs": parse_student_args(student_arg or []),
              "temperature": temperature, "alpha": alpha, "epochs": epochs, "lr": lr, "mode": mode,
              "embedding_loss": embedding_loss, "hint_student_layer": hint_student, "hint_teacher_layer": hint_teacher,
              "hint_weight": hint_weight, "augment": augment}
    cfg = DistillConfig.from_dict(fields)
    art = load_model(teacher, weights=weights, work_dir=out / "input")
    metric = "accuracy" if mode == "logits" else "cosine"
    ref = art.path if metric == "cosine" else None
    before = measure(art.path, data.get("eval"), metric=metric, reference=ref, runs=runs)
    result = distill(art, cfg, PassContext(work_dir=out, train_path=data["train"], seed=seed, quiet=quiet))
    keys = before_after(before, measure(result.path, data.get("eval"), metric=metric, reference=ref, runs=runs))
    no_kd = None
    if compare:
        plain = DistillConfig.from_dict({**fields, "alpha": 0.0, "hint_student_layer": "", "hint_teacher_layer": ""})
        base = distill(art, plain, PassContext(work_dir=out / "no-kd", train_path=data["train"], seed=seed,
                                               quiet=quiet))
        no_kd = measure(base.path, data.get("eval"), metric=metric, reference=ref, runs=runs)
    share_data({k: v for k, v in data.items() if k in ("calib", "eval", "train")}, out)
    rep = write_distill_report(out, keys=keys, config=cfg, result=result, metric_name=metric, no_kd=no_kd)
    without = "" if no_kd is None else f" (same student without KD: {_f(no_kd['metric'])})"
    line = (f"distill: {rep['before_is']} {metric} {_f(rep['metric_before'])}, student {_f(rep['metric'])}{without}; "
            f"params {rep['params_before']:,} -> {rep['params']:,}; host p50 {rep['latency_ms_before']:.4f} -> "
            f"{rep['latency_ms']:.4f} ms; report: {out / 'report.md'}")
    typer.echo(line)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
