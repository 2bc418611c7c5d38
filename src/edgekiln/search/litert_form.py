"""LiteRT as a runtime of the search: an int8 trial is also timed as edgekiln's own ``.tflite``.

``edgekiln quantize`` lets LiteRT (XNNPACK) compete with onnxruntime and OpenVINO for the fastest
deployable form of an int8 model (:mod:`edgekiln.codegen.tflite.candidate`); the search must see the
same runtimes, or it reports "no int8 model is faster than FP32" where the ``.tflite`` is (CREPE-tiny:
int8 on LiteRT 0.76 ms, FP32 on onnxruntime 1.03 ms, every ONNX int8 runtime slower than FP32).

A trial's row for LiteRT carries the ``.tflite`` it timed (``file``): the metric of a candidate
deployed to LiteRT is measured on that file (:func:`evaluation_file`), and
``edgekiln export RUN --to tflite`` writes it again from the selected model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekiln.execution.specs import TensorSpec

LITERT = "litert"
#: the model kinds LiteRT competes for: int8 QDQ ONNX (the .tflite writer's input)
KINDS = ("onnx-qdq",)


def tflite_form(model_path: Path, kind: str | None, work_dir: Path, inputs: Sequence[TensorSpec]) -> dict[str, Any] | None:
    """``{"path": model.tflite}`` written under ``work_dir/litert`` and checked against the ONNX model on
    random ``inputs`` (the intake's resolved specs), ``{"error": why}``, or None when LiteRT does not
    compete for this kind of model or is not installed."""
    from edgekiln.codegen.tflite.candidate import litert_candidate
    from edgekiln.execution.feeds import random_feeds
    from edgekiln.execution.runtimes import available_runtimes

    if kind not in KINDS or available_runtimes().get(LITERT):
        return None
    return litert_candidate(model_path, work_dir / LITERT, random_feeds(inputs), {i.name: i.shape for i in inputs})


def timing_call(tflite: str | Path, inputs: Sequence[TensorSpec]) -> Callable[[], Any]:
    """One inference of ``tflite`` on LiteRT (1 thread) with its input in its own int8 NHWC form,
    converted once beforehand from random float ``inputs``, as ``edgekiln quantize`` times it."""
    from edgekiln.execution.feeds import random_feeds
    from edgekiln.execution.runtimes import load_session

    sess = load_session(tflite, LITERT, threads=1)
    feed = dict(zip(sess.input_names, random_feeds(inputs).values(), strict=True))
    native = sess.native_feeds(feed) if hasattr(sess, "native_feeds") else feed
    sess.run(native)
    return lambda: sess.run(native)


def timed_row(form: dict[str, Any], inputs: Sequence[TensorSpec], *, runs: int, warmup: int) -> dict[str, Any]:
    """The candidate's LiteRT row: p50/p90 of the ``.tflite`` (``file``), or why it has none."""
    from edgekiln.execution.timing import latency_stats, time_round_robin

    if "path" not in form:
        return {"runtime": LITERT, "skipped": f"no .tflite: {form.get('error', '?')}"}
    try:
        call = timing_call(form["path"], inputs)
        stats = latency_stats(time_round_robin({LITERT: call}, rounds=runs, warmup=warmup)[LITERT])
    except Exception as exc:  # noqa: BLE001 - a runtime refusing a model only drops its row
        return {"runtime": LITERT, "skipped": f"{type(exc).__name__}: {exc}"[:200]}
    return {"runtime": LITERT, "p50_ms": float(stats["p50"]), "p90_ms": float(stats["p90"]),
            "file": str(form["path"])}


def with_litert(rows: list[dict[str, Any]], row: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``rows`` (a candidate's runtimes) with LiteRT's row replacing the "does not run .onnx files" one,
    fastest first."""
    if row is None:
        return rows
    out = [r for r in rows if r["runtime"] != LITERT] + [row]
    return sorted(out, key=lambda r: r.get("p50_ms", float("inf")))


def evaluation_file(runtimes: list[dict[str, Any]], runtime: str, artifact: str) -> str:
    """The file a candidate deployed to ``runtime`` runs: its ``.tflite`` for LiteRT, else the artifact."""
    return next((str(r["file"]) for r in runtimes if r["runtime"] == runtime and r.get("file")), artifact)
