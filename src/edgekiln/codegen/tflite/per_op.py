"""Each op of an exported model alone in LiteRT and TFLite Micro, fed the integer reference's own
inputs for it, against the reference's output: where a whole-model difference starts.

Through a deep model the runtimes' 1-LSB rounding differences compound (TFLite Micro requantizes
with two roundings, the reference and onnxruntime with one), so a whole-model comparison cannot
tell a writer bug from accumulated rounding. One op at a time it can: every op written correctly
stays within 1 LSB of :mod:`edgekiln.codegen.reference` (most are identical; table lookups and
data movement are exact), whatever the depth.

>>> rows = per_op_agreement(graph, xq)          # doctest: +SKIP
>>> max(r["tflm"]["max_abs_diff_lsb"] for r in rows)  # doctest: +SKIP
1
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.codegen.ir import IntGraph


def per_op_agreement(graph: IntGraph, xq: np.ndarray | list[np.ndarray], *, runtimes: tuple[str, ...] = ("litert", "tflm"),
                     work_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per op: ``{"op", "kind", <runtime>: {"identical_fraction", "max_abs_diff_lsb"}}``.

    Each op is written as its own ``.tflite`` (its operands are the inputs) and run on the
    reference's values of its operands for every sample of ``xq`` (one int8 batch in C layout per
    graph input, :func:`~edgekiln.codegen.tflite.check.graph_input_int8`). An op reading one tensor twice
    is skipped (a ``.tflite`` cannot list an input twice), and so is a ``constant`` (nothing to run).
    """
    from edgekiln.codegen.tflite.check import reference_values, run_litert_int8, run_tflm_int8
    from edgekiln.codegen.tflite.writer import to_tflite_bytes

    runners = {"litert": run_litert_int8, "tflm": run_tflm_int8}
    values = reference_values(graph, xq)
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for i, op in enumerate(graph.ops):
            if len(set(op.inputs)) != len(op.inputs) or not op.inputs:  # a constant has no op to run
                continue
            one = IntGraph(tensors=graph.tensors, ops=[op], input=op.inputs[0], output=op.output,
                           onnx_input_name="x", onnx_input_shape=(), onnx_output_shape=())
            path = Path(tmp) / f"op{i}.tflite"
            path.write_bytes(to_tflite_bytes(one, inputs=list(op.inputs)))
            ins = [np.stack([v[n] for v in values]) for n in op.inputs]
            ref = np.stack([v[op.output] for v in values]).astype(np.int32)
            row: dict[str, Any] = {"op": op.name, "kind": op.kind}
            for rt in runtimes:
                y = runners[rt](path, ins)[0].astype(np.int32).reshape(ref.shape)
                d = np.abs(y - ref)
                row[rt] = {"identical_fraction": float(np.mean(d == 0)), "max_abs_diff_lsb": int(d.max(initial=0))}
            rows.append(row)
    return rows



def summarize(rows: list[dict[str, Any]], runtimes: tuple[str, ...] = ("litert", "tflm")) -> dict[str, Any]:
    """Per op kind and runtime: how many ops, the lowest identical share and the largest difference.

    >>> summarize([{"op": "c1", "kind": "conv2d", "tflm": {"identical_fraction": 0.99, "max_abs_diff_lsb": 1}}],
    ...           ("tflm",))
    {'n_ops': 1, 'max_abs_diff_lsb': {'tflm': 1}, 'by_kind': {'conv2d': {'n_ops': 1, 'tflm': {'min_identical_fraction': 0.99, 'max_abs_diff_lsb': 1}}}}
    """
    by_kind: dict[str, Any] = {}
    for row in rows:
        k = by_kind.setdefault(row["kind"], {"n_ops": 0})
        k["n_ops"] += 1
        for rt in runtimes:
            r = row[rt]
            w = k.setdefault(rt, {"min_identical_fraction": 1.0, "max_abs_diff_lsb": 0})
            w["min_identical_fraction"] = min(w["min_identical_fraction"], r["identical_fraction"])
            w["max_abs_diff_lsb"] = max(w["max_abs_diff_lsb"], r["max_abs_diff_lsb"])
    return {"n_ops": len(rows),
            "max_abs_diff_lsb": {rt: max((row[rt]["max_abs_diff_lsb"] for row in rows), default=0) for rt in runtimes},
            "by_kind": by_kind}
