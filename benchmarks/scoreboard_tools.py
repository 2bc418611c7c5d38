"""The scoreboard's tools: what each one makes of a corpus model's FP32 ONNX file, and where it runs.

Every builder returns an :class:`Entry`: the tool, the runtime its model runs on, the model file,
or the one-line reason the tool produced nothing. Each tool is used the way its documentation
shows a user:

* edgekiln int8: :func:`edgekiln.api.quantize` with default settings (what ``edgekiln quantize
  MODEL --calib CALIB.npz --out RUN`` calls), run on the runtime its report names fastest;
* onnxruntime: ``quant_pre_process`` then ``quantize_static`` with its defaults;
* NNCF: ``nncf.quantize`` on the OpenVINO model (:func:`benchmarks.peers.nncf_openvino`);
* LiteRT: edgekiln's own ``.tflite`` export of the edgekiln int8 model (``edgekiln export --to tflite``);
* C: ``edgekiln export --to c`` of the same model (no row: its arena and flash go in the summary).

>>> Entry("FP32", "onnxruntime", error="boom").ok
False
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peers
from edgekiln.testing.corpus import CorpusModel

FP32 = "FP32"
EDGEKILN = "edgekiln int8"
ORT_STATIC = "ORT quantize_static"
NNCF = "NNCF"
LITERT = "LiteRT int8 (edgekiln .tflite)"
PEER_INT8 = (ORT_STATIC, NNCF, LITERT)
#: int8 weights below this many bytes make a model MCU-sized (issue 20: C export for every such model).
MCU_WEIGHT_BYTES = 1_000_000
#: the models issue 20 names as MCU-sized although a 1000-class head takes some past 1 MB (the
#: corpus builds SqueezeNet at 112x112 for it).
MCU_NAMED = ("mtcnn_pnet", "mtcnn_onet", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1", "ds_cnn")


@dataclass
class Entry:
    """One tool's model of one corpus model: a file to run on ``runtime``, or ``error``."""

    tool: str
    runtime: str
    path: Path | None = None
    error: str | None = None      # one line: why this tool has no model here
    note: str = ""                # one line: anything a reader must know about this row
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.path is not None


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as one short line (the runtimes' C++ decorations and edgekiln's list of what
    it does support removed).

    >>> one_line(ValueError("first line\\nsecond"))
    'ValueError: first line second'
    >>> from edgekiln.errors import EdgekilnError
    >>> one_line(EdgekilnError("op X is not supported by the C backend; supported: Conv, Add"))
    'op X is not supported by the C backend'
    """
    from edgekiln.errors import EdgekilnError
    from edgekiln.execution.ort import error_line

    text = error_line(exc).split("; supported: ")[0]
    text = text if isinstance(exc, EdgekilnError) else f"{type(exc).__name__}: {text}"
    return text[:limit]


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    """Run the body in ``path``: ``quant_pre_process`` writes temporary files into the current
    directory, also when it fails (FIELD-NOTES)."""
    path.mkdir(parents=True, exist_ok=True)
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def edgekiln_int8(m: CorpusModel, work: Path, *, bench_runs: int) -> tuple[Entry, Path | None]:
    """``edgekiln quantize`` with default settings; the row runs on the report's fastest runtime.
    Returns the entry and the run folder (for the exports)."""
    from edgekiln import api

    out = work / "edgekiln-int8"
    try:
        run = api.quantize(m.path, out=out, calib=m.calib, input_shapes=m.entry.input_shapes or None,
                           bench_runs=bench_runs)
    except Exception as exc:  # noqa: BLE001 - any failure is a cell of the table, not the end of the bench
        return Entry(EDGEKILN, "-", error=one_line(exc)), None
    rep = run.report()
    runtime, path = chosen_runtime(rep, out)
    speed = rep.get("speed") or {}
    floats = speed.get("float_for_speed") or {}
    info = {"chosen_runtime": runtime, "fastest_runtime": rep.get("fastest_runtime"),
            "speed_verdict": rep.get("speed_verdict"), "latency_by_runtime": rep.get("latency_by_runtime"),
            "kept_float_for_speed": sorted(floats), "speed_rule_decided_by": speed.get("decided_by"),
            "speed_rule_applied": speed.get("applied"), "kept_float": rep.get("kept_float")}
    note = f"{len(floats)} ops kept float for speed" if floats else ""
    return Entry(EDGEKILN, runtime, path, note=note, info=info), out


def chosen_runtime(report: dict[str, Any], run: Path) -> tuple[str, Path]:
    """The runtime a quantize report chose for the quantized model and the file that runs there:
    its speed verdict's runtime (else the fastest one; else onnxruntime) and ``model.onnx``, or
    the other form the report timed there (a ``.tflite`` for LiteRT).

    >>> chosen_runtime({"fastest_runtime": "openvino"}, Path("run"))
    ('openvino', PosixPath('run/model.onnx'))
    >>> rows = [{"runtime": "litert", "file": "model.tflite", "p50": 0.1}]
    >>> chosen_runtime({"speed_verdict": {"runtime": "litert"}, "latency_by_runtime": rows}, Path("run"))
    ('litert', PosixPath('run/model.tflite'))
    """
    runtime = (report.get("speed_verdict") or {}).get("runtime") or report.get("fastest_runtime") or "onnxruntime"
    row = next((r for r in report.get("latency_by_runtime") or [] if r.get("runtime") == runtime), {})
    if "file" not in row:
        return runtime, run / "model.onnx"
    found = sorted(run.rglob(row["file"])) if run.is_dir() else []
    return runtime, found[0] if found else run / row["file"]


def ort_static_preprocessed(fp32: Path, feeds: list[dict[str, np.ndarray]], work: Path) -> Entry:
    """``quant_pre_process`` (shape inference, optimization) then ``quantize_static`` defaults
    (QDQ, per-tensor, MinMax). If pre-processing fails, the row is ``quantize_static`` on the
    model as it is, and says so (what a user does next)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgekiln.execution import readable_file
    from edgekiln.quant.calibration import calibration_reader

    scratch = (work / "ort-static").resolve()   # absolute: the tools run inside it
    src = readable_file(Path(fp32).resolve(), scratch)
    pre, note = scratch / "preprocessed.onnx", ""
    try:
        with working_dir(scratch):
            quant_pre_process(str(src), str(pre))
        src = pre
    except Exception as exc:  # noqa: BLE001
        note = f"quant_pre_process failed ({one_line(exc, 90)}): quantized without it"
    out = scratch / "model.onnx"
    try:
        with working_dir(scratch):
            quantize_static(str(src), str(out), calibration_reader(feeds))
    except Exception as exc:  # noqa: BLE001
        return Entry(ORT_STATIC, "onnxruntime", error=one_line(exc), note=note)
    return Entry(ORT_STATIC, "onnxruntime", out, note=note)


def nncf_openvino(fp32: Path, feeds: list[dict[str, np.ndarray]], work: Path) -> Entry:
    """``nncf.quantize`` (defaults) on the OpenVINO model, run in OpenVINO."""
    try:
        xml = peers.nncf_openvino(fp32, feeds, work / "nncf" / "model.xml")
    except Exception as exc:  # noqa: BLE001
        return Entry(NNCF, "openvino", error=one_line(exc))
    return Entry(NNCF, "openvino", xml)


def litert_export(run: Path | None, work: Path, *, input_shapes: dict[str, tuple[int, ...]] | None,
                  measure_arena: bool) -> Entry:
    """edgekiln's ``.tflite`` export of the edgekiln int8 run folder (loaded as ``edgekiln export
    RUN --to tflite [--input-shape ...]`` loads it), run in LiteRT; with ``measure_arena`` also
    TFLite Micro's arena (reported and smallest that runs), whose failure is noted on the row
    without taking the LiteRT row away."""
    from edgekiln import api
    from edgekiln.codegen.tflite import export_tflite
    from edgekiln.codegen.tflite.tflm import tflm_arena

    if run is None:
        return Entry(LITERT, "litert", error="no edgekiln int8 model to export")
    try:
        rep = export_tflite(api.load(run, input_shapes=input_shapes), work / "tflite", measure_arena=False)
    except Exception as exc:  # noqa: BLE001
        return Entry(LITERT, "litert", error=one_line(exc))
    path = work / "tflite" / rep["artifact"]
    info: dict[str, Any] = {"tflite_bytes": rep["tflite_bytes"]}
    if measure_arena:
        try:
            arena = tflm_arena(path)
            info.update(tflm_arena_reported=arena.get("reported_bytes"), tflm_arena_smallest=arena.get("smallest_running_bytes"))
        except Exception as exc:  # noqa: BLE001
            info["tflm_error"] = one_line(exc).replace(str(path), path.name)
    return Entry(LITERT, "litert", path, note=f"TFLM failed: {info['tflm_error']}" if "tflm_error" in info else "",
                 info=info)


def c_export(run: Path | None, work: Path, *, shapes: list[str]) -> dict[str, Any]:
    """``edgekiln export RUN --to c`` (the CLI, in this process) of the edgekiln int8 run folder:
    arena/RAM/flash bytes from its report, or the last line it printed on failure. ``shapes``:
    the ``--input-shape`` arguments (:func:`benchmarks.corpus_run.shape_args`)."""
    from benchmarks.corpus_run import cli

    if run is None:
        return {"ok": False, "error": "no edgekiln int8 model to export"}
    out = work / "c"
    code, _, err = cli(["export", str(run), "--to", "c", "--out", str(out), *shapes])
    if code:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return {"ok": False, "error": (lines[-1] if lines else f"exit {code}").removeprefix("error: ").split("; supported: ")[0]}
    d = json.loads((out / "report.json").read_text())
    return {"ok": True, **{k: d.get(k) for k in ("arena_bytes", "ram_bytes", "flash_bytes", "macs")}}


def int8_weight_bytes(m: CorpusModel) -> int:
    """What the model's weights take as int8 (one byte a parameter; biases are few)."""
    return int(m.meta["params"])


def mcu_sized(m: CorpusModel) -> bool:
    """Under 1 MB of int8 weights, or named MCU-sized by issue 20 (:data:`MCU_NAMED`)."""
    return int8_weight_bytes(m) < MCU_WEIGHT_BYTES or m.entry.name in MCU_NAMED
