"""Benchmark case `optimize_corpus` (issue 20): `edgekiln optimize` on every corpus model, as a user runs it.

Per model (:data:`edgekiln.testing.corpus.CORPUS`), the command below runs in a subprocess with its
defaults (``--timeout`` 600 s, the default search space); the table is read from the run folder's
``report.json``: wall time against the timeout, trials run, the selected model, its p50 against
FP32's p50 (each on its fastest runtime, timed side by side in optimize's final round), the metric
drop against the budget, and the verdict or optimize's reason for keeping FP32.

    edgekiln optimize MODEL.onnx --calib CALIB.npz --eval EVAL.npz [--input-shape ...] \\
        --target raspberry-pi-4 --max-drop 0.01 --out RUN

Which models: ``quick`` = the small ones; ``EDGEKILN_OPTIMIZE_CORPUS=ds_cnn,mtcnn_rnet`` (comma-separated)
picks a subset, also under ``make bench``; the other models' rows are then carried over from the previous
``bench/results/optimize_corpus.json``, each with the date and commit it was measured at. One model at a
time while developing:
``python -m benchmarks.cases_optimize_corpus NAME ... [--quick]``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.corpus_run import shape_args
from benchmarks.suite import CaseResult
from edgekiln.report import md_table
from edgekiln.testing.corpus import CORPUS, CorpusModel, ensure

TARGET = "raspberry-pi-4"
MAX_DROP = 0.01
SUBSET_ENV = "EDGEKILN_OPTIMIZE_CORPUS"
#: a run still going this long after its own --timeout is killed (and counted as over it)
HANG_GRACE_S = 300.0


def command(m: CorpusModel, out: Path) -> list[str]:
    """The user's command line for corpus model ``m`` (after ``edgekiln``)."""
    return ["optimize", str(m.path), "--calib", str(m.calib), "--eval", str(m.eval), *shape_args(m.entry),
            "--target", TARGET, "--max-drop", str(MAX_DROP), "--out", str(out)]


def _commit() -> str:
    """The repository's short commit (``+`` when the tree has changes), or ``?`` outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def run_model(name: str, work: Path) -> dict[str, Any]:
    """Run the command on corpus model ``name`` in a subprocess and read its run folder: one row."""
    from edgekiln.search.recipe import DEFAULT_TIMEOUT_S

    m = ensure(name)
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "edgekiln.cli", *command(m, out)]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=DEFAULT_TIMEOUT_S + HANG_GRACE_S,
                              env={**os.environ, "COLUMNS": "120"})
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = -9, _text(exc.stdout), f"killed after {DEFAULT_TIMEOUT_S + HANG_GRACE_S:.0f} s"
    wall = time.monotonic() - start
    row: dict[str, Any] = {"model": name, "exit": code, "wall_s": round(wall, 1), "commit": _commit(),
                           "measured": time.strftime("%Y-%m-%d", time.gmtime()),
                           "progress_lines": sum(line.startswith("trial #") for line in stdout.splitlines()),
                           "metric_note": next((line for line in stdout.splitlines() if line.startswith("metric:")),
                                               None)}
    report_path = out / "report.json"
    if not report_path.is_file():
        row.update(timeout_s=DEFAULT_TIMEOUT_S, verdict="error: " + _last_line(stderr or stdout))
        return row
    report = json.loads(report_path.read_text())
    row.update(_from_report(report))
    if code not in (0, 3):
        row["verdict"] = "error: " + _last_line(stderr or stdout)
    return row


def _from_report(report: dict[str, Any]) -> dict[str, Any]:
    """The row's numbers and verdict from optimize's own report.json."""
    versus = report.get("vs_fp32") or {}
    selected = report.get("selected")
    budget = (report.get("constraints") or {}).get("max_drop")
    timeout = (report.get("recipe") or {}).get("search", {}).get("timeout_s")
    row: dict[str, Any] = {
        "timeout_s": timeout, "trials": len(report.get("trials") or []), "stopped": report.get("stopped"),
        "metric": report.get("metric_name"), "budget": budget,
        "fp32_p50_ms": versus.get("fp32_latency_ms_host"), "fp32_runtime": versus.get("fp32_runtime"),
        "side_by_side": versus.get("side_by_side"),
    }
    if selected is None:
        row.update(selected=None, verdict="nothing selected: " + _reasons(versus))
        return row
    fp32_kept = bool(versus.get("selected_is_fp32"))
    row.update(selected="FP32 (input model)" if fp32_kept else selected["label"],
               selected_p50_ms=selected.get("latency_ms_host"), selected_runtime=selected.get("runtime"),
               speedup=versus.get("speedup"), drop=selected.get("drop"))
    if fp32_kept:
        row.update(selected_p50_ms=None, speedup=None, drop=None)
        row["verdict"] = "FP32 kept: " + _reasons(versus) + _fastest(versus)
    else:
        faster = (versus.get("speedup") or 0.0) > 1.0
        within = selected.get("drop") is not None and budget is not None and selected["drop"] <= budget + 1e-12
        row["verdict"] = "faster than FP32 within the budget" if faster and within else \
            f"SELECTED BUT {'NOT FASTER THAN FP32' if not faster else 'OVER BUDGET'}"
    return row


def _reasons(versus: dict[str, Any]) -> str:
    """optimize's per-trial verdicts, counted: e.g. '4 not faster than FP32, 1 failed (...)'."""
    counts: dict[str, int] = {}
    for t in versus.get("trials") or []:
        why = str(t.get("why") or "?")
        if why.startswith("failed:"):
            text = why[len("failed:"):].strip()
            key = "failed (" + (text if len(text) <= 90 else text[:87] + "...") + ")"
        elif "not selected:" in why:
            key = f"{t.get('label')} faster here but not selected: " + why.split("not selected:", 1)[1].strip()
        elif "keeping layers float gave up:" in why:
            done = re.search(r"\((\d+ of \d+) done\)", why)
            key = "over the drop budget, keeping layers float " + (
                f"ran out of time ({done[1]} layers ranked)" if "gave up: timeout" in why and done else
                "cannot meet it" if "gave up: budget" in why else "gave up")
        elif why.startswith("accuracy drop"):
            key = "over the drop budget" + (" and not faster" if "not faster" in why else "")
        elif "not faster than FP32" in why:
            key = "not faster than FP32"
        else:
            key = why[:80]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "no trial ran"


def _fastest(versus: dict[str, Any]) -> str:
    """The evidence line for a kept FP32: the fastest trial that ran, against FP32."""
    timed = [t for t in versus.get("trials") or [] if t.get("speedup_vs_fp32")]
    if not timed:
        return ""
    t = max(timed, key=lambda t: t["speedup_vs_fp32"])
    drop = "" if t.get("drop") is None else f", drop {t['drop']:.4f}"
    return f" (fastest trial: {t['label']}, {t['latency_ms_host']:.3g} ms on {t['runtime']}, " \
           f"{t['speedup_vs_fp32']:.2f}x FP32{drop})"


def _cells(r: dict[str, Any]) -> list[Any]:
    def ms(v: float | None, runtime: str | None) -> str:
        return "-" if v is None else f"{v:.3g} ({runtime or '?'})"

    limit = r.get("timeout_s")
    wall = f"{r['wall_s']:.0f} / {limit:.0f} " + ("yes" if r["wall_s"] <= limit else "OVER") if limit else \
        f"{r['wall_s']:.0f} / no limit"
    drop = "-" if r.get("drop") is None else f"{r['drop']:.4f} / {r.get('budget')}"
    speed = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
    trials = f"{r.get('trials', '-')}" + (" (stopped: timeout)" if (r.get("stopped") or "").startswith("timeout")
                                          else "")
    when = f"{r.get('measured', '?')} {r.get('commit', '?')}"
    return [r["model"], when, wall, trials, r.get("metric") or "-", r.get("selected") or "-",
            ms(r.get("selected_p50_ms"), r.get("selected_runtime")), ms(r.get("fp32_p50_ms"), r.get("fp32_runtime")),
            speed, drop, r.get("verdict", "-")]


def chosen_models(quick: bool, names: list[str] | None = None) -> list[str]:
    """``names``, else ``$EDGEKILN_OPTIMIZE_CORPUS``, else every model (the small ones when ``quick``),
    smallest file first so an interrupted run has measured the most models."""
    names = names or [n.strip() for n in os.environ.get(SUBSET_ENV, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in CORPUS]
    if unknown:
        raise SystemExit(f"{SUBSET_ENV}: no corpus model(s) {', '.join(unknown)} (have: {', '.join(sorted(CORPUS))})")
    if names:
        return names
    chosen = [n for n, e in CORPUS.items() if e.small or not quick]
    return sorted(chosen, key=lambda n: ensure(n).path.stat().st_size)


def earlier_rows(results: Path, skip: list[str]) -> list[dict[str, Any]]:
    """Rows of the previous run (``results``: its JSON) for the corpus models not in ``skip``."""
    if not results.is_file():
        return []
    data = json.loads(results.read_text())
    day = str(data.get("date", "?"))[:10]
    return [{"measured": day, "commit": "?", **r} for r in data.get("rows", [])
            if r.get("model") in CORPUS and r.get("model") not in skip]


def optimize_corpus(work: Path, quick: bool = False, models: list[str] | None = None) -> CaseResult:
    work.mkdir(parents=True, exist_ok=True)
    names = chosen_models(quick, models)
    subset = bool(models or os.environ.get(SUBSET_ENV, "").strip())
    rows = []
    for name in names:
        print(f"-- optimize_corpus: {name}", flush=True)
        rows.append(run_model(name, work))
        print(f"   {rows[-1]['wall_s']:.0f} s: {rows[-1].get('verdict')}", flush=True)
    if subset:   # NOTE: work is ROOT/runs/bench/optimize_corpus; the previous results are ROOT/bench/results
        rows += earlier_rows(work.resolve().parents[2] / "bench" / "results" / "optimize_corpus.json", names)
    order = list(CORPUS)
    rows.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    table = md_table(["model", "measured (date, commit)", "wall s / timeout s", "trials", "metric", "selected", "selected p50 ms",
                      "FP32 p50 ms", "x FP32", "drop / budget", "verdict"], [_cells(r) for r in rows])
    faster = sum(r.get("verdict") == "faster than FP32 within the budget" for r in rows)
    kept = sum(str(r.get("verdict", "")).startswith("FP32 kept") for r in rows)
    over = [r["model"] for r in rows if not r.get("timeout_s") or r["wall_s"] > r["timeout_s"]]
    md = "\n".join([
        f"`edgekiln optimize MODEL.onnx --calib CALIB.npz --eval EVAL.npz [--input-shape NAME=...] --target {TARGET} "
        f"--max-drop {MAX_DROP} --out RUN` on {len(rows)} corpus models, each in its own process with the defaults "
        "(`--timeout` 600 s, the default search space; no labels in the corpus data, so the metric is cosine "
        "against the FP32 model's first output). Wall time includes start-up; p50s are optimize's own numbers "
        "(batch 1, one thread, each model on its fastest runtime, the selected model and FP32 timed side by side "
        "in its final round); the verdict is optimize's reason, trial by trial, when it kept FP32. Rows measured "
        "in an earlier run of a subset of the models say so in their date and commit.", "",
        table, "",
        f"- Faster than FP32 within the budget: {faster} of {len(rows)}; FP32 kept with the reason stated: {kept}; "
        f"over the timeout or no report: {', '.join(over) or 'none'}."])
    return CaseResult("optimize_corpus", f"optimize --target {TARGET} --max-drop {MAX_DROP} on the corpus", md,
                      {"rows": rows, "target": TARGET, "max_drop": MAX_DROP})


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:200]


def main(argv: list[str]) -> int:
    from benchmarks.suite import PINNED

    if any(os.environ.get(k) != v for k, v in PINNED.items()):   # one thread, set before numpy loads
        os.environ.update(PINNED)
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.cases_optimize_corpus", *argv])
    names = [a for a in argv if not a.startswith("--")]
    res = optimize_corpus(Path("runs/bench/optimize_corpus"), "--quick" in argv, names or None)
    print(res.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
