"""One trial of the search: run a pipeline, then measure the result against the target.

:func:`run_trial` takes and returns plain dicts so it can run in another process or on a Ray
worker; it is deterministic for a given payload (seeded passes, fixed data).
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekiln.errors import BudgetNotMet, EdgekilnError
from edgekiln.models.run_folder import precision_of


@dataclass
class Candidate:
    """A measured model: what the report, the Pareto front and the selection work with."""

    number: int
    label: str
    steps: list[dict[str, Any]]
    artifact: str | None = None
    kind: str | None = None
    metric: float | None = None
    metric_runtime: str | None = None   # the runtime ``metric`` was measured on (the one deployed to)
    drop: float | None = None
    model_bytes: int | None = None
    peak_ram_bytes: int | None = None
    flash_bytes: int | None = None
    macs: int | None = None
    latency_ms_host: float | None = None
    latency_ms_host_p90: float | None = None
    latency_ms_target_est: float | None = None
    energy_mj_target_est: float | None = None
    feasible: bool = False
    violations: list[str] = field(default_factory=list)
    state: str = "complete"   # complete | pruned (hopeless, not fully measured) | failed
    error: str | None = None
    seconds: float = 0.0
    cached: bool = False
    runtimes: list[dict[str, Any]] = field(default_factory=list)  # host/Linux targets: every runtime, fastest first
    final_round: bool = False  # timed again side by side with the other finalists (search/final_round.py)
    budget_round: bool = False  # a trial's pipeline run again with the accuracy budget (search/budget_round.py)
    # microcontroller targets: its C library on the emulated CPU (search/mcu.py measure_candidate), or why not
    mcu: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Candidate:
        return Candidate(**{k: v for k, v in data.items() if k in Candidate.__dataclass_fields__})


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """Run the pipeline in ``payload`` and measure it; never raises for a failing pipeline.

    payload keys: ``number``, ``label``, ``steps`` (list of Step dicts), ``artifact`` (ModelArtifact
    dict), ``work_dir``, ``calib``, ``eval``, ``metric``, ``seed``, ``target``, ``constraints``,
    ``baseline_metric``, ``bench_runs``.
    """
    from edgekiln.pipeline import Step, run_pipeline

    start = time.perf_counter()
    cand = Candidate(number=payload["number"], label=payload["label"], steps=payload["steps"])
    clock = TrialClock(payload.get("time_limit_s"))
    try:
        artifact = artifact_from_dict(payload["artifact"])
        ctx = _context(payload, clock.progress)
        steps = [Step.from_dict(s) for s in payload["steps"]]
        result = run_pipeline(artifact, steps, ctx) if steps else artifact
        clock.check("after its passes, before measuring")
        measure(cand, result.path, result.kind, payload)
    except (TrialTimeout, BudgetNotMet) as exc:
        why = f"timeout: {exc}" if isinstance(exc, TrialTimeout) else f"budget: {exc}"
        cand = _every_layer_quantized(payload, why) or cand
        if cand.metric is None:
            cand.state, cand.error = "failed", why
    except EdgekilnError as exc:
        cand.state, cand.error = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug in one trial must not end the search
        cand.state = "failed"
        cand.error = f"{type(exc).__name__}: {exc} | " + traceback.format_exc(limit=3).replace("\n", " ")[-400:]
    cand.seconds = round(time.perf_counter() - start, 3)
    return cand.to_dict()


def _every_layer_quantized(payload: dict[str, Any], why: str) -> Candidate | None:
    """The trial's pipeline with its quantize step's accuracy-budget search off, measured: when
    that search gave up (``why``: its time limit, or the budget cannot be met), what quantizing
    every layer costs and gains is the evidence the report needs (on a random-weight MobileNetV3
    the search ran out of time 35 layers into 54 and the trial had shown nothing). None when the
    pipeline has no such step or fails again."""
    from edgekiln.pipeline import Step, run_pipeline

    steps = payload["steps"]
    budgeted = [s for s in steps if s.get("pass") == "quantize" and (s.get("config") or {}).get("max_drop") is not None]
    if not budgeted:
        return None
    plain = [{**s, "config": {**s["config"], "max_drop": None}} if s in budgeted else s for s in steps]
    cand = Candidate(number=payload["number"], label=payload["label"], steps=plain)
    # NOTE: the pass quantized every layer first and keeps that model as its output file until the
    # search succeeds (passes/quantize.py quantize_model): when quantize is the last step, that file
    # is the pipeline's every-layer output, and re-running it (a minute on MobileNetV3) is not needed.
    last = Path(payload["work_dir"]) / f"{len(steps):02d}-quantize" / "model.onnx"
    try:
        if steps[-1] in budgeted and last.is_file():
            from edgekiln.passes.quantize import SCHEMES

            measure(cand, last, SCHEMES[str(steps[-1]["config"].get("scheme", "int8"))], payload)
        else:
            ctx = _context({**payload, "work_dir": payload["work_dir"] + "-every-layer"})
            result = run_pipeline(artifact_from_dict(payload["artifact"]), [Step.from_dict(s) for s in plain], ctx)
            measure(cand, result.path, result.kind, payload)
    except Exception:  # noqa: BLE001 - the evidence is best effort; the trial keeps its first error
        return None
    if not cand.feasible:
        cand.violations.append(f"every layer int8 (keeping layers float gave up: {why[:200]})")
    return cand


class TrialTimeout(Exception):
    """A trial ran past its time limit (raised inside it by :class:`TrialClock`)."""


@dataclass
class TrialClock:
    """The time one trial may take, checked where the trial can stop cleanly: in a pass's long
    inner loop (``PassContext.progress``: the quantize pass's per-layer accuracy-budget search,
    minutes on MobileNetV3) and before measuring.

    NOTE: cooperative, not a SIGALRM timer: OpenVINO leaves the main thread's alternate signal
    stack pointing at memory it frees with a compiled model, and a signal delivered after that
    crashed the process (SIGSEGV in the sleeping main thread).

    >>> clock = TrialClock(limit_s=0.0001)
    >>> time.sleep(0.001)
    >>> try:
    ...     clock.progress(3, 50)
    ... except TrialTimeout as exc:
    ...     print(exc)
    stopped at the trial's time limit (0.0001 s) in a pass's inner loop (3 of 50 done)
    """

    limit_s: float | None
    start: float = field(default_factory=time.monotonic)

    def check(self, where: str) -> None:
        if self.limit_s and time.monotonic() - self.start > self.limit_s:
            raise TrialTimeout(f"stopped at the trial's time limit ({self.limit_s:.3g} s) {where}")

    def progress(self, done: int, total: int) -> None:
        self.check(f"in a pass's inner loop ({done} of {total} done)")


def measure(cand: Candidate, model_path: Path, kind: str, payload: dict[str, Any]) -> None:
    """Fill ``cand`` with size, RAM, target estimates, host latency and the metric.

    Cheap checks first: a model that cannot fit the flash/RAM budget is marked ``pruned`` without
    spending time on evaluation and benchmarking (early pruning of hopeless trials). On a
    microcontroller target the fit is the C library's: measured on the emulated CPU where the
    tools are installed (:func:`_measured_on_mcu`), and a model the C backend cannot compile is
    not deployable (a violation). The metric is
    measured on the runtime the latency is reported for (:func:`deployed_runtime`), so accuracy
    and speed describe the same deployment.
    """
    from edgekiln.execution.timing import benchmark
    from edgekiln.models.analysis import analyze
    from edgekiln.models.artifact_check import check_model_file
    from edgekiln.targets.profiles import load_profile

    model_path = Path(model_path)
    cand.artifact, cand.kind = str(model_path), kind
    cand.model_bytes = model_path.stat().st_size
    # NOTE: the input shapes the intake resolved (dynamic H/W, several inputs) for every measure.
    shapes = {i["name"]: tuple(i["shape"]) for i in payload["artifact"]["inputs"]}
    # NOTE: the full check first: a model onnx.checker refuses is a failed trial, never a selection
    # the run folder then refuses to write (the runtimes it is timed on run it below).
    check_model_file(model_path, runtimes=(), label="the pipeline's output")
    info = analyze(model_path, shapes)
    cand.macs = int(info.macs)
    profile = load_profile(payload["target"])
    precision = precision_of(kind)
    limits = payload["constraints"]
    # NOTE: on a microcontroller the deployed model is edgekiln's C library: one the C backend cannot
    # compile (a float model) is measured for the report but never selected.
    c_fp, not_c, by_kind = None, None, None
    if profile.kind == "mcu":
        from edgekiln.search.mcu import c_backend_check
        from edgekiln.targets.kernel_kinds import macs_by_kernel_kind

        c_fp, not_c = c_backend_check(model_path, kind, input_shapes=shapes)
        # the profile's measured instructions per MAC of each kernel kind (the estimate before, or without, QEMU)
        by_kind = macs_by_kernel_kind(model_path, info.layers)
    fit_kwargs = dict(weight_bytes=c_fp.flash["weights"] + c_fp.flash["params"] if c_fp else info.weight_bytes,
                      code_bytes=c_fp.flash["code_estimate"] if c_fp else 0,
                      peak_activation_bytes=c_fp.ram_bytes if c_fp else info.peak_activation_bytes,
                      io_bytes=0 if c_fp else info.io_bytes, macs=info.macs, precision=precision,
                      macs_by_kind=by_kind)
    fit = _fit(cand, profile, fit_kwargs, limits, placed=(model_path, shapes))
    memory_violations = [v for v in fit.exceeded if v.lower().startswith(("ram", "flash"))]
    if memory_violations and not payload.get("measure_all"):
        cand.state, cand.violations, cand.feasible = "pruned", memory_violations, False
        return
    if c_fp is not None and not memory_violations and payload.get("mcu_library", True):
        fit = _measured_on_mcu(cand, model_path, profile, payload, shapes, fit_kwargs, limits) or fit
    runs, warmup = payload["bench_runs"], min(50, payload["bench_runs"])
    if profile.kind in ("host", "linux"):
        # NOTE: such targets deploy to the fastest installed runtime, so a candidate is timed on
        # each: MiniLM's static int8 runs 2.7x slower on onnxruntime than on OpenVINO, and
        # onnxruntime's time alone would have ruled out the fastest deployable model.
        cand.runtimes = runtime_latencies(model_path, runs=runs, warmup=warmup, input_shapes=shapes)
        from edgekiln.execution.specs import TensorSpec
        from edgekiln.search.litert_form import tflite_form, timed_row, with_litert

        # NOTE: an int8 model also competes as edgekiln's own .tflite on LiteRT, as in `edgekiln quantize`
        inputs = [TensorSpec.from_dict(i) for i in payload["artifact"]["inputs"]]
        form = tflite_form(model_path, kind, Path(payload["work_dir"]), inputs)
        if form is not None:
            cand.runtimes = with_litert(cand.runtimes, timed_row(form, inputs, runs=runs, warmup=warmup))
        timed = [r for r in cand.runtimes if "p50_ms" in r]
        if not timed:
            raise EdgekilnError("no installed runtime runs this model: " + "; ".join(
                f"{r['runtime']}: {r.get('skipped')}" for r in cand.runtimes))
        cand.latency_ms_host, cand.latency_ms_host_p90 = timed[0]["p50_ms"], timed[0]["p90_ms"]
    else:
        bench = benchmark(model_path, runtime="onnxruntime", threads=1, batch=1, warmup=warmup, runs=runs,
                          input_shapes=shapes)
        cand.latency_ms_host = float(bench.latency_ms["p50"])
        cand.latency_ms_host_p90 = float(bench.latency_ms["p90"])
    score_on_fastest(cand, payload)
    if profile.kind == "host":
        cand.latency_ms_target_est = cand.latency_ms_host
    cand.violations = violations(cand, limits, fit.exceeded) + [v for v in (not_c, _mcu_violation(cand)) if v]
    cand.feasible = not cand.violations


def _fit(cand: Candidate, profile: Any, fit_kwargs: dict[str, Any], limits: dict[str, Any],
         placed: tuple[Path, dict[str, tuple[int, ...]]] | None = None) -> Any:
    """:func:`estimate_fit` with ``fit_kwargs``; its RAM, flash, latency and energy copied to ``cand``.
    With ``placed`` (model path, input shapes) on a profile of several compute units, latency and
    energy are the placement's (:func:`~edgekiln.targets.place_io.fit_with_placement`)."""
    from edgekiln.targets.fit import estimate_fit
    from edgekiln.targets.place_io import fit_with_placement

    fit = estimate_fit(profile, **fit_kwargs, max_ram_bytes=limits.get("max_ram_bytes"),
                       max_flash_bytes=limits.get("max_flash_bytes"))
    if placed is not None:
        fit = fit_with_placement(fit, profile, placed[0], placed[1], fit_kwargs["precision"])
    fd = fit.to_dict()
    cand.peak_ram_bytes = int(_value(fd, "ram"))
    cand.flash_bytes = int(_value(fd, "flash"))
    cand.latency_ms_target_est = _value(fd, "latency_ms")
    cand.energy_mj_target_est = _value(fd, "energy_mj")
    return fit


def _measured_on_mcu(cand: Candidate, model_path: Path, profile: Any, payload: dict[str, Any],
                     shapes: dict[str, tuple[int, ...]], estimated: dict[str, Any], limits: dict[str, Any]) -> Any:
    """Run ``cand``'s C library on the target's emulated CPU (search/mcu.py) and fit it again with
    what was measured: flash = the linked library (code + constants + data), RAM = its static data
    (the arena) + the stack one inference used + the I/O buffers, latency = instructions at the
    profile's clock and CPI. None (the estimates from ``estimated``, the fit's arguments, stand)
    when it was not measured."""
    from edgekiln.search.mcu import measure_candidate

    cand.mcu = measure_candidate(model_path, profile, Path(payload["work_dir"]), eval_path=payload.get("eval"),
                                 input_shapes=shapes)
    if "instructions" not in cand.mcu:
        return None
    m = cand.mcu
    measured = dict(estimated, weight_bytes=m["const_bytes"], code_bytes=m["code_bytes"],
                    peak_activation_bytes=m["bss"] + m["stack_bytes"], io_bytes=m["io_bytes"])
    fit = _fit(cand, profile, measured, limits)
    cand.latency_ms_target_est = m["latency_ms"]
    return fit


def _mcu_violation(cand: Candidate) -> str | None:
    if cand.mcu is None:
        return None
    from edgekiln.search.mcu import measured_violation

    return measured_violation(cand.mcu)


def score_on_fastest(cand: Candidate, payload: dict[str, Any]) -> None:
    """:func:`score` on the fastest timed runtime that can evaluate the model; a runtime that
    times it but fails on the evaluation data loses its place (its row says why) and the next
    one is tried. NOTE: OpenVINO once renamed an fp16 model's input after its Cast, which
    failed the whole trial though onnxruntime ran the model."""
    while True:
        runtime = deployed_runtime(cand)
        try:
            score(cand, runtime, payload)
            return
        except EdgekilnError as exc:
            timed = [r for r in cand.runtimes if "p50_ms" in r]
            if len(timed) < 2:
                raise
            cand.runtimes = [r for r in cand.runtimes if r is not timed[0]] + [
                {"runtime": runtime, "skipped": f"timed, but its evaluation failed: {str(exc)[:160]}"}]
            cand.latency_ms_host, cand.latency_ms_host_p90 = timed[1]["p50_ms"], timed[1]["p90_ms"]


def deployed_runtime(cand: Candidate) -> str:
    """The runtime ``cand`` is deployed to: the fastest timed one (host and Linux targets), else
    onnxruntime (the host stand-in for a microcontroller target)."""
    return next((r["runtime"] for r in cand.runtimes if "p50_ms" in r), "onnxruntime")


def score(cand: Candidate, runtime: str, payload: dict[str, Any]) -> None:
    """Measure ``cand``'s metric on ``runtime`` (the one its latency is reported for) and its drop
    against ``payload["baseline_metric"]``."""
    from edgekiln.models.metrics import evaluate
    from edgekiln.search.litert_form import evaluation_file

    model = evaluation_file(cand.runtimes, runtime, cand.artifact or "")   # LiteRT: the .tflite it was timed as
    cand.metric = float(evaluate(model, payload["eval"], payload["metric"],
                                 reference_path=payload.get("reference"), runtime=runtime))
    cand.metric_runtime = runtime
    if payload.get("baseline_metric") is not None:
        cand.drop = float(payload["baseline_metric"]) - cand.metric


def runtime_latencies(model_path: Path, *, runs: int, warmup: int,
                      input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """``model_path`` timed on every installed runtime that reads it (1 thread, batch 1),
    fastest p50 first; a runtime that is missing or fails to load the model is listed with
    the reason under ``skipped``."""
    from edgekiln.execution.runtimes import REAL, available_runtimes, skip_reason
    from edgekiln.execution.timing import benchmark

    unavailable = available_runtimes()
    rows: list[dict[str, Any]] = []
    for name in REAL:
        reason = skip_reason(name, model_path, unavailable)
        if reason is None:
            try:
                r = benchmark(model_path, runtime=name, threads=1, batch=1, warmup=warmup, runs=runs,
                              input_shapes=input_shapes)
            except Exception as exc:  # noqa: BLE001 - one runtime refusing a model must not fail the trial
                reason = f"{type(exc).__name__}: {exc}"[:200]
            else:
                rows.append({"runtime": name, "p50_ms": float(r.latency_ms["p50"]),
                             "p90_ms": float(r.latency_ms["p90"])})
                continue
        rows.append({"runtime": name, "skipped": reason})
    return sorted(rows, key=lambda r: r.get("p50_ms", float("inf")))


def violations(cand: Candidate, limits: dict[str, Any], exceeded: list[str]) -> list[str]:
    """Every constraint the candidate breaks, each saying by how much."""
    out = [v for v in exceeded if not v.lower().startswith("latency")]
    if limits.get("max_drop") is not None and cand.drop is not None and cand.drop > limits["max_drop"] + 1e-12:
        out.append(f"accuracy drop: {cand.drop:.4f}, budget {limits['max_drop']:.4f}, "
                   f"over by {cand.drop - limits['max_drop']:.4f}")
    lat = limits.get("max_latency_ms")
    if lat is not None and cand.latency_ms_target_est is not None and cand.latency_ms_target_est > lat:
        out.append(f"latency: {cand.latency_ms_target_est:.3f} ms, budget {lat:.3f} ms, "
                   f"over by {cand.latency_ms_target_est - lat:.3f} ms")
    return out


def c_backend_footprint(model_path: Path, kind: str, profile: Any,
                        input_shapes: dict[str, tuple[int, ...]] | None = None) -> Any:
    """For microcontroller targets and int8 models: the C backend's real numbers
    (:class:`edgekiln.codegen.export.McuFootprint`: static arena + int8 I/O buffers, flash =
    constant arrays + parameter structs + code estimate). None when the model cannot be compiled
    to C (:func:`edgekiln.search.mcu.c_backend_check` says why); the analysis estimate is used then."""
    if getattr(profile, "kind", None) != "mcu":
        return None
    from edgekiln.search.mcu import c_backend_check

    return c_backend_check(Path(model_path), kind, input_shapes=input_shapes)[0]


def memory_plan_bytes(model_path: Path, kind: str, profile: Any,
                      input_shapes: dict[str, tuple[int, ...]] | None = None) -> int | None:
    """RAM (arena + I/O) of :func:`c_backend_footprint`, or None."""
    c_fp = c_backend_footprint(model_path, kind, profile, input_shapes)
    return c_fp.ram_bytes if c_fp is not None else None


def artifact_from_dict(data: dict[str, Any]) -> Any:
    from edgekiln.models.artifact import ModelArtifact

    return ModelArtifact.from_dict(data)


def keep_artifact(cand: Candidate, dest_dir: Path) -> Candidate:
    """Copy the candidate's model into ``dest_dir`` (atomically) and point the candidate at it."""
    from edgekiln.fileio import atomic_write_bytes

    if not cand.artifact:
        return cand
    src = Path(cand.artifact)
    dest = dest_dir / "model.onnx"
    if src.resolve() != dest.resolve():
        atomic_write_bytes(dest, src.read_bytes())
    kept = Candidate.from_dict(cand.to_dict())
    kept.artifact = str(dest)
    for row in kept.runtimes:   # the .tflite a LiteRT row timed (search/litert_form.py) travels with the model
        if row.get("file") and Path(row["file"]).is_file():
            other = dest_dir / f"model{Path(row['file']).suffix}"
            if Path(row["file"]).resolve() != other.resolve():
                atomic_write_bytes(other, Path(row["file"]).read_bytes())
            row["file"] = str(other)
    return kept


def _context(payload: dict[str, Any], progress: Any = None) -> Any:
    from edgekiln.passes.base import PassContext

    work = Path(payload["work_dir"])
    if work.exists():  # a retried trial starts clean
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return PassContext(work_dir=work, calib_path=Path(payload["calib"]) if payload.get("calib") else None,
                       eval_path=Path(payload["eval"]) if payload.get("eval") else None,
                       train_path=Path(payload["train"]) if payload.get("train") else None,
                       metric=payload["metric"], seed=int(payload["seed"]), strict=True, quiet=True,
                       progress=progress)


def _value(fit_dict: dict[str, Any], key: str) -> Any:
    entry = fit_dict.get(key)
    if isinstance(entry, dict):
        return entry.get("value")
    return entry


def payload_key(payload: dict[str, Any], input_sha: str) -> str:
    """Content hash of what determines a trial's result (the cache key)."""
    from edgekiln.fileio import sha256_bytes

    keyed = {k: payload.get(k) for k in ("steps", "metric", "seed", "target", "constraints", "bench_runs", "calib", "eval",
                                         "train")}
    keyed["input"] = input_sha
    if payload.get("mcu_library") is False:   # NOTE: only then, so caches written before the option still apply
        keyed["mcu_library"] = False
    return sha256_bytes(json.dumps(keyed, sort_keys=True, default=str).encode())[:24]
