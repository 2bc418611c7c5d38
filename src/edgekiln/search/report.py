"""The optimize run folder: report.json, report.md, report.html and the trade-off plots."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekiln.fileio import atomic_write_text
from edgekiln.models.artifact import ModelArtifact
from edgekiln.models.run_folder import RunFolder
from edgekiln.report import md_table, new_figure, save_figure
from edgekiln.search.recipe import Recipe
from edgekiln.search.selection import HOST_LATENCY_NOISE, pareto_front
from edgekiln.search.trial import Candidate


def summary(c: Candidate) -> dict[str, Any]:
    """The fields every candidate shows in the report (the keys users compare)."""
    return {
        "trial": c.number, "label": c.label, "metric": c.metric, "metric_runtime": c.metric_runtime, "drop": c.drop,
        "model_bytes": c.model_bytes,
        "peak_ram_bytes": c.peak_ram_bytes, "flash_bytes": c.flash_bytes, "macs": c.macs,
        "latency_ms_host": c.latency_ms_host, "latency_ms_host_p90": c.latency_ms_host_p90,
        "latency_ms_target_est": c.latency_ms_target_est, "energy_mj_target_est": c.energy_mj_target_est,
        "passes": c.steps, "artifact": Path(c.artifact).name if c.artifact else None, "feasible": c.feasible,
        "violations": c.violations, "state": c.state, "error": c.error, "seconds": c.seconds, "cached": c.cached,
        "runtimes": c.runtimes, "runtime": next((r["runtime"] for r in c.runtimes if "p50_ms" in r), None),
        "final_round": c.final_round, "budget_round": c.budget_round, "mcu": c.mcu,
    }


def write_optimize_report(out: Path, recipe: Recipe, profile: Any, baseline: Candidate, candidates: list[Candidate],
                          best: Candidate | None, *, model: ModelArtifact | None, partial: bool,
                          exhausted: bool = False, stop: str | None = None, notes: Sequence[str] = (),
                          deployment: dict[str, Any] | None = None) -> Path:
    """The optimize run folder; ``model`` is the selected candidate's artifact (None: nothing selected);
    ``deployment`` the C library written for it on a microcontroller target (search/mcu.py)."""
    front = pareto_front([c for c in candidates if c.metric is not None] + [baseline])
    # NOTE: only where FP32 itself could ship (host, Linux boards): on a microcontroller the host
    # time of an FP32 ONNX file says nothing about the device.
    versus = vs_fp32(baseline, best, candidates) \
        if getattr(profile, "kind", None) in ("host", "linux") else None
    data = {
        "target": recipe.target,
        "target_kind": getattr(profile, "kind", None),
        "metric_name": recipe.metric,
        "prefer": recipe.prefer,
        "constraints": recipe.constraints.to_dict(),
        "selected": summary(best) if best else None,
        "baseline": summary(baseline),
        "pareto": [summary(c) for c in front],
        "trials": [summary(c) for c in candidates],
        "complete": not partial,
        "stopped": stop,
        "vs_fp32": versus,
        "space_exhausted": exhausted,
        "notes": list(notes),
        "deployment": deployment,
        "recipe": recipe.to_dict(),
    }
    if best and baseline.model_bytes:
        data["size_reduction"] = baseline.model_bytes / max(1, best.model_bytes or 1)
    plot = _plot(out, baseline, candidates, best)
    md = _markdown(recipe, baseline, candidates, best, front, plot, partial, data.get("size_reduction"))
    md = md.replace(FP32_SLOT, "\n".join(_vs_fp32_lines(versus, stop) + [f"*{n}.*\n" for n in notes]
                                        + deployment_lines(deployment, getattr(profile, "name", recipe.target))))
    if exhausted:
        md += (f"\n*The search space holds {sum(not c.budget_round for c in candidates)} distinct pipeline(s), fewer than the "
               f"{recipe.search.trials} trials asked for: every one was tried.*\n")
    atomic_write_text(out / "report.html", _html(md, plot))
    return RunFolder(out).write(command="optimize", model=model, measurements=data, markdown=md)


def table_rows(cands: list[Candidate]) -> list[list[Any]]:
    rows = []
    for c in cands:
        rows.append([c.number if c.number >= 0 else "-", c.label, _f(c.metric), _f(c.drop), _kb(c.model_bytes),
                     _kb(c.peak_ram_bytes), _f(c.latency_ms_target_est), _host(c),
                     "yes" if c.feasible else ("; ".join(c.violations) or c.state + (f": {c.error[:80]}" if c.error else ""))])
    return rows


def _host(c: Candidate) -> str:
    """Host p50, with the runtime that gave it when several were timed."""
    timed = [r for r in c.runtimes if "p50_ms" in r]
    return _f(c.latency_ms_host) + (f" ({timed[0]['runtime']})" if len(timed) > 1 else "")


HEADERS = ["trial", "pipeline", "metric", "drop", "size KB", "RAM KB", "target ms (est)", "host p50 ms", "fits"]


def _markdown(recipe: Recipe, baseline: Candidate, candidates: list[Candidate], best: Candidate | None,
              front: list[Candidate], plot: str | None, partial: bool, reduction: float | None) -> str:
    c = recipe.constraints
    lines = [f"# edgekiln optimize: {recipe.target}", ""]
    if partial:
        lines += ["*Search not finished (interrupted or still running): this is the best result so far.*", ""]
    lines += ["## Constraints", "", md_table(["constraint", "value"], [
        ["metric", recipe.metric], ["max drop", c.max_drop], ["max target latency (ms)", c.max_latency_ms],
        ["max RAM (bytes)", c.max_ram_bytes or "profile"], ["max flash (bytes)", c.max_flash_bytes or "profile"],
        ["prefer", recipe.prefer]]), ""]
    lines += ["## Selected", ""]
    if best and best.number == baseline.number:
        lines += [md_table(HEADERS, table_rows([best])), "", "The selected model is the input FP32 model.", ""]
    elif best:
        lines += [md_table(HEADERS, table_rows([baseline, best])), ""]
        if reduction:
            lines += [f"The selected model is **{reduction:.1f}x smaller** than the baseline; "
                      f"artifact: `{Path(best.artifact).name if best.artifact else '-'}`.", ""]
    else:
        lines += ["No candidate meets every constraint (see the trials below for what each violates).", ""]
    if best and best.runtimes:
        lines += ["### Runtime for deployment (selected model, batch 1, 1 thread)", "",
                  md_table(["runtime", "p50 ms", "p90 ms"],
                           [[r["runtime"], _f(r.get("p50_ms")), _f(r.get("p90_ms")) if "p90_ms" in r else r.get("skipped")]
                            for r in best.runtimes]), "",
                  f"Deploy with **{best.runtimes[0]['runtime']}**: the fastest on this machine"
                  + (f" (as `{Path(best.runtimes[0]['file']).name}`, edgekiln's own export of the model in this "
                     "folder; `edgekiln export RUN --to tflite` writes it again)" if best.runtimes[0].get("file") else "")
                  + (f"; the metric was measured on {best.metric_runtime}." if best.metric_runtime else "."), ""]
    lines += [FP32_SLOT, ""]
    lines += _final_round([baseline, *candidates])
    if plot:
        lines += [f"![trade-offs]({plot})", ""]
    lines += ["## Pareto front (metric vs size vs target latency)", "", md_table(HEADERS, table_rows(front)), ""]
    lines += ["## All trials", "", md_table(HEADERS, table_rows(candidates)), ""]
    lines += ["Target latency is estimated from the device profile (roofline, see docs/targets.md) except for the "
              "`host` target, where it is measured, and microcontroller targets with QEMU installed, where it is the "
              "C library's instructions counted on the emulated CPU x the profile's cycles per instruction / its "
              "clock. Host latency: 1 thread, batch 1, p50, on the fastest installed "
              "runtime (named in brackets) for host and Linux-class targets, on onnxruntime otherwise.", ""]
    return "\n".join(lines)


FP32_SLOT = "<!-- vs-fp32 -->"


def vs_fp32(baseline: Candidate, best: Candidate | None, candidates: list[Candidate]) -> dict[str, Any]:
    """The selected model against FP32 (host p50 on each one's fastest runtime; side by side when
    both were in the final round) and, per trial, why it was not selected over FP32."""
    base = baseline.latency_ms_host
    rows = []
    for c in candidates:
        ratio = base / c.latency_ms_host if base and c.latency_ms_host else None
        why = "selected" if best is not None and c.number == best.number else _why_not(c, base)
        if why == FASTER and best is not None:
            why += "; not selected: " + _lost_to(c, best, baseline)
        rows.append({"trial": c.number, "label": c.label, "state": c.state, "drop": c.drop,
                     "latency_ms_host": c.latency_ms_host, "runtime": _runtime(c), "speedup_vs_fp32": ratio,
                     "why": why})
    sel = best.latency_ms_host if best else None
    return {"fp32_latency_ms_host": base, "fp32_runtime": _runtime(baseline),
            "selected_is_fp32": best is not None and best.number == baseline.number,
            "selected_latency_ms_host": sel, "speedup": base / sel if base and sel else None,
            "side_by_side": bool(best and best.final_round and baseline.final_round),
            "faster_here": [r["trial"] for r in rows if r["why"].startswith(FASTER)], "trials": rows}


FASTER = "faster than FP32 within the budget"


def _runtime(c: Candidate) -> str | None:
    return next((r["runtime"] for r in c.runtimes if "p50_ms" in r), None)


def _why_not(c: Candidate, fp32_ms: float | None) -> str:
    """One line: what kept trial ``c`` from being a model faster than FP32 within the budget."""
    if c.state == "failed":
        return f"failed: {(c.error or '?')[:160]}"
    reasons = list(c.violations)
    if c.latency_ms_host is not None and fp32_ms and c.latency_ms_host * (1 + HOST_LATENCY_NOISE) >= fp32_ms:
        reasons.append(f"not faster than FP32 ({c.latency_ms_host:.3f} vs {fp32_ms:.3f} ms; "
                       f"{HOST_LATENCY_NOISE:.0%} is timing noise)")
    if c.state == "pruned" and not reasons:
        reasons.append("pruned (cannot fit)")
    return "; ".join(reasons) or FASTER


def _lost_to(c: Candidate, best: Candidate, baseline: Candidate) -> str:
    """Why ``c``, faster than FP32 here within the budget, lost to the selected ``best``: the
    selection ranks by the target's latency (estimated for a board, measured for ``host``), then
    the metric (search/selection.py); a trial left out of the final round is not compared."""
    winner = "FP32" if best.number == baseline.number else f"trial {best.number}"
    if best.final_round and not c.final_round:
        return "not timed in the final round (only the fastest trials were), so its time does not compare"
    mine, theirs = c.latency_ms_target_est, best.latency_ms_target_est
    if mine is None or theirs is None:
        return f"{winner} was selected"
    if mine > theirs * (1 + HOST_LATENCY_NOISE):
        return f"{winner} is faster on the target ({theirs:.4g} vs {mine:.4g} ms target latency)"
    same = f"{winner} is as fast on the target ({theirs:.4g} vs {mine:.4g} ms target latency)"
    if (best.metric or 0.0) > (c.metric or 0.0):
        return f"{same} and more accurate (drop {best.drop or 0.0:.3g} vs {c.drop or 0.0:.3g})"
    return f"{same}, as accurate, and first on size, then host time, then trial order"


def _vs_fp32_lines(versus: dict[str, Any] | None, stop: str | None) -> list[str]:
    lines = [f"*Search stopped early — {stop}.*", ""] if stop else []
    if versus is None or versus["fp32_latency_ms_host"] is None:
        return lines
    base, sel = versus["fp32_latency_ms_host"], versus["selected_latency_ms_host"]
    lines += ["## Compared with FP32", ""]
    where = "timed side by side in the final round" if versus["side_by_side"] else "host p50, fastest runtime each"
    if versus["selected_is_fp32"] and versus.get("faster_here"):
        lines += [f"**FP32 is kept** (FP32 {base:.4g} ms on {versus['fp32_runtime']}; {where}): trial(s) "
                  f"{', '.join(map(str, versus['faster_here']))} ran faster than FP32 on this machine within the "
                  "budget, but FP32 ranks first on the target's latency, then the metric. Why each trial was not "
                  "selected:", ""]
    elif versus["selected_is_fp32"]:
        lines += [f"**No candidate is faster than FP32 within the budget: FP32 is kept** (FP32 {base:.4g} ms on "
                  f"{versus['fp32_runtime']}; {where}). Why each trial was not selected:", ""]
    elif sel is not None:
        lines += [f"The selected model is **{versus['speedup']:.2f}x** the speed of FP32 ({sel:.4g} vs {base:.4g} ms; "
                  f"{where}).", ""]
    rows = [[r["trial"], r["label"], _f(r["drop"]), _f(r["latency_ms_host"]), r["runtime"] or "-",
             _f(r["speedup_vs_fp32"]), r["why"]] for r in versus["trials"]]
    if rows:
        lines += [md_table(["trial", "pipeline", "drop", "host p50 ms", "runtime", "x FP32 speed", "verdict"],
                           rows), ""]
    return lines


def deployment_lines(dep: dict[str, Any] | None, target: str) -> list[str]:
    """The report.md section on the selected model's C library (microcontroller targets).

    >>> deployment_lines({"library": None, "error": "export --to c failed: x"}, "cortex-m7")[2]
    'The C library could not be written: export --to c failed: x.'
    """
    if dep is None:
        return []
    lines = ["## Deployment: the C library (`c/`)", ""]
    if dep.get("library") is None:
        return lines + [f"The C library could not be written: {dep.get('error')}.", ""]
    rows = [["library", f"`c/` (as `edgekiln export RUN --to c` writes it; requantization {dep['requant']})"],
            ["arena / RAM incl. I/O (planned)", f"{dep['arena_bytes']:,} B / {dep['ram_bytes']:,} B"],
            ["flash (estimate)", f"{dep['flash_bytes_estimate']:,} B"]]
    v = dep["verify_c"]
    if "passed" in v:
        rows.append([f"verify-c on {v['data']} ({v['n_inputs']:,} inputs)",
                     f"**{'PASS' if v['passed'] else 'FAIL'}**: {v['identical_fraction']:.2%} of int8 outputs identical to "
                     f"onnxruntime's (>= {v['thresholds']['identical_fraction']:.0%}), max {v['max_abs_diff']} LSB, top-1 "
                     f"{v['top1_agree']:,}/{v['n_inputs']:,}, bit-exact with the integer reference: "
                     f"{v['exact_vs_numpy_reference']}; valgrind {v['valgrind']}"])
    else:
        rows.append(["verify-c", f"not run: {v.get('skipped') or v.get('error')}"])
    m = dep["measured"]
    if "instructions_per_inference" in m:
        lo, hi = m["instructions_range"]
        rows += [[f"instructions / inference ({m['cpu']}, QEMU {m['board']}, -{m['opt']})",
                  f"**{m['instructions_per_inference']:,}** ({m['instructions_per_mac']} per MAC; {lo:,} .. {hi:,} over "
                  f"{m['inputs']['n']} inputs)"],
                 [f"latency on {target} (est.)", f"**{m['latency_ms_est']:.4g} ms** at {m['clock_hz'] / 1e6:g} MHz, "
                  f"{m['cycles_per_instruction']:g} cycles per instruction ({m['cpi_source']})"],
                 ["library as linked", f"text {m['text']:,} B, data {m['data']:,} B, bss {m['bss']:,} B"],
                 ["arena / stack (measured)", f"{m['arena_bytes']:,} B / {m['stack_bytes']:,} B"],
                 ["outputs on the device", f"identical to the integer reference: {m['outputs_match']} "
                  f"({m['inputs']['source']})"]]
    else:
        rows.append(["measured on the emulated CPU", f"not measured: {m.get('skipped') or m.get('error')}"])
    lines += [md_table(["", "value"], rows), ""]
    if "report" in m:
        lines += [f"Per layer: [{m['report']}]({m['report']}) (`edgekiln measure-mcu c --cpu {m['cpu']}` gives "
                  "the same). QEMU counts executed instructions, not cycles: the latency assumes the stated CPI.", ""]
    return lines


def deployment_summary(dep: dict[str, Any] | None, out: Path) -> list[str]:
    """The lines ``optimize`` prints about the selected model's C library (microcontroller targets).

    >>> deployment_summary({"library": "c", "verify_c": {"skipped": "no evaluation data"},
    ...                     "measured": {"skipped": "qemu-system-arm not installed"}}, Path("o"))
    ['C library: o/c; verify-c not run (no evaluation data); not measured on the emulated CPU (qemu-system-arm not installed)']
    """
    if dep is None:
        return []
    if dep.get("library") is None:
        return [f"C library: not written ({dep.get('error')})"]
    v, m = dep["verify_c"], dep["measured"]
    check = (f"verify-c {'PASS' if v['passed'] else 'FAIL'} ({v['identical_fraction']:.2%} of int8 outputs identical on "
             f"{v['n_inputs']:,} inputs)") if "passed" in v else f"verify-c not run ({v.get('skipped') or v.get('error')})"
    if "instructions_per_inference" in m:
        measured = (f"{m['cpu']} (QEMU, -{m['opt']}): {m['instructions_per_inference']:,} instructions/inference, "
                    f"~{m['latency_ms_est']:.3g} ms at {m['clock_hz'] / 1e6:g} MHz, arena {m['arena_bytes']:,} B, "
                    f"stack {m['stack_bytes']:,} B, text {m['text']:,} B")
    else:
        measured = f"not measured on the emulated CPU ({m.get('skipped') or m.get('error')})"
    return [f"C library: {out / dep['library']}; {check}; {measured}"]


def _final_round(candidates: list[Candidate]) -> list[str]:
    finals = [c for c in candidates if c.final_round]
    if not finals:
        return []
    names = sorted({r["runtime"] for c in finals for r in c.runtimes if "p50_ms" in r})
    rows = [[c.number if c.number >= 0 else "-", c.label, _f(c.metric), *[_f(next((r["p50_ms"] for r in c.runtimes
                                                          if r["runtime"] == n and "p50_ms" in r), None))
                                                for n in names]] for c in finals]
    return ["### Final round (timed side by side, round-robin; p50 ms)", "",
            md_table(["trial", "pipeline", "metric", *names], rows), "",
            "The fastest feasible trials were timed again together on every installed runtime, so that load "
            "on this machine fell on all of them alike; the selection and the deployment runtime use these numbers.",
            ""]


def _plot(out: Path, baseline: Candidate, candidates: list[Candidate], best: Candidate | None) -> str | None:
    pts = [c for c in candidates if c.metric is not None and c.model_bytes]
    if not pts:
        return None
    fig, (ax1, ax2) = new_figure(11, 4, ncols=2)
    for c in pts:
        color = "tab:green" if c.feasible else "tab:gray"
        ax1.scatter(c.model_bytes / 1024, c.metric, c=color, s=25)
        lat = c.latency_ms_target_est if c.latency_ms_target_est is not None else c.latency_ms_host
        ax2.scatter(lat, c.metric, c=color, s=25)
    for ax, x in ((ax1, (baseline.model_bytes or 0) / 1024), (ax2, baseline.latency_ms_target_est)):
        if baseline.metric is not None and x is not None:
            ax.scatter(x, baseline.metric, marker="s", c="tab:blue", s=50, label="baseline")
    if best is not None and best.metric is not None:
        ax1.scatter((best.model_bytes or 0) / 1024, best.metric, marker="*", c="tab:red", s=160, label="selected")
        ax2.scatter(best.latency_ms_target_est, best.metric, marker="*", c="tab:red", s=160, label="selected")
    ax1.set_xlabel("model size (KB)")
    ax2.set_xlabel("target latency, estimated (ms)")
    for ax in (ax1, ax2):
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, out / "tradeoffs.png")
    return "tradeoffs.png"


def _html(markdown: str, plot: str | None) -> str:
    """A self-contained page: the Markdown tables rendered as HTML tables (no extra dependency)."""
    body = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set(line.replace("|", "").strip()) <= {"-"}:
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            body.append(f'<img src="{html.escape(plot or "")}" alt="trade-offs" style="max-width:100%">')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>edgekiln optimize</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _kb(v: int | None) -> str:
    return "-" if v is None else f"{v / 1024:.1f}"
