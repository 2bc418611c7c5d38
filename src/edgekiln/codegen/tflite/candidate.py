"""The int8 model as a LiteRT candidate: `quantize` writes it as ``.tflite`` (edgekiln's own writer,
no TensorFlow) so LiteRT with XNNPACK competes with onnxruntime and OpenVINO for the fastest
deployable form (issue 20: on small CNNs XNNPACK's int8 kernels often win).

A candidate is only offered when LiteRT is installed, the writer covers every op, and LiteRT's
output agrees with the ONNX int8 model on a sample (it computes the same integer graph; rounding
differs by an LSB here and there), so a fast but wrong file is never reported as the winner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_AGREEMENT_DB = 20.0   # LiteRT vs onnxruntime on the same int8 model; 1-LSB differences give > 30 dB


def litert_candidate(qdq_path: str | Path, out_dir: str | Path, feed: Mapping[str, np.ndarray],
                     input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Write ``out_dir/model.tflite`` from the int8 QDQ model and check it on ``feed``:
    ``{"path": ...}`` when it is a valid candidate, else ``{"error": one line}``."""
    from edgekiln.codegen.ir import load_qdq
    from edgekiln.codegen.tflite.writer import write_tflite
    from edgekiln.execution.ort import error_line
    from edgekiln.execution.runtimes import available_runtimes, load_session
    from edgekiln.quant.float_pairs import integer_session

    reason = available_runtimes().get("litert")
    if reason:
        return {"error": reason}
    try:
        graph = load_qdq(Path(qdq_path), dict(input_shapes) if input_shapes else None)
        path = write_tflite(graph, Path(out_dir) / "model.tflite", float_islands=True)
        lite = load_session(path, "litert", threads=1)
        if len(lite.input_names) != len(feed):
            return {"error": f"the .tflite has {len(lite.input_names)} inputs, the model {len(feed)}"}
        got = lite.run_as_onnx(dict(zip(lite.input_names, feed.values(), strict=True)))
    except Exception as exc:  # noqa: BLE001 - an op the writer lacks or LiteRT refuses: not a candidate
        return {"error": error_line(exc, 200)}
    want = integer_session(qdq_path).run(None, dict(feed))
    worst = _agreement_db(want, got)
    if worst is None:
        return {"error": f"output shapes differ from the ONNX model's ({[w.shape for w in want]} vs "
                         f"{[g.shape for g in got]})"}
    if worst < MIN_AGREEMENT_DB:
        return {"error": f"LiteRT's output differs from the ONNX int8 model's (SQNR {worst:.1f} dB < "
                         f"{MIN_AGREEMENT_DB:.0f} dB)"}
    return {"path": path, "agreement_db": worst}


def _agreement_db(want: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float | None:
    """Lowest SQNR of the outputs, matched in order (``got`` in ONNX layout, as
    ``LiteRTSession.run_as_onnx`` gives it); None when the shapes do not match.

    >>> a = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    >>> _agreement_db([a], [a]) == float("inf"), _agreement_db([a], [a[:, :1]])
    (True, None)
    """
    from edgekiln.quant.speed import sqnr_of

    if len(want) != len(got) or any(np.shape(w) != np.shape(g) for w, g in zip(want, got, strict=True)):
        return None
    return sqnr_of([want], [got])
