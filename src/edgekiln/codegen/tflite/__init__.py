"""int8 ``.tflite`` export from edgekiln's integer graph, checked in LiteRT and TFLite Micro.

Data flow: QDQ ONNX -> :func:`edgekiln.codegen.ir.load_qdq` (the C backend's integer IR, NHWC)
-> :mod:`.writer` (TFLite ops and tensors) -> :mod:`.schema` (flatbuffer bytes) -> ``model.tflite``;
then :mod:`.check` runs it in LiteRT and TFLM against onnxruntime, and
:func:`.tflm.tflm_arena` measures TFLM's arena.

>>> rep = export_tflite("model_qdq.onnx", "out/", eval_npz="eval.npz")  # doctest: +SKIP
>>> rep["tflm"]["max_abs_diff_lsb"] <= 1                                # doctest: +SKIP
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError

__all__ = ["export_tflite"]


def export_tflite(qdq_onnx_path: str | Path | Any, out_dir: str | Path, *, eval_npz: str | Path | None = None,
                  measure_arena: bool = True, max_eval: int = 1000) -> dict[str, Any]:
    """Write ``out_dir/model.tflite`` from an int8 QDQ ONNX model (a path or a ModelArtifact) and report on it.

    With ``eval_npz`` (array ``x``, float32 NCHW; optional int labels ``y``) the model is run in
    LiteRT and TFLM on up to ``max_eval`` inputs and compared with onnxruntime. The TFLM arena
    (reported and smallest running) is measured unless ``measure_arena`` is false. Writes
    ``report.json``/``report.md`` and returns the report data (keys ``artifact``,
    ``tflite_bytes``, ``litert``, ``tflm``, ``arena``).
    """
    import numpy as np

    from edgekiln.codegen.ir import load_qdq
    from edgekiln.codegen.tflite.writer import write_tflite
    from edgekiln.fileio import sha256_file
    from edgekiln.models.artifact import ModelArtifact
    from edgekiln.models.intake import load_model
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.report import md_table

    model = qdq_onnx_path if isinstance(qdq_onnx_path, ModelArtifact) else None
    src = Path(model.path if model else qdq_onnx_path)
    if not src.is_file():
        raise EdgekilnError(f"{src}: no such ONNX file")
    out_dir = Path(out_dir)
    graph = load_qdq(src)
    path = write_tflite(graph, out_dir / "model.tflite")
    data: dict[str, Any] = {
        "artifact": path.name,
        "source": str(src),
        "sha256": sha256_file(path),
        "tflite_bytes": path.stat().st_size,
        "input": {"shape_nhwc": list(graph.tensors[graph.input].shape),
                  "scale": graph.tensors[graph.input].scale, "zero_point": graph.tensors[graph.input].zero_point},
        "litert": None, "tflm": None, "arena": None,
    }
    if eval_npz is not None:
        from edgekiln.codegen.tflite.check import compare_tflite

        try:
            npz = np.load(eval_npz)
        except (OSError, ValueError) as exc:
            raise EdgekilnError(f"{eval_npz}: cannot read eval data ({exc})") from exc
        if "x" not in npz:
            raise EdgekilnError(f"{eval_npz}: no array 'x' (float32 inputs in the model's layout)")
        x = npz["x"][:max_eval]
        y = npz["y"][: len(x)] if "y" in npz else None
        data.update(compare_tflite(path, src, x, y))
    if measure_arena:
        from edgekiln.codegen.tflite.tflm import tflm_arena

        try:
            data["arena"] = tflm_arena(path)
        except ImportError as exc:
            data["arena"] = {"skipped": f"tflite-micro not installed ({exc.name})"}
    RunFolder(out_dir).write(command="export --to tflite", model=model or load_model(src), measurements=data,
                             markdown=_markdown(data, md_table))
    return data


def _markdown(d: dict[str, Any], md_table: Any) -> str:
    lines = ["# TFLite export", "", f"- artifact: `{d['artifact']}` ({d['tflite_bytes']:,} B)",
             f"- source: `{d['source']}`", ""]
    rows = []
    for name in ("litert", "tflm"):
        r = d.get(name)
        if not r:
            continue
        if "skipped" in r:
            rows.append([name, r["skipped"], "", "", ""])
            continue
        rows.append([name, r.get("top1_agreement", "-"), r["identical_fraction"], r["max_abs_diff_lsb"],
                     ", ".join(f"{k}: {v}" for k, v in r["diff_histogram_lsb"].items())])
    if rows:
        lines += ["## Agreement with onnxruntime (QDQ model), int8 outputs", "",
                  md_table(["runtime", "top-1 agreement", "identical", "max |diff| (LSB)", "|diff| histogram"],
                           rows), "",
                  "TFLite Micro is the integer reference; its gemmlowp-style double rounding may differ from "
                  "onnxruntime by 1 LSB on a few outputs per layer.", ""]
    a = d.get("arena")
    if a and "skipped" not in a:
        lines += ["## TFLite Micro arena", "",
                  md_table(["reported (print_allocations)", "persistent", "non-persistent", "smallest running"],
                           [[a["reported_bytes"], a["persistent_bytes"], a["nonpersistent_bytes"],
                             a["smallest_running_bytes"]]]), ""]
    return "\n".join(lines)
