"""The Python API: the calls the CLI commands make, so a script and the CLI share one code path.

``edgekiln.load``, ``edgekiln.quantize`` ... resolve to the functions here (lazily: ``import
edgekiln`` loads neither torch nor onnxruntime). Every command that writes a run folder returns
a :class:`~edgekiln.models.run_folder.RunFolder`: ``.read()`` is the model, ``.report()`` the
measurements of ``report.json``.

>>> import tempfile, edgekiln
>>> from edgekiln.testing.tiny import tiny_conv_onnx
>>> tmp = tempfile.mkdtemp()
>>> art = edgekiln.load(tiny_conv_onnx(tmp + "/m.onnx"))
>>> art.kind, art.input_shapes
('onnx', {'input': (1, 1, 8, 8)})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekiln.errors import EdgekilnError

if TYPE_CHECKING:
    from edgekiln.models.analysis import ModelAnalysis
    from edgekiln.models.artifact import ModelArtifact
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.passes.distill import DistillConfig
    from edgekiln.passes.prune import PruneConfig
    from edgekiln.passes.quantize import QuantizeConfig
    from edgekiln.search.optimize import OptimizeResult
    from edgekiln.search.recipe import Recipe
    from edgekiln.targets.fit import FitReport

PathLike = str | Path
Shapes = Mapping[str, tuple[int, ...]] | tuple[int, ...] | None


def load(model: PathLike, *, input_shapes: Shapes = None, data: Mapping[str, PathLike | None] | None = None,
         weights: PathLike | None = None, work_dir: PathLike | None = None) -> ModelArtifact:
    """MODEL (``.onnx``, ``file.py:factory``, TorchScript/``.pt2`` or a run folder) through the one intake.

    ``input_shapes`` fixes dynamic dimensions (``{name: shape}``, or one shape for the only
    input); ``data`` names ``.npz`` files (``{"calib": ..., "eval": ...}``) that fix them too.

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> path = tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx")      # batch dimension "N"
    >>> load(path, input_shapes=(4, 1, 8, 8)).input_shape
    (4, 1, 8, 8)
    """
    from edgekiln.models.intake import load_model

    return load_model(model, input_shapes=input_shapes, data=data, weights=weights, work_dir=work_dir)


def inspect(model: PathLike, *, input_shapes: Shapes = None, out: PathLike | None = None) -> ModelAnalysis:
    """Parameters, MACs, bytes, peak activation memory and op support of MODEL (``edgekiln inspect``);
    with ``out``, also the run folder (report.json/md, analysis.png).

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> a = inspect(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"))
    >>> a.macs, a.params
    (2736, 1490)
    """
    from edgekiln.models.analysis import analyze
    from edgekiln.models.analysis_report import plot_analysis, render_markdown
    from edgekiln.models.run_folder import RunFolder

    art = load(model, input_shapes=input_shapes, work_dir=RunFolder(out).work_dir / "model" if out else None)
    analysis = analyze(art.path, input_shapes=art.input_shapes)
    if out is not None:
        plot_analysis(analysis, Path(out) / "analysis.png")
        RunFolder(out).write(command="inspect", model=art, measurements={"spec": str(model), **analysis.to_dict()},
                             markdown=render_markdown(analysis) + "\n![analysis](analysis.png)\n")
    return analysis


def fits(model: PathLike, target: str, *, precision: str | None = None, max_latency_ms: float | None = None,
         max_ram: int | str | None = None, max_flash: int | str | None = None, input_shapes: Shapes = None,
         out: PathLike | None = None) -> FitReport:
    """Flash, RAM, estimated latency and energy of MODEL on device ``target`` (a profile name or
    YAML file) against its budgets (``edgekiln fits``); with ``out``, also the run folder.

    ``precision`` (int8 | fp16 | fp32) is the number format the model is deployed in (default:
    the model's own); activations count at that size (an int8 QDQ model's quantized
    activations at 1 byte; a float model's at 1 byte when estimated for ``"int8"``). On a
    microcontroller an int8 QDQ model the C backend compiles is measured by its memory plan.
    ``max_ram``/``max_flash`` override the profile's budgets (bytes, or ``"256KB"``).

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> path = tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx")
    >>> r32, r8 = fits(path, "cortex-m7"), fits(path, "cortex-m7", precision="int8")
    >>> r32.fits, r32.ram_source
    (True, 'analysis (peak activations + I/O; fp32, estimated)')
    >>> int(r32.metrics["ram"].value - r8.metrics["ram"].value)   # (1152 + 296) B of float activations and I/O, at 1/4
    1086
    """
    from dataclasses import replace

    from edgekiln.models.analysis import analyze
    from edgekiln.models.run_folder import RunFolder, precision_of
    from edgekiln.search.trial import c_backend_footprint
    from edgekiln.targets.fit import estimate_fit
    from edgekiln.targets.kernel_kinds import macs_by_kernel_kind
    from edgekiln.targets.profiles import load_profile
    from edgekiln.targets.units import parse_bytes

    profile = load_profile(target)
    art = load(model, input_shapes=input_shapes, work_dir=RunFolder(out).work_dir / "model" if out else None)
    prec = precision or precision_of(art.kind)
    info = analyze(art.path, art.input_shapes, precision=prec if prec in ("int8", "fp16", "fp32") else None)
    measured = None
    if profile.measured:
        from edgekiln.execution.timing import benchmark

        measured = benchmark(art.path, runtime="onnxruntime", threads=1, runs=200,
                             input_shapes=art.input_shapes).latency_ms["p50"]
    c_fp = c_backend_footprint(art.path, art.kind, profile, input_shapes=art.input_shapes)

    def nbytes(v: int | str | None) -> int | None:
        return parse_bytes(v) if isinstance(v, str) else v

    report = estimate_fit(profile, weight_bytes=c_fp.flash["weights"] + c_fp.flash["params"] if c_fp else info.weight_bytes,
                          code_bytes=c_fp.flash["code_estimate"] if c_fp else 0,
                          peak_activation_bytes=c_fp.ram_bytes if c_fp else info.peak_activation_bytes,
                          io_bytes=0 if c_fp else info.io_bytes, macs=info.macs, precision=prec,
                          macs_by_kind=macs_by_kernel_kind(art.path, info.layers),
                          measured_instructions=_measured_instructions(model, profile) if c_fp else None,
                          measured_latency_ms=measured, max_latency_ms=max_latency_ms,
                          max_ram_bytes=nbytes(max_ram), max_flash_bytes=nbytes(max_flash))
    if c_fp is None:
        from edgekiln.targets.place_io import fit_with_placement

        report = fit_with_placement(report, profile, art.path, art.input_shapes, prec)
    report = replace(report, ram_source="C backend memory plan (arena incl. I/O)" if c_fp else
                     f"analysis (peak activations + I/O; {info.activation_precision})",
                     flash_source="C backend (arrays + params + code estimate)" if c_fp else "analysis (weights only)")
    if out is not None:
        RunFolder(out).write(command="fits", model=art, measurements=report.to_dict(), markdown=report.render_markdown())
    return report


def place(model: PathLike, target: str, *, objective: str = "latency", precision: str | None = None,
          input_shapes: Shapes = None, out: PathLike | None = None, measure: bool = True) -> Any:
    """Place each contiguous segment of MODEL on the compute unit of ``target`` that runs it best
    (``edgekiln place``); a :class:`~edgekiln.targets.placement.Placement`. With ``out``: the
    segment files, placement.json and report.json/md (see docs/report-schema.md). On ``host``
    the runtimes are measured end to end (``measure``); elsewhere the times are estimates.

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> p = place(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"), "coral-edgetpu")   # a float model
    >>> [s.unit for s in p.segments], [f.reason for f in p.fallback]
    (['cpu'], ["runs none of the model's 3 nodes (first: Conv is fp32 (tpu runs int8 only))"])
    """
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.targets.place_io import place_model, render_markdown
    from edgekiln.targets.profiles import load_profile

    profile = load_profile(target)
    art = load(model, input_shapes=input_shapes, work_dir=RunFolder(out).work_dir / "model" if out else None)
    placement, report = place_model(art, profile, objective=objective, precision=precision, out=out,
                                    measure=measure, to_tflite=_tflite_block)
    if out is not None:
        RunFolder(out).write(command="place", model=art, measurements=report, markdown=render_markdown(report))
    return placement


def _tflite_block(qdq_path: Path, work: Path, feed: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """A block of an int8 QDQ model as ``.tflite`` (codegen sits above targets, so it is passed in)."""
    from edgekiln.codegen.tflite.candidate import litert_candidate

    return litert_candidate(qdq_path, work, feed, shapes)


def bench(model: PathLike | ModelArtifact, *, runtimes: Sequence[str] = ("onnxruntime",), input_shapes: Shapes = None,
          threads: int = 1, batch: int = 1, warmup: int = 50, runs: int = 200,
          progress: bool = False) -> list[Any]:
    """Latency percentiles, throughput, peak RSS and size of MODEL on each runtime (``edgekiln bench``).

    One :class:`~edgekiln.execution.timing.BenchResult` per runtime, or ``{"runtime", "skipped"}``
    for one that is not installed. ``runtimes=("all",)`` means every real runtime. MODEL may be
    a loaded artifact, or a ``.tflite``/OpenVINO ``.xml`` file (benchmarked as is; name its inputs
    in ``input_shapes``).

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> [r] = bench(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"), warmup=2, runs=5)
    >>> r.runtime, r.runs, r.latency_ms["p50"] > 0
    ('onnxruntime', 5, True)
    """
    from edgekiln.execution.runtimes import REAL, RUNTIMES, available_runtimes
    from edgekiln.execution.timing import compare
    from edgekiln.models.artifact import ModelArtifact

    names = list(REAL) if list(runtimes) == ["all"] else list(runtimes)
    for name in names:
        if name not in RUNTIMES:
            raise EdgekilnError(f"unknown runtime '{name}'; known: {', '.join(RUNTIMES)}, all")
        reason = available_runtimes().get(name)
        if reason and list(runtimes) != ["all"]:
            raise EdgekilnError(f"runtime '{name}' is not available: {reason}")
    art = model if isinstance(model, ModelArtifact) else bench_artifact(model, input_shapes)
    path = art.path if art is not None else Path(model)
    if art is None:
        if input_shapes is not None and not isinstance(input_shapes, Mapping):
            raise EdgekilnError("name the input when giving a shape for a .tflite/.xml file (--input-shape NAME=d0,d1)")
        shapes = dict(input_shapes) if input_shapes else None
    else:
        shapes = {s.name: (batch, *s.shape[1:]) if batch > 1 and s.shape[:1] == (1,) else s.shape for s in art.inputs}
    return compare(path, names, threads=threads, batch=batch, warmup=warmup, runs=runs, progress=progress,
                   input_shapes=shapes)


def bench_artifact(model: PathLike, input_shapes: Shapes = None) -> ModelArtifact | None:
    """What :func:`bench` times: MODEL through the intake; None for a ``.tflite`` or OpenVINO ``.xml``
    file (benchmarked as is)."""
    p = Path(model)
    if p.is_file() and p.suffix.lower() in (".tflite", ".xml"):
        return None
    return load(model, input_shapes=input_shapes)


def quantize(model: PathLike, scheme: str | None = None, *, out: PathLike, config: QuantizeConfig | None = None,
             calib: PathLike | None = None, eval: PathLike | None = None, metric: str = "accuracy",
             input_shapes: Shapes = None, bench_runs: int = 200,
             progress: Callable[[int, int], None] | None = None) -> RunFolder:
    """Quantize MODEL into the run folder ``out`` (``edgekiln quantize``): the quantize pass run
    through the pipeline (chain and strict checks, provenance), then FP32 vs quantized measured on
    every runtime, with the parity check and, with ``eval`` data, the metric before and after.

    ``scheme`` overrides ``config.scheme``; ``config`` holds every other option
    (:class:`~edgekiln.passes.quantize.QuantizeConfig`). ``calib``/``eval`` default to the data of a
    run folder MODEL.

    >>> import tempfile
    >>> from edgekiln.testing.tiny import random_npz, tiny_conv_onnx
    >>> tmp = Path(tempfile.mkdtemp())
    >>> calib = random_npz(tmp / "calib.npz", (1, 1, 8, 8), n=16)
    >>> run = quantize(tiny_conv_onnx(tmp / "m.onnx"), "int8", calib=calib, out=tmp / "q", bench_runs=5)
    >>> run.read().kind, run.report()["scheme"], run.report()["size_ratio"] < 0.5
    ('onnx-qdq', 'int8', True)
    """
    from dataclasses import replace

    from edgekiln.execution.feeds import calibration_feeds, load_npz
    from edgekiln.models.artifact import ONNX_FLOAT
    from edgekiln.models.intake import run_folder_data
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.quantize import QuantizeConfig, metric_pair, result_of
    from edgekiln.pipeline import Step, run_pipeline
    from edgekiln.quant.report import (
        accuracy_floor,
        parity,
        runtime_table,
        speed_verdict,
        time_profile,
        write_quantize_report,
    )

    cfg = config or QuantizeConfig()
    if scheme is not None:
        cfg = QuantizeConfig.from_dict({**cfg.to_dict(), "scheme": scheme})
    stored = run_folder_data(model)
    calib, eval = calib or stored.get("calib"), eval or stored.get("eval")
    if cfg.max_drop is not None and eval is None:
        raise EdgekilnError("--max-drop needs evaluation data: pass --eval EVAL.npz")
    data = {k: Path(v) for k, v in (("calib", calib), ("eval", eval)) if v}
    run = RunFolder(out)
    art = load(model, input_shapes=input_shapes, data=data, work_dir=run.work_dir / "input")
    if art.kind != ONNX_FLOAT:
        raise EdgekilnError(f"{model}: the model is already quantized ({art.kind}); quantize takes a float model: "
                            "give the float model it was made from")
    ctx = PassContext(work_dir=run.work_dir, calib_path=data.get("calib"), eval_path=data.get("eval"), metric=metric,
                      progress=progress)
    quantized = run_pipeline(art, [Step("quantize", cfg)], ctx)
    # NOTE: a quantized ONNX file is not what its torch source builds: it leaves the artifact.
    quantized = replace(quantized, torch=None, data=data)
    res = result_of(quantized)
    if eval is not None and res.metric is None:   # the pass measures only when it enforces max_drop
        res.metric_fp32, res.metric = metric_pair(art.path, quantized.path, eval, metric)
    others = _litert_form(quantized, run.work_dir / "litert") if cfg.scheme == "int8" else {}
    held = calibration_feeds(art.path, eval or calib, 8) if (eval or calib) else None
    runtimes = runtime_table(art.path, quantized.path, runs=bench_runs, warmup=min(50, bench_runs),
                             input_shapes=art.input_shapes, other_forms=others, accuracy_feeds=held)
    par = parity(quantized.path, load_npz(eval or calib)) if (eval or calib) and cfg.scheme != "fp16" else {}
    verdict = speed_verdict(runtimes, accuracy_floor(res))
    onnx_rows = [r for r in runtimes if "fp32_p50" in r and "p50" in r]
    prof = None
    if verdict and onnx_rows:   # NOTE: LiteRT has no per-layer profiler here: the fastest ONNX runtime's
        on = verdict["runtime"] if verdict["runtime"] in {r["runtime"] for r in onnx_rows} else \
            min(onnx_rows, key=lambda r: r["p50"])["runtime"]
        prof = time_profile(art.path, quantized.path, on, art.input_shapes)
    write_quantize_report(Path(out), scheme=cfg.scheme, metric_name=metric, fp32=art.path, res=res, runtimes=runtimes,
                          parity_result=par, config=cfg.to_dict(), model=quantized, profile=prof)
    return run


def _litert_form(quantized: Any, work: Path) -> dict[str, dict[str, Any]]:
    """The int8 model as a ``.tflite`` for LiteRT to compete on (``{"litert": {"path"} | {"error"}}``)."""
    from edgekiln.codegen.tflite.candidate import litert_candidate
    from edgekiln.execution.feeds import random_feeds

    try:
        feed = random_feeds(quantized.inputs)
    except EdgekilnError as exc:
        return {"litert": {"error": str(exc)}}
    return {"litert": litert_candidate(quantized.path, work, feed, quantized.input_shapes)}


def _measured_instructions(model: PathLike, profile: Any) -> int | None:
    """Instructions per inference an ``optimize`` run folder measured for its C library on ``profile``'s
    emulated CPU (report.json ``deployment.measured``), or None."""
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.search.mcu import emulated_cpu

    run = RunFolder(model)
    if not Path(model).is_dir() or not run.is_run_folder():
        return None
    measured = ((run.report().get("deployment") or {}).get("measured") or {})
    if measured.get("cpu") != emulated_cpu(profile) or not measured.get("instructions_per_inference"):
        return None
    return int(measured["instructions_per_inference"])


def prune(model: PathLike, config: PruneConfig | None = None, *, out: PathLike,
          data: Mapping[str, PathLike] | None = None, weights: PathLike | None = None, input_shapes: Shapes = None,
          seed: int = 0, bench_runs: int = 300, scan: bool = False, quiet: bool = True) -> RunFolder:
    """Prune MODEL (it needs its PyTorch source: a run folder or ``file.py:factory`` with ``weights``),
    fine-tune it, and write the before/after run folder ``out`` (``edgekiln prune``).

    ``data`` names ``train`` (required unless MODEL is a run folder with it), ``calib`` (the
    sensitivity scan) and ``eval`` ``.npz`` files; ``scan`` also plots the per-layer sensitivity.

    >>> import tempfile
    >>> from edgekiln.passes.prune import PruneConfig
    >>> from edgekiln.testing.tiny import random_npz
    >>> tmp = Path(tempfile.mkdtemp())
    >>> train = random_npz(tmp / "train.npz", (1, 1, 8, 8), n=32)
    >>> run = prune("edgekiln.testing.tiny:tiny_torch_cnn", PruneConfig(ratio=0.5, finetune_epochs=1),
    ...             data={"train": train, "eval": train}, out=tmp / "p", bench_runs=5)
    >>> rep = run.report()
    >>> rep["params"] < rep["params_before"], run.read().torch is not None
    (True, True)
    """
    from dataclasses import replace

    from edgekiln.compress.report import before_after, measure, write_prune_report
    from edgekiln.models.intake import run_folder_data
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.prune import PruneConfig
    from edgekiln.pipeline import Step, check_chain, run_pipeline

    cfg = config or PruneConfig()
    files = {**run_folder_data(model), **{k: Path(v) for k, v in (data or {}).items() if v is not None}}
    run = RunFolder(out)
    art = load(model, input_shapes=input_shapes, data=files, weights=weights, work_dir=run.work_dir / "input")
    # NOTE: what the model lacks (its PyTorch source) is named before what the call lacks (data).
    check_chain(art.kind, [Step("prune", cfg)], has_torch_source=art.torch is not None)
    if "train" not in files:
        raise EdgekilnError("prune needs fine-tuning data: pass --train TRAIN.npz (x, y) or a run folder with train.npz")
    before = measure(art.path, files.get("eval"), runs=bench_runs)
    ctx = PassContext(work_dir=run.work_dir, train_path=files["train"], calib_path=files.get("calib"),
                      eval_path=files.get("eval"), seed=seed, quiet=quiet)
    result = run_pipeline(art, [Step("prune", cfg)], ctx)
    scan_result = result.provenance[-1].get("sensitivity")
    if scan and scan_result is None:
        from rich.progress import Progress

        from edgekiln.compress.sensitivity import scan_artifact

        with Progress(disable=quiet, transient=True) as bar:
            task = bar.add_task("sensitivity scan", total=None)
            scan_result = scan_artifact(art, files.get("calib") or files["train"], importance=cfg.importance,
                                        progress=lambda i, n: bar.update(task, completed=i, total=n))
    keys = before_after(before, measure(result.path, files.get("eval"), runs=bench_runs))
    write_prune_report(Path(out), keys=keys, config=cfg, result=replace(result, data=files), sensitivity=scan_result)
    return run


def distill(teacher: PathLike, config: DistillConfig, *, out: PathLike, data: Mapping[str, PathLike] | None = None,
            weights: PathLike | None = None, input_shapes: Shapes = None, seed: int = 0, bench_runs: int = 300,
            compare_no_kd: bool = False, quiet: bool = True) -> RunFolder:
    """Distill TEACHER into ``config.student`` and write the run folder ``out`` (``edgekiln distill``);
    ``compare_no_kd`` also trains the same student without KD (same seed) and reports it.

    ``data`` names ``train`` (required unless TEACHER is a run folder with it) and ``eval``.

    >>> import tempfile
    >>> from edgekiln.passes.distill import DistillConfig
    >>> from edgekiln.testing.tiny import random_npz
    >>> tmp = Path(tempfile.mkdtemp())
    >>> train = random_npz(tmp / "train.npz", (1, 1, 8, 8), n=32)
    >>> cfg = DistillConfig(student="edgekiln.testing.tiny:tiny_torch_cnn", epochs=1)
    >>> run = distill("edgekiln.testing.tiny:tiny_torch_cnn", cfg, data={"train": train}, out=tmp / "d",
    ...               bench_runs=5)
    >>> run.report()["params"] == run.report()["params_before"]
    True
    """
    from dataclasses import replace

    from edgekiln.compress.report import before_after, measure, write_distill_report
    from edgekiln.models.intake import run_folder_data
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.passes.base import PassContext
    from edgekiln.pipeline import Step, check_chain, run_pipeline

    files = {**run_folder_data(teacher), **{k: Path(v) for k, v in (data or {}).items() if v is not None}}
    run = RunFolder(out)
    art = load(teacher, input_shapes=input_shapes, data=files, weights=weights, work_dir=run.work_dir / "input")
    check_chain(art.kind, [Step("distill", config)], has_torch_source=art.torch is not None)
    if "train" not in files:
        raise EdgekilnError("distill needs training data: pass --train TRAIN.npz or a run folder with train.npz")
    metric = "accuracy" if config.mode == "logits" else "cosine"
    ref = art.path if metric == "cosine" else None
    before = measure(art.path, files.get("eval"), metric=metric, reference=ref, runs=bench_runs)

    def trained(cfg: DistillConfig, work: Path) -> ModelArtifact:
        ctx = PassContext(work_dir=work, train_path=files["train"], seed=seed, quiet=quiet)
        return run_pipeline(art, [Step("distill", cfg)], ctx)

    result = trained(config, run.work_dir)
    keys = before_after(before, measure(result.path, files.get("eval"), metric=metric, reference=ref, runs=bench_runs))
    no_kd = None
    if compare_no_kd:
        plain = replace(config, alpha=0.0, hint_student_layer="", hint_teacher_layer="")
        base = trained(plain, run.work_dir / "no-kd")
        no_kd = measure(base.path, files.get("eval"), metric=metric, reference=ref, runs=bench_runs)
    result = replace(result, data={k: v for k, v in files.items() if k in ("calib", "eval", "train")})
    write_distill_report(Path(out), keys=keys, config=config, result=result, metric_name=metric, no_kd=no_kd)
    return run


def measure_mcu(path: PathLike, *, cpu: str = "cortex-m4", opt: str = "O2", data: PathLike | None = None,
                model: PathLike | None = None, limit: int = 10, out: PathLike | None = None) -> dict[str, Any]:
    """Instructions per inference (total and per layer), sizes, arena, stack high-water and output
    agreement of the C library in ``path`` (or ``path/c``) on an emulated Cortex-M4 or M7
    (``edgekiln measure-mcu``); with ``out``, also the run folder (report.json/md, the ELF files).

    For example ``measure_mcu("runs/mnist-c", cpu="cortex-m4", opt="Os")["instructions_per_inference"]``
    (it needs arm-none-eabi-gcc and qemu-system-arm: ``scripts/system-deps.sh`` installs them).
    """
    from edgekiln.codegen.mcu.measure import measure_mcu as measure
    from edgekiln.codegen.mcu.measure import render_markdown
    from edgekiln.models.run_folder import RunFolder

    rep = measure(path, cpu=cpu, opt=opt, data=data, model=model, limit=limit,
                  build_dir=Path(out) / "build" if out is not None else None)
    if out is not None:
        RunFolder(out).write(command="measure-mcu", model=None, measurements=rep, markdown=render_markdown(rep))
    return rep


def optimize(model: PathLike | None = None, *, out: PathLike, target: str | None = None,
             recipe: PathLike | Mapping[str, Any] | Recipe | None = None, calib: PathLike | None = None,
             eval: PathLike | None = None, metric: str | None = None, input_shapes: Sequence[str] | None = None,
             constraints: Mapping[str, Any] | None = None, search: Mapping[str, Any] | None = None,
             resume: bool = False, quiet: bool = True, on_trial: Callable[[Any], None] | None = None) -> OptimizeResult:
    """Find the best model that fits ``target`` within the budgets (``edgekiln optimize``).

    ``recipe`` is a YAML file, its dict or a :class:`~edgekiln.search.recipe.Recipe`; the other
    arguments override its fields (see :func:`make_recipe`). The run folder is ``out``; its
    ``model.onnx`` is the selected model (on a microcontroller target also its C library, ``c/``,
    verified and, with QEMU installed, measured); ``on_trial`` is called with each finished candidate.

    >>> import tempfile
    >>> from edgekiln.testing.tiny import random_npz, tiny_conv_onnx
    >>> tmp = Path(tempfile.mkdtemp())
    >>> calib, ev = (random_npz(tmp / f"{n}.npz", (1, 1, 8, 8), n=16, seed=s) for n, s in (("c", 1), ("e", 2)))
    >>> res = optimize(tiny_conv_onnx(tmp / "m.onnx"), target="cortex-m7", calib=calib, eval=ev,
    ...                constraints={"max_drop": 1.0}, search={"trials": 2}, out=tmp / "o")
    >>> res.selected is not None, (tmp / "o" / "report.json").is_file(), (tmp / "o" / "c" / "model.h").is_file()
    (True, True, True)
    """
    from edgekiln.search.optimize import optimize as run_search

    rec = make_recipe(model, recipe=recipe, target=target, calib=calib, eval=eval, metric=metric,
                      input_shapes=input_shapes, constraints=constraints, search=search)
    return run_search(rec, out, resume=resume, quiet=quiet, on_trial=on_trial)


def make_recipe(model: PathLike | None = None, *, recipe: PathLike | Mapping[str, Any] | Recipe | None = None,
                target: str | None = None, calib: PathLike | None = None, eval: PathLike | None = None,
                metric: str | None = None, input_shapes: Sequence[str] | None = None,
                constraints: Mapping[str, Any] | None = None, search: Mapping[str, Any] | None = None) -> Recipe:
    """The :class:`~edgekiln.search.recipe.Recipe` ``optimize`` runs: ``recipe`` (a YAML file, its dict
    or a Recipe) with the given arguments overriding its fields: ``constraints`` (``max_drop``,
    ``max_latency_ms``, ``max_ram_bytes``, ``max_flash_bytes``), ``search`` (``trials``,
    ``timeout_s``, ``seed``, ``workers``, ``executor``, ``ray_address``), ``input_shapes`` as the
    CLI's ``--input-shape`` strings (``"1,3,32,32"``, ``"aux=1,4"``).

    >>> rec = make_recipe("m.onnx", target="cortex-m7", constraints={"max_drop": 0.01}, search={"trials": 4})
    >>> rec.target, rec.constraints.max_drop, rec.search.trials
    ('cortex-m7', 0.01, 4)
    """
    from edgekiln.search.recipe import Recipe, load_recipe

    if isinstance(recipe, Recipe):
        base = recipe.to_dict()
    else:
        base = dict(recipe) if isinstance(recipe, Mapping) else load_recipe(recipe).to_dict() if recipe else {}
    if model is None and not base.get("model"):
        raise EdgekilnError("give a MODEL or --recipe")
    given = {"model": _str(model), "calib": _str(calib), "eval": _str(eval), "metric": metric, "target": target,
             "input_shape": tuple(input_shapes) if input_shapes else None}
    fields = {**base, **{k: v for k, v in given.items() if v is not None}}
    fields["constraints"] = {**(base.get("constraints") or {}), **(constraints or {})}
    fields["search"] = {**(base.get("search") or {}), **(search or {})}
    return Recipe.from_dict(fields)


def learn(target: PathLike, data: PathLike | tuple[Any, Any], *, out: PathLike | None = None, learn: Any = None,
          gate: Any = None, new_classes: Sequence[int] = (), replay_bytes: int | None = None) -> dict[str, Any]:
    """Train the head of a bundle's model on new device samples in numpy, no torch (``edgekiln learn``).

    ``target`` is a bundle folder (adapted into ``out``) or an agent state folder (adapted in place
    through its A/B slots); ``data`` an ``.npz`` with ``x`` and ``y`` or an ``(x, y)`` pair; ``learn``
    a :class:`~edgekiln.runtime.learner.LearnConfig`, ``gate`` a
    :class:`~edgekiln.runtime.learner.GateConfig` (defaults when None). Returns the outcome:
    ``accepted``, ``status`` (``adapted``/``rejected``), ``id``, ``reasons``, ``metrics``, ``adaptation``.

    >>> learn("no-such-folder", ("x", "y"))
    Traceback (most recent call last):
    ...
    edgekiln.errors.EdgekilnError: no-such-folder: neither a bundle folder (manifest.json) nor an agent state folder (state.json, slots/)
    """
    from edgekiln.fleet.adapt import learn_target, load_samples
    from edgekiln.runtime.learner import GateConfig, LearnConfig

    x, y = load_samples(data) if isinstance(data, str | Path) else data
    return learn_target(target, x, y, out=out, learn=learn or LearnConfig(), gate=gate or GateConfig(),
                        new_classes=new_classes, replay_bytes=replay_bytes)


def _str(path: PathLike | None) -> str | None:
    return None if path is None else str(path)
