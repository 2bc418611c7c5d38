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

#: held-out inputs each op is checked on alone (per_op.py); a few suffice, each op sees every pixel.
PER_OP_INPUTS = 2


def export_tflite(qdq_onnx_path: str | Path | Any, out_dir: str | Path, *, eval_npz: str | Path | None = None,
                  measure_arena: bool = True, max_eval: int = 1000,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Write ``out_dir/model.tflite`` from an int8 QDQ ONNX model (a path or a ModelArtifact) and report on it.

    With ``eval_npz`` (arrays named like the model inputs, or ``x`` for one input, float32 NCHW;
    optional int labels ``y``) the model is run in LiteRT and TFLM on up to ``max_eval`` inputs and compared
    with onnxruntime and with edgekiln's integer reference, and each op is checked alone against the
    reference (``per_op``, :mod:`.per_op`). A ``.tflite`` has fixed shapes: dynamic
    input dims come from ``input_shapes``, else the ModelArtifact's, else the eval data's (batch 1).
    The TFLM arena (reported and smallest running) is measured unless ``measure_arena`` is false.
    Writes ``report.json``/``report.md`` and returns the report data (keys ``artifact``,
    ``tflite_bytes``, ``litert``, ``tflm``, ``reference``, ``per_op``, ``arena``).
    """
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
    x, y, data_shapes = _eval_data(eval_npz, src, max_eval) if eval_npz is not None else (None, None, None)
    shapes = input_shapes or (model.input_shapes if model else None) or data_shapes
    graph = load_qdq(src, shapes)
    path = write_tflite(graph, out_dir / "model.tflite")
    data: dict[str, Any] = {
        "artifact": path.name,
        "source": str(src),
        "sha256": sha256_file(path),
        "tflite_bytes": path.stat().st_size,
        "input": {"shape_nhwc": list(graph.tensors[graph.input].shape),
                  "scale": graph.tensors[graph.input].scale, "zero_point": graph.tensors[graph.input].zero_point},
        "litert": None, "tflm": None, "reference": None, "per_op": None, "arena": None,
    }
    if x is not None:
        from edgekiln.codegen.tflite.check import compare_tflite, graph_input_int8
        from edgekiln.codegen.tflite.per_op import per_op_agreement, summarize

        data.update(compare_tflite(path, src, x, y, graph=graph))
        # NOTE: each op alone on the reference's inputs tells a wrong op from compounded rounding
        runtimes = tuple(rt for rt in ("litert", "tflm") if data[rt] and "skipped" not in data[rt])
        if runtimes:
            data["per_op"] = summarize(per_op_agreement(graph, graph_input_int8(graph, [a[:PER_OP_INPUTS] for a in x]),
                                                        runtimes=runtimes, work_dir=out_dir), runtimes)
    if measure_arena:
        from edgekiln.codegen.tflite.tflm import tflm_arena

        try:
            data["arena"] = tflm_arena(path)
        except ImportError as exc:
            data["arena"] = {"skipped": f"tflite-micro not installed ({exc.name})"}
    RunFolder(out_dir).write(command="export --to tflite", model=model or load_model(src, input_shapes=shapes),
                             measurements=data,
                             markdown=_markdown(data, md_table))
    return data


def _input_names(src: Path) -> list[str]:
    import onnx

    g = onnx.load(str(src), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits]


def _eval_data(eval_npz: str | Path, src: Path, max_eval: int) -> tuple[list[Any], Any, dict[str, tuple[int, ...]]]:
    """(float inputs, one per model input; labels or None; batch-1 shapes by input name) from an
    eval ``.npz``: arrays named like the inputs, or ``x`` for a model with one input."""
    import numpy as np

    try:
        npz = np.load(eval_npz)
    except (OSError, ValueError) as exc:
        raise EdgekilnError(f"{eval_npz}: cannot read eval data ({exc})") from exc
    names = _input_names(src)
    keys = ["x"] if len(names) == 1 and "x" in npz else names
    missing = [k for k in keys if k not in npz]
    if missing:
        want = f"'x' or {names[0]!r}" if len(names) == 1 else ", ".join(repr(n) for n in names)
        raise EdgekilnError(f"{eval_npz}: no array {want} (float32 inputs in the model's layout)")
    xs = [npz[k][:max_eval] for k in keys]
    if len({len(a) for a in xs}) != 1:
        raise EdgekilnError(f"{eval_npz}: the input arrays hold different numbers of samples")
    shapes = {n: (1, *a.shape[1:]) for n, a in zip(names, xs, strict=True)}
    return xs, (npz["y"][: len(xs[0])] if "y" in npz else None), shapes


def _markdown(d: dict[str, Any], md_table: Any) -> str:
    lines = ["# TFLite export", "", f"- artifact: `{d['artifact']}` ({d['tflite_bytes']:,} B)",
             f"- source: `{d['source']}`", ""]
    rows = []
    for name in ("litert", "tflm", "reference"):
        r = d.get(name)
        if not r:
            continue
        if "skipped" in r:
            rows.append([name, r["skipped"], "", "", "", ""])
            continue
        vs = r.get("vs_reference")
        vs_cell = f"{vs['identical_fraction']:.4f} / {vs['max_abs_diff_lsb']}" if vs else "-"
        label = "edgekiln integer reference" if name == "reference" else name
        for lab, c in [(label, r)] + [(f"{name}: {o['name']}", o) for o in r.get("outputs", [])]:
            rows.append([lab, c.get("top1_agreement", "-"), c["identical_fraction"], c["max_abs_diff_lsb"],
                         ", ".join(f"{k}: {v}" for k, v in c["diff_histogram_lsb"].items()),
                         vs_cell if c is r else ""])
    if rows:
        lines += ["## Agreement with onnxruntime (QDQ model), int8 outputs", "",
                  md_table(["runtime", "top-1 agreement", "identical", "max |diff| (LSB)", "|diff| histogram",
                            "vs integer reference: identical / max LSB"], rows), "",
                  "LiteRT (XNNPACK) requantizes convolutions in float32 as onnxruntime and edgekiln's integer "
                  "reference do; TFLite Micro with gemmlowp's two roundings, 1 LSB apart from them on ~0.1-1.5% of "
                  "each convolution's outputs, and those steps compound through deep models (see the op-by-op "
                  "table).", ""]
    po = d.get("per_op")
    if po:
        rts = list(po["max_abs_diff_lsb"])
        rows = [[kind, k["n_ops"], *(f"{k[rt]['min_identical_fraction']:.4f} / {k[rt]['max_abs_diff_lsb']}" for rt in rts)]
                for kind, k in sorted(po["by_kind"].items())]
        lines += ["## Op by op against the integer reference", "",
                  f"Each of the {po['n_ops']} ops alone, fed the reference's own inputs: lowest identical share / "
                  "largest difference (LSB) per kind.", "",
                  md_table(["kind", "ops", *(f"{rt}" for rt in rts)], rows), ""]
    a = d.get("arena")
    if a and "skipped" not in a:
        lines += ["## TFLite Micro arena", "",
                  md_table(["reported (print_allocations)", "persistent", "non-persistent", "smallest running"],
                           [[a["reported_bytes"], a["persistent_bytes"], a["nonpersistent_bytes"],
                             a["smallest_running_bytes"]]]), ""]
    return "\n".join(lines)
