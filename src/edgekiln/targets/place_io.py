"""The files of a placement: one ONNX file per segment and ``placement.json`` (v1).

A placement (:class:`edgekiln.targets.placement.Placement`) names, for each contiguous segment of
the model, the unit that runs it and the tensors that cross its borders. :func:`write_segments`
cuts the model into those segments with ``onnx.utils.Extractor`` (as
:func:`edgekiln.runtime.split_exec.cut_model` cuts head and tail); :func:`placement_dict` is the
JSON record, with the sha256 of the model and of every segment file, so a reader
(:func:`edgekiln.execution.chain.load_chain`) refuses files that changed.

>>> unit_name("tpu"), pct(0.0512), pct(None)
('tpu', '5.1%', 'n/a (no single unit runs the whole model)')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.execution.chain import PLACEMENT_VERSION as VERSION  # the version load_chain reads
from edgekiln.fileio import sha256_file

FILE = "placement.json"
SEGMENTS_DIR = "segments"


def unit_name(unit: Any) -> str:
    """A segment's unit as a name (a :class:`ComputeUnit` or already a string)."""
    return str(getattr(unit, "name", unit))


def write_segments(model_path: str | Path, segments: Sequence[Any], out_dir: str | Path) -> list[Path]:
    """Write ``OUT/segNN_UNIT.onnx`` for each segment (its ``inputs`` -> its ``outputs``); return the paths.

    A single segment covering the model is still written (a copy through the extractor), so a
    chain always has files to run.
    """
    import onnx
    from onnx.utils import Extractor

    from edgekiln.fileio import atomic_save_onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    known = {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)}
    known |= {i.name for i in model.graph.initializer}
    ex = Extractor(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seg in segments:
        missing = [t for t in (*seg.inputs, *seg.outputs) if t not in known]
        if missing:
            raise EdgekilnError(f"segment {seg.index} names tensors without a shape in the model: {missing[:3]}")
        name = f"seg{seg.index:02d}_{unit_name(seg.unit)}.onnx"
        paths.append(atomic_save_onnx(out / name, ex.extract_model(list(seg.inputs), list(seg.outputs))))
    return paths


def placement_dict(placement: Any, *, model_path: str | Path, files: Sequence[Path], root: str | Path,
                   outputs: Sequence[str], measured_ms: float | None = None, runtimes: Sequence[str] | None = None) -> dict[str, Any]:
    """The placement.json v1 record of ``placement``; ``files`` are its segment files, stored
    relative to ``root`` (the folder placement.json is written to). ``runtimes`` overrides each
    segment's runtime (the host measurement picks them); ``outputs`` are the unplaced model's
    output names (the chain's output order); ``measured_ms`` is the chain measured
    end to end (host targets), else null.
    """
    segs = []
    for k, (seg, path) in enumerate(zip(placement.segments, files, strict=True)):
        segs.append({
            "index": seg.index, "unit": unit_name(seg.unit),
            "runtime": runtimes[k] if runtimes else (seg.runtime or "onnxruntime"),
            "file": Path(path).relative_to(root).as_posix(), "sha256": sha256_file(path),
            "inputs": list(seg.inputs), "outputs": list(seg.outputs), "nodes": len(seg.nodes),
            "macs": int(seg.macs), "est_ms": _round(seg.est_ms),
            "transfer_in_bytes": int(seg.transfer_in_bytes), "transfer_out_bytes": int(seg.transfer_out_bytes),
            # a unit this machine lacks runs simulated; a host unit is measured only by the host measurement
            "source": "simulated" if not seg.runtime else ("estimate" if measured_ms is None else "measured"),
        })
    return {
        "version": VERSION, "target": placement.target, "objective": placement.objective,
        "model_sha256": sha256_file(model_path), "outputs": list(outputs), "segments": segs,
        "fallback": [fallback_dict(f) for f in placement.fallback],
        "single_unit": {k: (_round(v) if isinstance(v, int | float) else str(v))
                        for k, v in dict(placement.single_unit).items()},
        # measured: the total is the chain's time; the estimate is the sum of its segments'
        "estimated_ms": _round(placement.total_ms if measured_ms is None else sum(s["est_ms"] for s in segs)),
        "estimated_energy_mj": None if placement.total_energy_mj is None else _round(placement.total_energy_mj),
        "measured_ms": None if measured_ms is None else _round(measured_ms),
        "gain": None if placement.gain is None else _round(placement.gain),
    }


def fallback_dict(f: Any) -> dict[str, Any]:
    if isinstance(f, Mapping):
        return {k: f.get(k) for k in ("node", "op", "unit", "reason")}
    return {"node": getattr(f, "node", None), "op": getattr(f, "op", None),
            "unit": unit_name(getattr(f, "unit", "")), "reason": getattr(f, "reason", str(f))}


def _output_names(path: str | Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _round(v: float) -> float:
    return round(float(v), 6)


def place_model(model: Any, profile: Any, *, objective: str = "latency", precision: str | None = None,
                out: str | Path | None = None, measure: bool = True, to_tflite: Any = None) -> tuple[Any, dict[str, Any]]:
    """Plan the placement of the loaded ``model`` (a ModelArtifact) on ``profile``'s units; with
    ``out``, write the segments and placement.json and run the chain once against the whole model.

    Host units (a ``runtime`` each) are measured end to end when ``measure`` (see
    :mod:`edgekiln.targets.place_measure`; ``to_tflite`` converts a block for LiteRT); other
    units are estimated from the profile and, in the chain check, simulated on onnxruntime.
    Returns the placement and the measurements of report.json.
    """
    from edgekiln.models.run_folder import precision_of
    from edgekiln.targets.compute_units import profile_units
    from edgekiln.targets.place_graph import place_graph
    from edgekiln.targets.placement import place

    if objective not in ("latency", "energy"):
        raise EdgekilnError(f"--objective {objective!r}: use latency or energy")
    units = profile_units(profile)
    prec = precision or precision_of(model.kind)
    graph = place_graph(model.path, model.input_shapes, prec)
    host = all(getattr(u, "runtime", None) for u in units)
    measured: dict[str, Any] | None = None
    if host and measure and objective == "latency":
        import tempfile

        from edgekiln.targets.place_measure import measure_placement

        with tempfile.TemporaryDirectory(prefix="edgekiln-place-") as tmp:
            work = Path(out) / "work" / "place" if out is not None else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            placement, measured = measure_placement(model, graph, units, target=profile.name, work=work,
                                                    to_tflite=to_tflite)
    else:
        placement = place(graph, units, objective=objective, target=profile.name)
    report: dict[str, Any] = {"target": profile.name, "objective": objective, "precision": prec,
                              "units": [unit_name(u) for u in units], "host_measured": measured}
    if out is None:
        report["placement"] = summary(placement)
        return placement, report
    seg_dir = Path(out) / SEGMENTS_DIR
    for stale in seg_dir.glob("seg[0-9][0-9]_*") if seg_dir.is_dir() else ():   # a previous run's segments
        stale.unlink()
    if measured:      # the measured files (a LiteRT segment is a .tflite), copied beside placement.json
        import shutil

        seg_dir.mkdir(parents=True, exist_ok=True)
        files = [Path(shutil.copyfile(f, seg_dir / f"seg{s.index:02d}_{unit_name(s.unit)}{Path(f).suffix}"))
                 for s, f in zip(placement.segments, measured["segment_files"], strict=True)]
    else:
        files = write_segments(model.path, placement.segments, seg_dir)
    runtimes = measured["runtimes"] if measured else None
    record = placement_dict(placement, model_path=model.path, files=files, root=out,
                            outputs=_output_names(model.path),
                            measured_ms=measured["chosen_p50_ms"] if measured else None, runtimes=runtimes)
    from edgekiln.fileio import atomic_write_json

    atomic_write_json(Path(out) / FILE, record)
    record["check"] = check_chain(model, Path(out) / FILE)
    atomic_write_json(Path(out) / FILE, record)
    report["placement"] = record
    return placement, report


def check_chain(model: Any, placement_json: Path, *, seed: int = 0) -> dict[str, Any]:
    """Run the written chain once (units this machine lacks simulated on onnxruntime) and compare
    it with the whole model on onnxruntime: max |y - y_ref| and max |y_ref| per output."""
    import numpy as np

    from edgekiln.execution.chain import load_chain
    from edgekiln.execution.feeds import random_feeds
    from edgekiln.execution.runtimes import load_session

    feeds = random_feeds(model.inputs, seed=seed)
    ref_sess = load_session(model.path, "onnxruntime", input_shapes=model.input_shapes)
    ref = dict(zip(ref_sess.output_names, ref_sess.run(feeds), strict=True))
    chain = load_chain(placement_json)
    got = dict(zip(chain.output_names, chain.run(feeds), strict=True))
    diff = {k: float(np.max(np.abs(got[k].astype(np.float64) - v.astype(np.float64)))) if v.size else 0.0
            for k, v in ref.items()}
    scale = {k: float(np.max(np.abs(v.astype(np.float64)))) if v.size else 0.0 for k, v in ref.items()}
    return {"max_abs_diff": diff, "ref_max_abs": scale, "sources": list(chain.sources), "seed": seed}


def summary(placement: Any) -> dict[str, Any]:
    return {"segments": [{"index": s.index, "unit": unit_name(s.unit), "runtime": s.runtime or "onnxruntime",
                          "nodes": len(s.nodes), "macs": int(s.macs),
                          "est_ms": _round(s.est_ms),
                          "transfer_in_bytes": int(s.transfer_in_bytes),
                          "transfer_out_bytes": int(s.transfer_out_bytes), "source": s.source}
                         for s in placement.segments],
            "fallback": [fallback_dict(f) for f in placement.fallback], "estimated_ms": _round(placement.total_ms),
            "single_unit": {k: (_round(v) if isinstance(v, int | float) else str(v))
                            for k, v in dict(placement.single_unit).items()},
            "gain": None if placement.gain is None else _round(placement.gain)}


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md of ``edgekiln place``: the segment table, the fallback ops and the gain."""
    p = report["placement"]
    lines = [f"# Placement on {report['target']} ({report['objective']}, {report['precision']})", "",
             "| segment | unit | runtime | ops | MACs | est. ms | in bytes | out bytes | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in p["segments"]:
        lines.append(f"| {s['index']} | {s['unit']} | {s.get('runtime', '-')} | {s['nodes']} | {s['macs']} | "
                     f"{s['est_ms']:.4f} | {s['transfer_in_bytes']} | {s['transfer_out_bytes']} | {s['source']} |")
    lines.append("")
    lines += [f"- fallback: {f['unit']}: {f['reason']}" for f in p["fallback"]] or ["- fallback: none"]
    single = ", ".join(f"{k} {v:.4f} ms" if isinstance(v, float) else f"{k}: {v}" for k, v in p["single_unit"].items())
    total = (f"measured {p['measured_ms']:.4f} ms end to end" if p.get("measured_ms") is not None
             else f"estimated {p['estimated_ms']:.4f} ms")
    lines.append(f"- {total}; best single unit: {single or '-'}; "
                 f"gain {pct(p['gain'])}")
    simulated = sorted({s["unit"] for s in p["segments"] if s["source"] == "simulated"})
    if simulated and "check" in p:
        lines.append(f"- times for {', '.join(simulated)} are simulated from the profile (no such unit here); "
                     "outputs were computed on onnxruntime")
    if "check" in p:
        lines.append(f"- chain vs whole model, max |diff| per output: {p['check']['max_abs_diff']}")
    m = report.get("host_measured")
    if m:
        lines += ["", "| candidate | measured p50 ms | spread ms |", "|---|---|---|"]
        lines += [f"| {c['label']} | {c['p50_ms']:.4f} | {c['spread_ms']:.4f} |" for c in m["candidates"]]
        lines.append(f"- chosen: {m['chosen']} ({m['reason']})")
    return "\n".join(lines)


def fit_with_placement(fit: Any, profile: Any, model_path: str | Path, input_shapes: Mapping[str, Any] | None,
                       precision: str) -> Any:
    """``fit`` (a FitReport) with its latency and energy replaced by the placement's, when
    ``profile`` has more than one compute unit and is not measured (a host measures its own).
    The budgets stay; ``latency_source`` says "placement estimate (N segments; fallback: ...)".
    A model the planner cannot place (no unit runs some op) keeps the roofline, with a note.
    """
    from dataclasses import replace

    from edgekiln.targets.compute_units import profile_units
    from edgekiln.targets.fit import Metric
    from edgekiln.targets.place_graph import place_graph
    from edgekiln.targets.placement import place

    units = profile_units(profile)
    if len(units) < 2 or profile.measured:
        return fit
    try:
        p = place(place_graph(model_path, dict(input_shapes or {}), precision), units, objective="latency",
                  target=profile.name)
    except EdgekilnError as exc:
        return replace(fit, notes=(*fit.notes, f"no placement across units ({exc}); roofline estimate kept"))
    lat, energy = fit.metrics["latency_ms"], fit.metrics["energy_mj"]
    metrics = {**fit.metrics, "latency_ms": Metric("latency_ms", float(p.total_ms), lat.budget, "ms"),
               "energy_mj": Metric("energy_mj", None if p.total_energy_mj is None else float(p.total_energy_mj),
                                   energy.budget, "mJ")}
    fallback = "; ".join(sorted({fallback_dict(f)["reason"] or "" for f in p.fallback})) or "none"
    where = ", ".join(f"{unit_name(s.unit)}" for s in p.segments)
    return replace(fit, metrics=metrics,
                   latency_source=f"placement estimate ({len(p.segments)} segments; fallback: {fallback})",
                   notes=(*fit.notes, f"placed as {where}; gain {pct(p.gain)} over the best single unit"))


def pct(gain: float | None) -> str:
    return "n/a (no single unit runs the whole model)" if gain is None else f"{100 * gain:.1f}%"
