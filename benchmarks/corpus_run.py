"""Run the edgekiln CLI on corpus models the way a user would, and measure int8 against FP32.

:func:`check` runs ``inspect``, ``fits``, ``bench`` and ``quantize --scheme int8 --calib`` in this
process through the real entry point and returns, per command, the exit code, the time and the
last error line; then the int8 model's SQNR against the FP32 model on the held-out inputs,
``20 * log10(|y| / |y - y_q|)`` over every element of each output (the lowest output counts).

>>> shape_args(CORPUS["vad_gru"])
['--input-shape', 'features=1,100,40']
>>> round(sqnr_db([np.array([1.0, 2.0])], [np.array([1.0, 2.1])]), 1)
27.0
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.testing.corpus import CORPUS, CorpusEntry, CorpusModel, ensure

COMMANDS = ("inspect", "fits", "bench", "quantize")
FITS_TARGET = "raspberry-pi-4"


def shape_args(entry: CorpusEntry) -> list[str]:
    """``--input-shape NAME=d0,d1,...`` for each dynamic input (the repeatable form)."""
    args: list[str] = []
    for name, dims in entry.input_shapes.items():
        args += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
    return args


def cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``edgekiln ARGV`` in this process; (exit code, stdout, stderr)."""
    from edgekiln.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


# NOTE: `make test` runs every small model through the CLI in one int8 form (the speed rule on, int8
# activations): the forms and their timing are tested on MobileNetV3-S and tiny models; timing three
# forms on two runtimes for each of 15 models would double the test's time.
PINNED_FORM = ("--speed-rule", "on", "--activations", "int8")


def argv_for(command: str, m: CorpusModel, work: Path, *, runs: int = 10, pinned: bool = False) -> list[str]:
    model, shapes = str(m.path), shape_args(m.entry)
    if command == "inspect":
        return ["inspect", model, *shapes, "--json"]
    if command == "fits":
        return ["fits", model, "--target", FITS_TARGET, *shapes, "--json"]
    if command == "bench":
        return ["bench", model, *shapes, "--runs", str(runs), "--warmup", "2", "--json"]
    return ["quantize", model, "--scheme", "int8", "--calib", str(m.calib), *shapes,
            "--bench-runs", str(runs), *(PINNED_FORM if pinned else ()), "--out", str(work / "int8")]


def model_ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


def is_op_refusal(stderr: str, ops: set[str]) -> bool:
    """A refusal the issue accepts: one line that says something is not supported and names an op
    type of the model. An error that merely mentions an op (a shape-inference failure at a Reshape)
    is not one.

    >>> is_op_refusal("error: Loop is not supported by the C backend", {"Loop", "Add"})
    True
    >>> is_op_refusal("error: invalid ONNX model: (op_type:Reshape) Invalid Target shape", {"Reshape"})
    False
    """
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return (len(lines) == 1 and "internal error" not in lines[0] and re.search(r"support", lines[0], re.I) is not None
            and any(re.search(rf"\b{re.escape(op)}\b", lines[0]) for op in ops))


def run_outputs(path: Path | str, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of the model over every sample of ``data`` (one sample a run), concatenated."""
    from edgekiln.execution.ort import ort_session

    sess = ort_session(Path(path))
    names = [i.name for i in sess.get_inputs()]
    n = len(next(iter(data.values())))
    runs = [sess.run(None, {k: data[k][i:i + 1] for k in names}) for i in range(n)]
    return [np.concatenate([np.asarray(r[j], np.float64).ravel() for r in runs]) for j in range(len(runs[0]))]


def sqnr_db(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The lowest per-output SQNR in dB (inf when identical)."""
    worst = np.inf
    for y, q in zip(ref, got, strict=True):
        noise = float(np.linalg.norm(y - q))
        worst = min(worst, np.inf if noise == 0 else 20 * np.log10(float(np.linalg.norm(y)) / noise))
    return float(worst)


def check(name: str, work: Path, *, runs: int = 10, pinned: bool = False) -> dict[str, Any]:
    """Build (or read from the cache) corpus model ``name``, run the four commands, measure SQNR
    (``pinned``: quantize in one int8 form, :data:`PINNED_FORM`)."""
    from edgekiln.models.metrics import load_npz

    m = ensure(name)
    ops = model_ops(m.path)
    result: dict[str, Any] = {"name": name, "category": m.entry.category, "params": m.meta["params"]}
    for command in COMMANDS:
        t0 = time.perf_counter()
        code, _, err = cli(argv_for(command, m, work, runs=runs, pinned=pinned))
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        result[command] = {"code": code, "seconds": round(time.perf_counter() - t0, 2),
                           "error": lines[-1] if code else "", "error_lines": len(lines),
                           "op_refusal": bool(code) and is_op_refusal(err, ops)}
    q = work / "int8" / "model.onnx"
    if result["quantize"]["code"] == 0 and q.is_file():
        data = load_npz(m.eval)
        result["sqnr_db"] = round(sqnr_db(run_outputs(m.path, data), run_outputs(q, data)), 2)
    return result


def accepted(command: str, step: dict[str, Any]) -> bool:
    """Success, a one-line refusal naming an op, or for ``fits`` its "does not fit" (exit 3)."""
    return step["code"] == 0 or step["op_refusal"] or (command == "fits" and step["code"] == 3)


def names(*, small: bool | None = None) -> list[str]:
    return [n for n, e in CORPUS.items() if small is None or e.small == small]
