"""`edgekiln optimize`: search pipelines of passes for the best model that fits the target.

The loop asks Optuna for a fixed-size batch of trials, runs them (serially, in local worker
processes or on Ray), tells Optuna the results and, after every batch, saves the best feasible
model so far into the output folder (anytime: Ctrl-C or a time budget leaves a usable result).
Batches have a fixed size whatever the number of workers, so a seeded search proposes the same
trials serially and in parallel. Results are cached by content hash; the Optuna study lives in
SQLite in the output folder, so ``--resume`` continues where an interrupted search stopped.
On a microcontroller target (search/mcu.py) the candidates are the C library's (int8 only, measured
on the emulated CPU where QEMU is installed) and the run folder also gets the selected model's
library (``c/``), its ``verify-c`` result and its ``measure-mcu`` report.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekiln.errors import BudgetNotMet, EdgekilnError
from edgekiln.fileio import atomic_write_json, sha256_file
from edgekiln.models.artifact import ModelArtifact
from edgekiln.pipeline import Step
from edgekiln.search.final_round import final_selection
from edgekiln.search.recipe import Recipe
from edgekiln.search.selection import HOST_LATENCY_NOISE, beats_fp32, pareto_front, select_best
from edgekiln.search.space import pipeline_key
from edgekiln.search.trial import Candidate, keep_artifact, payload_key

MIN_SHARES, MAX_SHARES = 3, 6   # one trial may take 1/3 .. 1/6 of --timeout (1/6 from 6 trials on)
WRAP_UP_SHARE = 10   # the last 1/WRAP_UP_SHARE of --timeout is kept for a stopped trial's wrap-up and the final round
DISTINCT_DRAWS = 64  # draws per trial before a repeat is accepted (only in spaces too large to list)
HARD_GRACE_S = 10.0  # at least this long past its own limit before a trial's worker is stopped (measuring
#                     after the last clock check takes seconds)
BATCH = 4            # trials asked per round; fixed so parallel and serial runs see the same proposals
STUDY_NAME = "edgekiln-optimize"


@dataclass
class OptimizeResult:
    selected: Candidate | None
    baseline: Candidate
    candidates: list[Candidate]
    pareto: list[Candidate]
    out_dir: Path
    interrupted: bool = False
    exhausted: bool = False      # the space held fewer distinct pipelines than the trial budget
    stop: str | None = None      # why the search stopped before its trial budget (timeout, Ctrl-C)


def optimize(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, quiet: bool = False,
             on_trial: Callable[[Candidate], None] | None = None) -> OptimizeResult:
    """Run the search described by ``recipe`` and write the run folder ``out_dir``.

    Raises :class:`BudgetNotMet` (exit 3) when no candidate meets every constraint, naming the
    binding constraint and the closest candidate; the report is written before that.
    """
    import optuna

    from edgekiln.models.intake import load_model, parse_shapes, run_folder_data
    from edgekiln.search.report import write_optimize_report
    from edgekiln.search.space import default_space, describe, enumerate_points
    from edgekiln.targets.profiles import load_profile

    started = time.monotonic()
    deadline = started + recipe.search.timeout_s if recipe.search.timeout_s else None   # 0: no limit
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "study.db"
    if db.exists() and not resume:
        raise EdgekilnError(f"{out}: holds a previous search; pass --resume to continue it or choose another --out")
    profile = load_profile(recipe.target)
    data = run_folder_data(recipe.model)
    calib = recipe.calib or (str(data["calib"]) if "calib" in data else None)
    evals = recipe.eval or (str(data["eval"]) if "eval" in data else None)
    if not evals:
        raise EdgekilnError("optimize needs evaluation data: pass --eval EVAL.npz (or a run folder holding eval.npz)")
    for label, path in (("--calib", calib), ("--eval", evals)):
        if path and not Path(path).is_file():
            raise EdgekilnError(f"{path}: {label} file not found")
    recipe = dataclasses.replace(recipe, metric=chosen_metric(recipe)[0])
    if recipe.metric == "sqnr" and recipe.constraints.max_drop is not None:
        # NOTE: the input model's SQNR against itself is unbounded (~240 dB as computed), so every
        # candidate's "drop" would be ~200 dB and the budget meaningless.
        raise EdgekilnError("--metric sqnr cannot take --max-drop (the input model's SQNR against itself is "
                            "unbounded); use --metric cosine, or accuracy with labels 'y' in --eval")
    artifact = load_model(recipe.model, input_shapes=parse_shapes(recipe.input_shape),
                          data={"calib": calib, "eval": evals}, work_dir=out / "work" / "input")
    input_sha = sha256_file(artifact.path)
    run_data = {k: Path(v) for k, v in (("calib", calib), ("eval", evals), ("train", data.get("train"))) if v}
    atomic_write_json(out / "recipe.json", recipe.to_dict())

    spaces = recipe.passes or default_space(artifact, recipe, unit_precisions(profile), target_kind=profile.kind)
    base_payload = {
        "artifact": artifact.to_dict(), "calib": calib, "eval": evals, "metric": recipe.metric,
        "train": str(data["train"]) if "train" in data else None,
        "seed": recipe.search.seed, "target": recipe.target, "constraints": recipe.constraints.to_dict(),
        "bench_runs": recipe.search.bench_runs, "reference": str(artifact.path),
        "mcu_library": recipe.search.mcu_library,
    }
    baseline = _cached_run(out, {**base_payload, "number": -1, "label": "baseline", "steps": [], "measure_all": True,
                                 "work_dir": str(out / "work" / "baseline"), "baseline_metric": None}, input_sha)
    if baseline.metric is None:
        hint = ("; without labels, --metric cosine (or sqnr) compares each candidate with the input model's outputs"
                if "needs labels" in str(baseline.error) else "")
        raise EdgekilnError(f"the input model could not be evaluated: {baseline.error or baseline.violations}{hint}")
    base_payload["baseline_metric"] = baseline.metric
    baseline.drop = 0.0

    sampler = _sampler(recipe)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{db}", sampler=sampler,
                                directions=["maximize", "minimize", "minimize"], load_if_exists=True)
    _close_stale_trials(study)
    candidates = [Candidate.from_dict(t.user_attrs["candidate"]) for t in study.trials
                  if "candidate" in t.user_attrs]
    linux_class = profile.kind in ("host", "linux")
    tolerance = HOST_LATENCY_NOISE if linux_class else 0.0
    # NOTE: where FP32 itself deploys (host, Linux boards), it competes: a quantized model is only
    # selected when it is faster than FP32 (beyond the timing noise) within the budgets.
    # A recipe whose passes are all required (`optional: false`) asks for those passes: FP32 does not compete.
    required = bool(recipe.passes) and not any(p.optional for p in recipe.passes)
    fp32_competes = linux_class and "fp32" in profile.precisions and recipe.prefer == "latency" and not required
    rivals = [baseline] if fp32_competes else []

    def selectable(cands: list[Candidate]) -> list[Candidate]:
        """Where FP32 competes, the candidates measured faster than it (the final round re-checks)."""
        return [c for c in cands if beats_fp32(c, baseline, tolerance)] + rivals if fp32_competes else cands

    seen = {pipeline_key([Step.from_dict(s) for s in c.steps]) for c in candidates}
    points = enumerate_points(spaces)
    interrupted = exhausted = False
    stop: str | None = None
    best: Candidate | None = select_best(selectable(candidates), recipe.prefer, tolerance)
    serial = recipe.search.executor == "local" and recipe.search.workers <= 1
    try:
        while len(candidates) < recipe.search.trials:
            if _past(deadline, _wrap_up(recipe)):
                stop = _timeout_reason(recipe, candidates)
                break
            n = min(BATCH, recipe.search.trials - len(candidates))
            asked, payloads = {}, []
            for _ in range(n):
                drawn = _ask_distinct(study, spaces, points, seen, recipe.search.seed)
                if drawn is None:
                    exhausted = True
                    break
                t, steps = drawn
                asked[t.number] = t
                payloads.append({**base_payload, "number": t.number, "label": describe(steps, spaces),
                                 "steps": [s.to_dict() for s in steps],
                                 "work_dir": str(out / "work" / f"trial-{t.number:04d}")})
            if not asked:
                break
            # NOTE: serial trials run (and are reported, and the best saved) one at a time: a batch
            # of four MobileNetV3 trials once ran 30 minutes without a line of output.
            for group in ([[p] for p in payloads] if serial else [payloads]):
                if _past(deadline, _wrap_up(recipe)):
                    stop = _timeout_reason(recipe, candidates)
                    break
                for p in group:
                    p["time_limit_s"] = _trial_limit(recipe, deadline)
                    # NOTE: the worker is stopped half-way into the wrap-up time if the trial is still in a
                    # step that never looks at its clock (executors.py); the rest is the final round's.
                    p["hard_limit_s"] = p["time_limit_s"] + max(_wrap_up(recipe) / 2, HARD_GRACE_S) \
                        if p["time_limit_s"] else None
                for cand in _execute(out, group, input_sha, recipe):
                    t = asked.pop(cand.number)
                    t.set_user_attr("candidate", cand.to_dict())
                    _tell(study, t, cand)
                    candidates.append(cand)
                    if on_trial:
                        on_trial(cand)
                new_best = select_best(selectable(candidates), recipe.prefer, tolerance)
                if new_best is not None and (best is None or new_best.number != best.number):
                    best = new_best
                    _save_best(out, best, artifact)
                write_optimize_report(out, recipe, profile, baseline, candidates, best,
                                      model=_selected_artifact(artifact, best, out, run_data), partial=True)
            _close_unrun(study, asked.values())
            if stop:
                break
    except KeyboardInterrupt:
        interrupted = True
    notes: list[str] = []
    if not interrupted and fp32_competes and not recipe.passes:
        interrupted = _budget_round(out, recipe, deadline, candidates, baseline, base_payload, input_sha, tolerance,
                                    len(study.trials), notes, on_trial)
    if interrupted:
        stop = "interrupted (Ctrl-C)"
    best = select_best(selectable(candidates), recipe.prefer, tolerance)
    if best is not None and linux_class and not interrupted:
        best = final_selection(candidates, best, prefer=recipe.prefer, tolerance=tolerance,
                               runs=recipe.search.bench_runs, host_is_target=profile.kind == "host",
                               payload=base_payload, baseline=baseline, fp32_competes=fp32_competes)
    if best is not None:
        best = _save_best(out, best, artifact)
    selected = _selected_artifact(artifact, best, out, run_data)
    deployment = None
    if profile.kind == "mcu" and selected is not None and not interrupted and recipe.search.mcu_library:
        from edgekiln.search.mcu import deploy_c_library

        deployment = deploy_c_library(out, selected, profile, evals)
    front = pareto_front([c for c in candidates if c.metric is not None] + [baseline])
    write_optimize_report(out, recipe, profile, baseline, candidates, best, model=selected, partial=interrupted,
                          exhausted=exhausted, stop=stop, notes=notes, deployment=deployment)
    result = OptimizeResult(best, baseline, candidates, front, out, interrupted, exhausted, stop)
    if best is None and not interrupted:
        raise BudgetNotMet(_no_fit_message(candidates, baseline))
    return result


def _budget_round(out: Path, recipe: Recipe, deadline: float | None, candidates: list[Candidate], baseline: Candidate,
                  base_payload: dict[str, Any], input_sha: str, tolerance: float, number: int, notes: list[str],
                  on_trial: Callable[[Candidate], None] | None) -> bool:
    """Run the budget round (search/budget_round.py) if it is due, appending its candidate or, in
    ``notes``, why it did not run; True when Ctrl-C stopped it."""
    from edgekiln.search.budget_round import budget_payload

    left = None if deadline is None else deadline - _wrap_up(recipe) - time.monotonic()
    payload, note = budget_payload(candidates, baseline, base_payload, max_drop=recipe.constraints.max_drop,
                                   tolerance=tolerance, seconds_left=left, number=number)
    notes += [note] if note else []
    if payload is None:
        return False
    payload["work_dir"] = str(out / "work" / f"trial-{number:04d}")
    limit = payload["time_limit_s"]
    payload["hard_limit_s"] = limit + max(_wrap_up(recipe) / 2, HARD_GRACE_S) if limit else None
    try:
        (cand,) = _execute(out, [payload], input_sha, recipe)
    except KeyboardInterrupt:
        return True
    cand.budget_round = True
    candidates.append(cand)
    if on_trial:
        on_trial(cand)
    return False


def chosen_metric(recipe: Recipe) -> tuple[str, str | None]:
    """The metric the search scores with and, when the recipe left it to ``auto``, one line saying
    which and why: accuracy when the evaluation data holds labels ``y``, else cosine against the
    input model's outputs (what ``--max-drop`` then bounds, and which output is compared).

    >>> chosen_metric(Recipe(model="m.onnx", metric="sqnr"))
    ('sqnr', None)
    """
    import numpy as np

    from edgekiln.models.intake import run_folder_data
    from edgekiln.search.recipe import AUTO_METRIC

    if recipe.metric != AUTO_METRIC:
        return recipe.metric, None
    evals = recipe.eval or (str(run_folder_data(recipe.model).get("eval") or "") or None)
    try:
        with np.load(evals or "", allow_pickle=False) as npz:
            labelled = "y" in npz.files
    except (OSError, ValueError):
        return "accuracy", None   # the missing or unreadable file is reported where it is read
    if labelled:
        return "accuracy", f"metric: accuracy against the labels 'y' in {Path(str(evals)).name}"
    budget = recipe.constraints.max_drop
    bound = f"; --max-drop {budget:g} keeps a mean cosine of at least {1 - budget:.4g}" if budget is not None else ""
    return "cosine", (f"metric: cosine (auto: {Path(str(evals)).name} holds no labels 'y'), the mean cosine "
                      f"similarity of {_compared_outputs(recipe.model)} with the input model's{bound}; "
                      "--metric names another")


def _compared_outputs(model: str) -> str:
    """Which outputs of ``model`` the metric compares (all, each sample scored by its worst: models/metrics.py)."""
    import onnx

    try:
        outputs = [o.name for o in onnx.load(model, load_external_data=False).graph.output]
    except Exception:  # noqa: BLE001 - a run folder or a PyTorch factory: not worth loading here
        return "the outputs (each sample scored by its worst output)"
    return "the output" if len(outputs) == 1 else f"each of the {len(outputs)} outputs (each sample scored by its worst)"


def _ask_distinct(study: Any, spaces: Any, points: list[dict[str, Any]] | None, seen: set[str],
                  seed: int) -> tuple[Any, list[Any]] | None:
    """Ask for a trial whose pipeline has not been tried yet (``None`` when the space is exhausted).

    ``points`` lists the whole space (``None`` when too large to list); pipelines are compared by
    their effective options (:func:`~edgekiln.search.space.pipeline_key`: fp16 is one pipeline
    whatever int8 calibration was drawn with it). A drawn duplicate is closed as failed
    (samplers ignore it, resume skips it) and the next trial is steered to an untried point,
    picked reproducibly from the seed: TPE's random start-up draws repeat often in small spaces,
    and re-running a pipeline spends a trial to learn nothing.
    """
    from optuna.trial import TrialState

    from edgekiln.search.space import pipeline_key, point_steps, sample_steps

    for attempt in range(DISTINCT_DRAWS):
        t = study.ask()
        steps = sample_steps(t, spaces)
        key = pipeline_key(steps)
        if key not in seen:
            seen.add(key)
            return t, steps
        if points is None and attempt == DISTINCT_DRAWS - 1:
            return t, steps               # a space too large to list kept repeating: run the repeat
        t.set_user_attr("duplicate", True)
        study.tell(t, state=TrialState.FAIL)
        if points is None:
            continue                      # too large to list: a fresh draw is likely distinct
        untried = [p for p in points if pipeline_key(point_steps(p, spaces)) not in seen]
        if not untried:
            return None
        study.enqueue_trial(untried[random.Random(f"{seed}-{len(seen)}").randrange(len(untried))])
    return None


def _past(deadline: float | None, wrap_up: float) -> bool:
    """Whether too little time is left to start a trial: less than twice the ``wrap_up`` time
    (a tenth of ``--timeout``) a stopped trial and the final round need."""
    return deadline is not None and time.monotonic() >= deadline - 2 * wrap_up


def _trial_limit(recipe: Recipe, deadline: float | None) -> float | None:
    """Seconds one trial may take: an even share of ``--timeout`` among the trials asked for, at
    most a third and at least a sixth, never into the wrap-up time before the deadline; None
    without a timeout. NOTE: so one slow pipeline (the quantize pass's per-layer accuracy-budget
    search on MobileNetV3: 54 one-layer quantizations, minutes) leaves time for the others; a
    trial stopped there still measures its every-layer int8 model (search/trial.py)."""
    if deadline is None or not recipe.search.timeout_s:
        return None
    shares = min(max(recipe.search.trials, MIN_SHARES), MAX_SHARES)
    left = deadline - _wrap_up(recipe) - time.monotonic()
    return max(1.0, min(recipe.search.timeout_s / shares, left))


def _wrap_up(recipe: Recipe) -> float:
    return (recipe.search.timeout_s or 0.0) / WRAP_UP_SHARE


def _timeout_reason(recipe: Recipe, candidates: list[Candidate]) -> str:
    return (f"timeout: --timeout {recipe.search.timeout_s:g} s reached after {len(candidates)} of "
            f"{recipe.search.trials} trials; the best model so far is selected")


def _close_unrun(study: Any, trials: Any) -> None:
    """Trials asked but not run (the deadline came first): closed as failed, so a resumed search
    draws them again."""
    from optuna.trial import TrialState

    for t in trials:
        t.set_user_attr("not_run", "timeout")
        study.tell(t, state=TrialState.FAIL)


def _execute(out: Path, payloads: list[dict[str, Any]], input_sha: str, recipe: Recipe) -> list[Candidate]:
    """Run a batch, reusing cached results; the executor decides where the rest run."""
    from edgekiln.search.executors import run_batch

    results = [_cache_get(out, p, input_sha) for p in payloads]   # batches hold distinct pipelines
    todo = [p for p, cached in zip(payloads, results, strict=True) if cached is None]
    fresh = iter(run_batch(todo, recipe.search) if todo else [])
    final: list[Candidate] = []
    for p, cached in zip(payloads, results, strict=True):
        if cached is None:
            cached = Candidate.from_dict(next(fresh))
            if not _not_for_cache(cached):   # a longer --timeout may finish it; a crash may not recur
                _cache_put(out, p, input_sha, cached)
        final.append(cached)
    return final


def _not_for_cache(cand: Candidate) -> bool:
    """A trial stopped by its time limit or ended by a crash of its process: a resumed search runs it again."""
    return (cand.error or "").startswith(("timeout:", "crashed:")) or \
        any("gave up: timeout:" in v for v in cand.violations)


def _cached_run(out: Path, payload: dict[str, Any], input_sha: str) -> Candidate:
    cached = _cache_get(out, payload, input_sha)
    if cached is not None:
        return cached
    from edgekiln.search.executors import run_isolated

    cand = Candidate.from_dict(run_isolated(payload))
    if not _not_for_cache(cand):
        _cache_put(out, payload, input_sha, cand)
    return cand


def _cache_get(out: Path, payload: dict[str, Any], input_sha: str) -> Candidate | None:
    entry = out / "cache" / payload_key(payload, input_sha) / "candidate.json"
    if not entry.is_file():
        return None
    cand = Candidate.from_dict(json.loads(entry.read_text()))
    if cand.artifact and not Path(cand.artifact).is_file():
        return None
    cand.number, cand.cached = payload["number"], True
    return cand


def _cache_put(out: Path, payload: dict[str, Any], input_sha: str, cand: Candidate) -> None:
    folder = out / "cache" / payload_key(payload, input_sha)
    stored = keep_artifact(cand, folder) if cand.artifact else cand
    atomic_write_json(folder / "candidate.json", stored.to_dict())
    cand.artifact = stored.artifact


def _selected_artifact(artifact: ModelArtifact, best: Candidate | None, out: Path,
                       data: dict[str, Path]) -> ModelArtifact | None:
    """The selected candidate as the run folder's model: ``out/model.onnx`` (written by
    :func:`_save_best`), the input model's inputs, its passes appended to the provenance."""
    if best is None or not (out / "model.onnx").is_file():
        return None
    return ModelArtifact(kind=best.kind or "onnx", path=out / "model.onnx", inputs=artifact.inputs,
                         provenance=(*artifact.provenance, *best.steps), data=data)


def _save_best(out: Path, best: Candidate, artifact: ModelArtifact | None = None) -> Candidate:
    """Copy ``best``'s model to ``out/model.onnx`` (after the check every written model passes:
    full ``onnx.checker``, one run in each runtime it was timed on) and write ``selected.json``."""
    from edgekiln.models.artifact_check import ALWAYS, check_model_file

    if best.artifact:
        timed = [r["runtime"] for r in best.runtimes if "p50_ms" in r and not r.get("file")]   # file: a .tflite
        check_model_file(best.artifact, runtimes=tuple(dict.fromkeys([*ALWAYS, *timed])),
                         inputs=artifact.inputs if artifact else (), label="optimize (selected model not written)")
    kept = keep_artifact(best, out)
    atomic_write_json(out / "selected.json", kept.to_dict())
    return kept


def _tell(study: Any, trial: Any, cand: Candidate) -> None:
    from optuna.trial import TrialState

    if cand.state == "failed" or cand.metric is None:
        study.tell(trial, state=TrialState.PRUNED if cand.state == "pruned" else TrialState.FAIL)
        return
    latency = cand.latency_ms_target_est if cand.latency_ms_target_est is not None else cand.latency_ms_host
    study.tell(trial, [cand.metric, float(cand.model_bytes or 0), float(latency or 0.0)])


def _close_stale_trials(study: Any) -> None:
    """Trials asked but never told (the search was interrupted mid-batch) are marked failed;
    their finished work is not lost: it is in the content-hash cache and is reused."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study.tell(t.number, state=TrialState.FAIL)


def _sampler(recipe: Recipe) -> Any:
    import optuna

    seed = recipe.search.seed
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if recipe.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=BATCH * 2)
    if recipe.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=BATCH * 2, multivariate=True,
                                      constant_liar=False)


def _no_fit_message(candidates: list[Candidate], baseline: Candidate) -> str:
    measured = [c for c in candidates if c.violations] or ([baseline] if baseline.violations else [])
    if not measured:
        failed = [c for c in candidates if c.error]
        why = failed[0].error if failed else "no trial completed"
        return f"no candidate meets the constraints ({why})"
    closest = min(measured, key=lambda c: (len(c.violations), c.number))
    counts: dict[str, int] = {}
    for c in measured:
        for v in c.violations:
            key = v.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
    binding = max(counts, key=lambda k: counts[k])
    return (f"no candidate meets every constraint; binding constraint: {binding} (violated by {counts[binding]} of "
            f"{len(measured)} measured candidates); closest: #{closest.number} {closest.label} — "
            + "; ".join(closest.violations))


def unit_precisions(profile: Any) -> tuple[str, ...]:
    """The precisions any compute unit of ``profile`` runs (its own list, then the units' extras):
    a model quantized for an NPU unit is worth searching even when the CPU runs fp32 only.

    >>> from edgekiln.targets.profiles import load_profile
    >>> load_profile("coral-edgetpu").precisions, unit_precisions(load_profile("coral-edgetpu"))  # + its host CPU's
    (('int8',), ('int8', 'fp16', 'fp32'))
    """
    from edgekiln.targets.compute_units import profile_units

    seen = list(profile.precisions)
    for unit in profile_units(profile):
        seen += [p for p in unit.precisions if p not in seen]
    return tuple(seen)
