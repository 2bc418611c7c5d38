"""The `edgekiln quantize` run folder: the model, FP32 vs quantized on every runtime, the
sensitivity table and plot, calibration per tensor, and a parity check across runtimes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.models.run_folder import RunFolder
from edgekiln.quant.parity import first_divergence, runtime_runner
from edgekiln.quant.size import byte_breakdown
from edgekiln.quant.speed import SQNR_SLACK_DB
from edgekiln.report import md_table, new_figure, save_figure


def runtime_table(fp32: Path, quant: Path, *, runs: int, warmup: int,
                  input_shapes: dict[str, tuple[int, ...]] | None = None,
                  other_forms: dict[str, dict[str, Any]] | None = None,
                  accuracy_feeds: list[dict[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """p50/p90 (1 thread, batch 1) of both models on every available runtime that runs ONNX, all
    timed round-robin in one loop, so machine load falls on every row alike (``input_shapes``
    fixes dynamic input dimensions, as the intake resolved them). ``other_forms`` adds the
    quantized model in another runtime's format (``{"litert": {"path": model.tflite}}``, or
    ``{"error": why}``): a row with the quantized model only, fed the same float inputs.
    With ``accuracy_feeds`` each row also gets ``sqnr_db``: the quantized model on that runtime
    against FP32 on onnxruntime (runtimes do not compute an int8 graph alike)."""
    from edgekiln.execution.feeds import random_feeds, specs_from_session
    from edgekiln.execution.runtimes import available_runtimes, load_session, runs_file
    from edgekiln.execution.timing import latency_stats, time_round_robin_wall_and_cpu
    from edgekiln.quant.speed import sqnr_of

    rows: dict[str, dict[str, Any]] = {}
    calls = {}
    float_feed: dict[str, np.ndarray] | None = None
    want = None
    if accuracy_feeds:
        ref = load_session(fp32, "onnxruntime", threads=1, input_shapes=input_shapes)
        want = [ref.run(dict(f)) for f in accuracy_feeds]
    for name, reason in available_runtimes().items():
        if reason or not runs_file(name, fp32):
            continue
        try:
            pair = [load_session(p, name, threads=1, input_shapes=input_shapes) for p in (fp32, quant)]
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot load this model is reported, not fatal
            rows[name] = {"runtime": name, "error": str(exc).splitlines()[0][:160]}
            continue
        feed = float_feed = float_feed or random_feeds(specs_from_session(pair[0], input_shapes, 1))
        for tag, sess in zip(("fp32", "quant"), pair, strict=True):
            calls[(name, tag)] = lambda s=sess, f=feed: s.run(f)
        rows[name] = {"runtime": name}
        if want is not None:
            rows[name]["sqnr_db"] = sqnr_of(want, [pair[1].run(dict(f)) for f in accuracy_feeds or ()])
    for name, form in (other_forms or {}).items():
        if "path" not in form or float_feed is None:
            rows[name] = {"runtime": name, "error": form.get("error", "no ONNX runtime to compare with")}
            continue
        sess = load_session(form["path"], name, threads=1)
        feed = dict(zip(sess.input_names, float_feed.values(), strict=True))
        if hasattr(sess, "native_feeds"):   # NOTE: an int8 .tflite takes int8 NHWC: converted once, untimed
            feed = sess.native_feeds(feed)
        calls[(name, "quant")] = lambda s=sess, f=feed: s.run(f)
        rows[name] = {"runtime": name, "file": Path(form["path"]).name}
        if want is not None and hasattr(sess, "run_as_onnx"):
            rows[name]["sqnr_db"] = sqnr_of(want, [sess.run_as_onnx(dict(zip(sess.input_names, f.values(), strict=True)))
                                                   for f in accuracy_feeds or ()])
    wall, cpu = time_round_robin_wall_and_cpu(calls, rounds=runs, warmup=warmup)
    for (name, tag), v in wall.items():
        st, c = latency_stats(v), latency_stats(cpu[(name, tag)])["p50"]
        rows[name].update({"fp32_p50": st["p50"], "fp32_p90": st["p90"], "fp32_cpu_p50": c} if tag == "fp32"
                          else {"p50": st["p50"], "p90": st["p90"], "cpu_p50": c})
    for r in rows.values():
        if "p50" in r and "fp32_p50" in r:
            r["speedup"] = r["fp32_p50"] / r["p50"]
    return list(rows.values())


def speed_verdict(runtimes: list[dict[str, Any]], floor_db: float | None = None) -> dict[str, Any] | None:
    """The quantized model on its fastest runtime against FP32 on FP32's fastest runtime (the
    comparison users care about: what they would ship either way), in CPU time per call when every
    row has it (one-thread runtimes: the latency on an idle core, unmoved by other processes),
    else wall time.

    Only runtimes whose ``sqnr_db`` is within ``SQNR_SLACK_DB`` of the best runtime's compete, or at
    least ``floor_db`` where that is lower (the bar the quantize pass chose its form with: the default
    int8 form's SQNR minus ``SQNR_SLACK_DB``).

    >>> v = speed_verdict([{"runtime": "a", "fp32_p50": 2.0, "p50": 1.5}, {"runtime": "b", "fp32_p50": 1.0, "p50": 1.2}])
    >>> v["runtime"], v["fp32_runtime"], round(v["ratio"], 2), v["faster"], v["clock"]
    ('b', 'b', 1.2, False, 'wall')
    >>> speed_verdict([{"runtime": "a", "fp32_p50": 2.0, "p50": 0.5, "sqnr_db": 15.0},
    ...                {"runtime": "b", "fp32_p50": 1.0, "p50": 0.8, "sqnr_db": 30.0}])["runtime"]
    'b'
    >>> speed_verdict([{"runtime": "a", "fp32_p50": 2.0, "p50": 0.5, "sqnr_db": 15.0},
    ...                {"runtime": "b", "fp32_p50": 1.0, "p50": 0.8, "sqnr_db": 30.0}], floor_db=14.0)["runtime"]
    'a'
    """
    measured = [r for r in runtimes if "p50" in r]
    floats = [r for r in runtimes if "fp32_p50" in r]
    if not measured or not floats:
        return None
    best_sqnr = max((r["sqnr_db"] for r in measured if "sqnr_db" in r), default=None)
    if best_sqnr is not None:   # NOTE: a runtime is a candidate only where the int8 model's accuracy holds
        bar = best_sqnr - SQNR_SLACK_DB if floor_db is None else min(best_sqnr - SQNR_SLACK_DB, floor_db)
        measured = [r for r in measured if r.get("sqnr_db", float("-inf")) >= bar]
    clock = "cpu" if all("cpu_p50" in r for r in measured) and all("fp32_cpu_p50" in r for r in floats) else "wall"
    qk, fk = ("cpu_p50", "fp32_cpu_p50") if clock == "cpu" else ("p50", "fp32_p50")
    q = min(measured, key=lambda r: r[qk])
    f = min(floats, key=lambda r: r[fk])
    ratio = q[qk] / f[fk]
    return {"runtime": q["runtime"], "p50": q[qk], "fp32_runtime": f["runtime"], "fp32_p50": f[fk],
            "ratio": ratio, "faster": ratio < 1.0, "clock": clock}


def accuracy_floor(res: Any) -> float | None:
    """The SQNR bar the quantize pass chose its int8 form with (``speed["accuracy_floor_db"]``), if any."""
    return (getattr(res, "speed", None) or {}).get("accuracy_floor_db")


DIVERGENCE_SAMPLES = 16   # inputs the per-layer localization runs (each through every prefix model)


def parity(quant: Path, data: dict[str, np.ndarray], limit: int = 64) -> dict[str, Any]:
    """Outputs of the quantized model on each runtime against onnxruntime with graph
    optimizations off (the QDQ reference semantics): top-1 agreement, max difference, and the
    first layer whose int8 activations differ by more than 1 LSB, with a likely cause."""
    from edgekiln.execution.feeds import batch_rows, npz_feeds, specs_from_session
    from edgekiln.execution.ort import ort_session
    from edgekiln.execution.runtimes import available_runtimes, load_session

    ref_sess = ort_session(Path(quant), optimize=False)
    rows = batch_rows(npz_feeds(data, specs_from_session(ref_sess), count=limit))
    ref = np.concatenate([ref_sess.run(None, r)[0] for r in rows])
    out: dict[str, Any] = {}
    for name, reason in available_runtimes().items():
        if reason or name == "litert":
            continue
        try:
            sess = load_session(quant, name)
            got = np.concatenate([sess.run(r)[0] for r in rows])
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": str(exc).splitlines()[0][:160]}
            continue
        a, b = got.reshape(len(got), -1), ref.reshape(len(ref), -1)
        out[name] = {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
                     "max_abs_diff": float(np.abs(a - b).max()), "samples": len(a)}
        try:
            out[name]["divergence"] = first_divergence(quant, rows[:DIVERGENCE_SAMPLES], runtime_runner(name),
                                                       runtime=name)
        except Exception as exc:  # noqa: BLE001 - localization is a diagnosis; its failure is reported, not fatal
            out[name]["divergence"] = {"error": str(exc).splitlines()[0][:160]}
    return out


def _divergence_cell(v: dict[str, Any]) -> str:
    d = v.get("divergence") or {}
    if "error" in d:
        return f"not localized: {d['error']}"
    if not d.get("checkpoints"):
        return d.get("note", "-")
    first = d.get("first")
    if first is None:
        return f"none (all {d['checkpoints']} int8 activations within 1 LSB)"
    return (f"`{first['layer']}` ({first['op']}, activation {first['index'] + 1} of {d['checkpoints']}): "
            f"{first['cause']}")


def time_profile(fp32: Path, quant: Path, runtime: str,
                 input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Per-layer time of both models on ``runtime`` (its own profiler, 20 calls each):
    ``{"runtime", "fp32": rows, "quant": rows}`` or ``{"runtime", "error"}``."""
    from edgekiln.execution.feeds import random_feeds, specs_from_session
    from edgekiln.execution.profile import layer_profile
    from edgekiln.execution.runtimes import load_session

    try:
        feed = random_feeds(specs_from_session(load_session(fp32, runtime, input_shapes=input_shapes),
                                               input_shapes, 1))
        return {"runtime": runtime, "fp32": layer_profile(fp32, runtime, feed),
                "quant": layer_profile(quant, runtime, feed)}
    except Exception as exc:  # noqa: BLE001 - a profile is evidence, not a gate
        return {"runtime": runtime, "error": str(exc).splitlines()[0][:160]}


# Ops that only move int8 tensors in and out of float (or between layouts): the cost of float islands.
_BOUNDARY_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "Transpose", "Reorder", "ReorderInput",
                           "ReorderOutput", "Convert"})


def _profile_lines(verdict: dict[str, Any] | None, prof: dict[str, Any] | None, scheme: str) -> list[str]:
    """The verdict (quantized on its fastest runtime vs FP32 on FP32's) and where the time goes."""
    from edgekiln.execution.profile import by_op

    lines: list[str] = []
    if verdict:
        word = "faster" if verdict["faster"] else "**not faster**"
        clock = "CPU time" if verdict.get("clock") == "cpu" else "wall time"
        lines += [f"{scheme} on {verdict['runtime']} (its fastest runtime): {verdict['p50']:.4f} ms p50 ({clock} per "
                  f"call, 1 thread), {word} than FP32 on its fastest runtime ({verdict['fp32_runtime']}: "
                  f"{verdict['fp32_p50']:.4f} ms): {verdict['ratio']:.2f}x the time.", ""]
    if not prof:
        return lines
    rt = prof["runtime"]
    lines += [f"## Where the time goes ({rt}, per layer, runtime profiler)", ""]
    if "error" in prof:
        return [*lines, f"No profile: {prof['error']}", ""]
    ops_f, ops_q = by_op(prof["fp32"]), by_op(prof["quant"])
    top = sorted(set(ops_f) | set(ops_q), key=lambda k: -max(ops_f.get(k, 0.0), ops_q.get(k, 0.0)))[:12]
    lines += [md_table(["op (as the runtime runs it)", "FP32 ms", f"{scheme} ms"],
                       [[k, _f(ops_f.get(k)), _f(ops_q.get(k))] for k in top]), ""]
    total_q = sum(ops_q.values())
    boundary = sum(v for k, v in ops_q.items() if k in _BOUNDARY_OPS)
    if total_q:
        lines += [f"Moving tensors in and out of int8 or between layouts ({', '.join(sorted(_BOUNDARY_OPS & set(ops_q)))})"
                  f": {boundary:.3f} of {total_q:.3f} ms ({100 * boundary / total_q:.0f}%).", ""]
    lines += ["Costliest layers of the quantized model:", "",
              md_table(["node", "op", "kernel", "ms"],
                       [[r["node"][:60], r["op"], r["kernel"], _f(r["ms"])] for r in prof["quant"][:8]]), ""]
    return lines


def write_quantize_report(out: Path, *, scheme: str, metric_name: str, fp32: Path, res: Any, runtimes: list[dict],
                          parity_result: dict[str, Any], config: dict[str, Any], model: Any,
                          profile: dict[str, Any] | None = None) -> Path:
    """The run folder of `edgekiln quantize`; ``model`` is the quantized ModelArtifact (``res.path``)."""
    size_fp32, size = os.path.getsize(fp32), os.path.getsize(res.path)
    ort = next((r for r in runtimes if r["runtime"] == "onnxruntime" and "p50" in r), None)
    measured = [r for r in runtimes if "p50" in r]
    fastest = min(measured, key=lambda r: r["p50"])["runtime"] if measured else None
    slower = [{"runtime": r["runtime"], "fp32_p50": r["fp32_p50"], "p50": r["p50"]}
              for r in measured if "fp32_p50" in r and r["p50"] > r["fp32_p50"]]
    data = {
        "scheme": scheme, "metric_name": metric_name, "metric_fp32": res.metric_fp32, "metric": res.metric,
        "drop": None if res.metric is None else res.metric_fp32 - res.metric,
        "model_bytes_fp32": size_fp32, "model_bytes": size, "size_ratio": size / size_fp32,
        "latency_ms_fp32": ort["fp32_p50"] if ort else None, "latency_ms": ort["p50"] if ort else None,
        "latency_by_runtime": runtimes, "fastest_runtime": fastest, "slower_than_fp32": slower,
        "kept_float": res.kept_float, "sensitivity": res.sensitivity, "attempts": res.attempts,
        "calibration": res.calibration, "parity": parity_result, "config": config,
        "rewrites": getattr(res, "rewrites", {}), "adaround": getattr(res, "adaround", {}),
        "speed": getattr(res, "speed", {}), "speed_verdict": speed_verdict(runtimes, accuracy_floor(res)), "time_profile": profile,
        "byte_breakdown": byte_breakdown(res.path),
    }
    plot = _sensitivity_plot(out, res.sensitivity)
    lines = [f"# edgekiln quantize: {scheme}", "",
             md_table(["", "FP32", scheme], [
                 [metric_name, _f(res.metric_fp32), _f(res.metric)],
                 ["size (bytes)", size_fp32, f"{size} ({size / size_fp32:.3f}x)"],
                 ["onnxruntime p50 ms (1 thread)", _f(data["latency_ms_fp32"]), _f(data["latency_ms"])]]), "",
             "## Latency by runtime (batch 1, 1 thread)", "",
             md_table(["runtime", "FP32 p50", "FP32 p90", "FP32 CPU p50", "quantized p50", "quantized p90",
                       "quantized CPU p50", "speed-up", "SQNR dB vs FP32"],
                      [[r["runtime"], _f(r.get("fp32_p50")), _f(r.get("fp32_p90")), _f(r.get("fp32_cpu_p50")),
                        _f(r.get("p50")), _f(r.get("p90")), _f(r.get("cpu_p50")),
                        _f(r.get("speedup")) if "speedup" in r else r.get("error", ""), _f(r.get("sqnr_db"))]
                       for r in runtimes]), "",
             "Wall time per call, and the process's CPU time per call (one thread: the latency on an idle core; "
             "another process sharing the core adds to wall time only). All rows timed round-robin in one loop.", ""]
    if fastest:
        lines += [f"Fastest runtime for the quantized model on this machine: **{fastest}**.", ""]
    for r in runtimes:
        if "file" in r:
            lines += [f"{r['runtime']}: the same int8 graph written as `{r['file']}` by edgekiln's writer "
                      f"(in `work/{r['runtime']}/`; `edgekiln export RUN --to tflite` writes it with its LiteRT and "
                      "TFLite Micro checks), fed the same inputs already quantized to its int8 NHWC input (as an "
                      "application hands them over); no FP32 form.", ""]
    for s in slower:
        lines += [f"**Warning: slower than FP32 on {s['runtime']}**: {s['p50']:.4f} ms vs {s['fp32_p50']:.4f} ms.", ""]
    lines += ["## Parity across runtimes", "",
              md_table(["runtime", "top-1 agreement", "max abs diff", "first layer off by more than 1 LSB"],
                       [[k, _f(v.get("top1_agreement")),
                         _f(v.get("max_abs_diff")) if "max_abs_diff" in v else v.get("error"), _divergence_cell(v)]
                        for k, v in parity_result.items()]), "",
              "Reference: the same QDQ model in onnxruntime with graph optimizations off (the fake-quant "
              "simulation). Each int8 activation is read from the runtime through a prefix of the model ending "
              "there, so the runtime's own fusions apply.", ""]
    rw = data["rewrites"]
    if rw:
        lines += ["## Graph rewrites (int8-dynamic)", "",
                  f"Activation inputs smoothed: {len(rw.get('smoothed', {}))}; attention-mask fills softened: "
                  f"{rw.get('mask_fills', 0)}; residual adds kept out of SkipLayerNormalization: "
                  f"{rw.get('residual_sums', 0)}; embedding tables int8 per row: "
                  f"{', '.join(rw.get('embedding_tables', [])) or 'none'}.", ""]
    if data["adaround"]:
        lines += ["## AdaRound (learned rounding of int8 weights)", "",
                  md_table(["layer", "output MSE, nearest", "output MSE, as stored", "held-out MSE, nearest",
                            "held-out MSE, learned", "kept", "weights moved"],
                           [[k, f"{v['mse_nearest']:.4g}", f"{v['mse']:.4g}", f"{v['held_out_mse_nearest']:.4g}",
                             f"{v['held_out_mse_learned']:.4g}", "yes" if v["kept"] else "no (nearest)",
                             f"{v['flipped_weights']:,} of {v['weights']:,}"] for k, v in data["adaround"].items()]),
                  "", "Output MSE against the float layer on the calibration samples; a fifth of them is held out "
                  "of the fit and decides whether the layer keeps the learned rounding.", ""]
    lines += _profile_lines(data["speed_verdict"], profile, scheme)
    lines += _speed_lines(data["speed"])
    lines += ["## Where the bytes go", "",
              md_table(["part", "bytes"], [[k, f"{v:,}"] for k, v in data["byte_breakdown"].items()]), ""]
    for_latency = (data["speed"] or {}).get("float_for_latency") or {}
    budget = [k for k in res.kept_float if k not in for_latency]
    if budget:
        lines += [f"Kept in float to meet the budget: {', '.join(budget)}.", ""]
    if res.sensitivity:
        lines += ["## Per-layer sensitivity (metric with only this layer quantized)", "",
                  md_table(["layer", "metric", "damage", "float weight bytes"],
                           [[r["layer"], _f(r["metric_if_only_this_quantized"]), _f(r["damage"]), r["bytes_float"]]
                            for r in res.sensitivity]), ""]
        if plot:
            lines += [f"![sensitivity]({plot})", ""]
    if res.calibration:
        counts: dict[str, int] = {}
        for m in res.calibration.values():
            counts[m] = counts.get(m, 0) + 1
        lines += ["Calibration method per tensor: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                  + " (full list in report.json).", ""]
    return RunFolder(out).write(command="quantize", model=model, measurements=data, markdown="\n".join(lines))


_FORM_LABELS = {"on": "int8, speed rule", "off": "int8, no speed rule", "uint8": "uint8 activations",
                "fused": "int8, speed rule, Conv outputs before float activations left float",
                "inputs": "int8 only where a Conv/MatMul/Gemm reads (NNCF's placement), outputs float",
                "inputs_uint8": "uint8 only where a Conv/MatMul/Gemm reads (NNCF's placement), outputs float"}


def _speed_lines(sp: dict[str, Any]) -> list[str]:
    """The "int8 form" section: the forms timed, the one kept, and each float layer's reason."""
    if not sp:
        return []
    lines = ["## The int8 form kept for speed", ""]
    if sp.get("p50_by_runtime"):
        by_rt, q = sp["p50_by_runtime"], sp.get("sqnr_db", {})
        rts = sorted({rt for v in by_rt.values() for rt in v})
        lines += [md_table(["form", *[f"p50 ms {rt}" for rt in rts], "SQNR dB (calibration samples)", "kept"],
                           [[_FORM_LABELS.get(f, f), *[_f(v.get(rt)) for rt in rts], _f(q.get(f)),
                             "yes" if f == sp.get("kept_form") else ""] for f, v in by_rt.items()]), ""]
    for k, v in (sp.get("runtime_errors") or {}).items():
        lines += [f"Form {k} did not load: {v}", ""]
    lines += [f"Speed rule {sp.get('rule')}: {'applied' if sp.get('applied') else 'not applied'}; activations "
              f"{sp.get('activations', 'int8')} ({sp.get('decided_by', 'default')}).", ""]
    if sp.get("fp32_p50_ms"):
        lines += [f"FP32 in the same loop: {sp['fp32_p50_ms']:.4g} ms on its fastest runtime (CPU time per call).", ""]
    tried = sp.get("layers_tried_float") or {}
    if tried:
        kept = sp.get("float_for_latency") or {}
        lines += ["Still not faster than FP32: the costliest int8 layers (runtime profiler) tried float, one at a time "
                  f"(int8 model: {_f(sp.get('layers_tried_float_base_ms'))} ms):", "",
                  md_table(["layer", "profiled ms (int8)", "model p50 ms with it float", "kept float"],
                           [[k, _f(v["profile_ms"]), _f(v["p50_ms"]), "yes" if k in kept else "no"]
                            for k, v in tried.items()]), ""]
    fused, floats = sp.get("fused_hardswish") or [], sp.get("float_for_speed") or {}
    if fused:
        lines += [f"HardSigmoid + Mul fused back into HardSwish before quantization: {len(fused)}.", ""]
    if floats:
        lines += [md_table(["layer", "why it stayed float"], [[k, v] for k, v in floats.items()]), ""]
    return lines


def _sensitivity_plot(out: Path, rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    fig, ax = new_figure(8, max(2.5, 0.3 * len(rows)))
    ax.barh([r["layer"] for r in rows][::-1], [r["damage"] for r in rows][::-1])
    ax.set_xlabel("metric drop when only this layer is quantized")
    save_figure(fig, out / "sensitivity.png")
    return "sensitivity.png"


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
