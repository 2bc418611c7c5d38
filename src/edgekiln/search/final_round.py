"""The final round for host and Linux-class targets.

During the search each trial is timed when it finishes, minutes apart from the others; on a
shared machine the same graph then measures up to 1.7x apart (MiniLM, two static int8 trials).
Before selecting, the fastest feasible candidates are timed again side by side: every finalist
on every installed runtime, round-robin (a few calls of each in turn), so that load from other
processes falls on all of them alike. The selection and the runtime chosen for deployment use
these numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekiln.search.selection import beats_fp32, select_best
from edgekiln.search.trial import Candidate, score_on_fastest, violations

FINALISTS = 6      # at most this many candidates are timed again (the default CNN space holds 5 pipelines,
#                    the transformer one 6: each is then compared with FP32 side by side)
WITHIN = 1.0       # ... those up to 2x the fastest feasible trial's host latency (at 1.5x, the MiniLM
#                    search left out two static int8 trials that its noise had timed 1.6-1.8x slower)
PER_ROUND = 5      # calls of one model on one runtime before the next takes its turn


def finalists(candidates: Sequence[Candidate], limit: int = FINALISTS, within: float = WITHIN) -> list[Candidate]:
    """The feasible candidates worth timing again, fastest first."""
    ok = [c for c in candidates if c.feasible and c.state == "complete" and c.latency_ms_host is not None
          and c.artifact and Path(c.artifact).is_file()]
    if not ok:
        return []
    ok.sort(key=lambda c: (c.latency_ms_host, c.number))
    fastest = ok[0].latency_ms_host or 0.0
    return [c for c in ok if (c.latency_ms_host or 0.0) <= fastest * (1 + within)][:limit]


def retime(cands: Sequence[Candidate], *, runs: int, warmup: int, host_is_target: bool,
           payload: dict[str, Any]) -> None:
    """Time ``cands`` round-robin on every installed runtime (1 thread, batch 1) and update their
    ``runtimes``, host latencies and, when the host is the target, target latency and latency
    constraint, in place. A candidate whose fastest runtime changed is scored again on the new
    one (``payload`` holds the trial payload's ``eval``, ``metric``, ``reference``,
    ``baseline_metric``, ``constraints`` and ``artifact``, whose inputs give the shapes to time).

    NOTE: timed at the input shapes the intake resolved, as in the trials: without them a model with
    dynamic H/W (MTCNN P-Net) could not be fed, every pair was dropped, and the selection silently
    used trial times taken minutes apart."""
    from edgekiln.execution.feeds import random_feeds, specs_from_session
    from edgekiln.execution.runtimes import REAL, available_runtimes, load_session, skip_reason
    from edgekiln.execution.specs import TensorSpec
    from edgekiln.execution.timing import latency_stats, time_round_robin
    from edgekiln.search.litert_form import evaluation_file, timing_call

    unavailable = available_runtimes()
    inputs = [TensorSpec.from_dict(i) for i in (payload.get("artifact") or {}).get("inputs", [])]
    shapes = {i.name: i.shape for i in inputs} or None
    calls: dict[tuple[int, str], Callable[[], Any]] = {}
    skipped: dict[int, list[dict[str, Any]]] = {c.number: [] for c in cands}
    files: dict[tuple[int, str], str] = {}
    for c in cands:
        for name in REAL:
            # NOTE: an int8 candidate timed on LiteRT as its .tflite (search/litert_form.py) is timed so again
            path = Path(evaluation_file(c.runtimes, name, c.artifact or ""))
            reason = skip_reason(name, path, unavailable)
            if reason is None:
                try:
                    if path.suffix == ".tflite":
                        calls[(c.number, name)] = timing_call(path, inputs)
                        files[(c.number, name)] = str(path)
                        continue
                    session = load_session(path, name, threads=1, input_shapes=shapes)
                    feeds = random_feeds(specs_from_session(session, shapes))
                    session.run(feeds)
                except Exception as exc:  # noqa: BLE001 - a runtime refusing a model only drops that pair
                    reason = f"{type(exc).__name__}: {exc}"[:200]
                else:
                    calls[(c.number, name)] = functools.partial(session.run, feeds)
                    continue
            skipped[c.number].append({"runtime": name, "skipped": reason})
    keys = list(calls)
    timed = time_round_robin({str(k): calls[k] for k in keys}, rounds=max(1, runs // PER_ROUND), warmup=warmup,
                             per_turn=PER_ROUND)
    samples = {k: timed[str(k)] for k in keys}
    limits = payload.get("constraints") or {}
    for c in cands:
        rows = []
        for (number, name), values in samples.items():
            if number == c.number:
                stats = latency_stats(values)
                rows.append({"runtime": name, "p50_ms": float(stats["p50"]), "p90_ms": float(stats["p90"]),
                             **({"file": files[(number, name)]} if (number, name) in files else {})})
        if not rows:
            continue  # keeps the search's own measurement
        rows.sort(key=lambda r: r["p50_ms"])
        c.runtimes = rows + skipped[c.number]
        c.latency_ms_host, c.latency_ms_host_p90 = rows[0]["p50_ms"], rows[0]["p90_ms"]
        c.final_round = True
        rescored = rows[0]["runtime"] != c.metric_runtime
        if rescored:
            score_on_fastest(c, payload)
        if host_is_target:
            c.latency_ms_target_est = c.latency_ms_host
        if host_is_target or rescored:
            # NOTE: memory lines stay; the latency and accuracy lines are recomputed from the new numbers
            c.violations = [v for v in c.violations if not v.startswith(("latency:", "accuracy drop:"))] + \
                violations(c, {k: limits.get(k) for k in ("max_latency_ms", "max_drop")}, [])
            c.feasible = not c.violations


def final_selection(candidates: Sequence[Candidate], best: Candidate, *, prefer: str, tolerance: float, runs: int,
                    host_is_target: bool, payload: dict[str, Any], baseline: Candidate | None = None,
                    fp32_competes: bool = False) -> Candidate | None:
    """Time the finalists side by side and select among them (when latency decides; otherwise
    only ``best`` is timed again, for its runtime table).

    ``baseline`` (the FP32 input model) is timed in the same loop, so the report compares the
    selected model with FP32 measured alike; with ``fp32_competes`` it is also a finalist, and a
    candidate is selected over it only when measured faster in this loop (beyond ``tolerance``:
    a Linux board's roofline estimate calls every int8 model 2x faster than FP32, the measured
    MobileNetV3 and CREPE int8 models were slower).

    NOTE: the selection is made among the finalists only: a candidate left out was measured in
    another phase of the machine's load, so its number does not compare with theirs.
    """
    group = [c for c in (finalists(candidates) if prefer == "latency" else [best]) if c is not baseline]
    timed = [*group, baseline] if baseline is not None else group
    retime(timed, runs=max(runs, 50), warmup=min(50, runs), host_is_target=host_is_target, payload=payload)
    if not fp32_competes or baseline is None:
        return select_best(group, prefer, tolerance) or select_best(candidates, prefer, tolerance)
    pool = [c for c in group if beats_fp32(c, baseline, tolerance)]
    return select_best([*pool, baseline], prefer, tolerance)
