"""Run an int8 ``.tflite`` in LiteRT and in TFLite Micro and compare with onnxruntime on the QDQ model.

Layout convention (the writer's): rank-4 tensors are NHWC in the ``.tflite`` and NCHW in ONNX
and in eval ``.npz`` files, so rank-4 inputs are transposed NCHW -> NHWC before they are fed and
rank-4 outputs NHWC -> NCHW after. Inputs are quantized with the ``.tflite`` input tensor's scale
and zero point (the same parameters as the QDQ model's input QuantizeLinear); onnxruntime's float
output is mapped back onto the int8 grid of the ``.tflite`` output tensor, which is exact because
the QDQ graph ends in a DequantizeLinear with those same parameters.

Integer differences are counted in LSB of the output scale. TFLM is the integer reference: LiteRT
(with its default XNNPACK delegate) may differ from it by 1 LSB on a few per-channel outputs.

>>> rep = compare_tflite("model.tflite", "model_qdq.onnx", x)  # doctest: +SKIP
>>> rep["tflm"]["top1_agreement"], rep["tflm"]["max_abs_diff_lsb"]  # doctest: +SKIP
(1.0, 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError


def _nchw_to_tflite(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.ndim == 4:  # always, by the writer's convention (a C == H == W input looks the same both ways)
        x = x.transpose(0, 2, 3, 1)
    if tuple(x.shape) != tuple(shape):
        raise EdgekilnError(f"eval input shape {x.shape} does not match the .tflite input {tuple(shape)}")
    return x


def _tflite_to_nchw(y: np.ndarray) -> np.ndarray:
    return y.transpose(0, 3, 1, 2) if y.ndim == 4 else y


def quantize_for(x: np.ndarray, scale: float, zero_point: int, dtype: Any = np.int8) -> np.ndarray:
    """Quantize float ``x`` as ONNX QuantizeLinear does: round half to even, then saturate."""
    info = np.iinfo(dtype)
    q = np.rint(x.astype(np.float64) / np.float64(np.float32(scale))) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


#: float inputs: one (N, ...) array in ONNX layout, or one per model input in the model's order.
Batch = np.ndarray | list[np.ndarray]


def _as_list(x: Batch) -> list[np.ndarray]:
    return [np.asarray(a, np.float32) for a in x] if isinstance(x, list | tuple) else [np.asarray(x, np.float32)]


def _quantize_inputs(x: Batch, dets: list[dict[str, Any]]) -> list[np.ndarray]:
    """Float NCHW batches -> int8 batches in the .tflite's layout (each sample batch-1 shaped), per input."""
    xs = _as_list(x)
    if len(xs) != len(dets):
        raise EdgekilnError(f"the .tflite has {len(dets)} inputs, {len(xs)} input arrays were given")
    out = []
    for a, det in zip(xs, dets, strict=True):
        shape = tuple(int(s) for s in det["shape"])
        out.append(np.stack([quantize_for(_nchw_to_tflite(a[i: i + 1], shape), det["scale"], det["zero_point"],
                                          det["dtype"]) for i in range(a.shape[0])]))
    return out


def _qparams(scales: Any, zero_points: Any) -> dict[str, Any]:
    return {"scale": float(np.atleast_1d(scales)[0]), "zero_point": int(np.atleast_1d(zero_points)[0])}


def _litert(tflite_path: str | Path, threads: int) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(tflite_path), num_threads=threads)
    it.allocate_tensors()
    ins = [{"shape": d["shape"], "dtype": d["dtype"], "index": d["index"], **_qparams(*d["quantization"])}
           for d in it.get_input_details()]
    outs = [{"index": d["index"], **_qparams(*d["quantization"])} for d in it.get_output_details()]
    return it, ins, outs


def _tflm(tflite_path: str | Path, arena_size: int | None) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    from tflite_micro.python.tflite_micro import runtime

    data = Path(tflite_path).read_bytes()
    model = runtime.convert_bytearray_to_object(bytearray(data))
    sg = model.subgraphs[0]
    # NOTE: a generous arena on purpose (every non-constant tensor, live or not, plus room for TFLM's
    # own allocations); the arena *size* is measured separately, in child processes, by
    # edgekiln.codegen.tflite.tflm.tflm_arena (a too-small arena can crash the process).
    width = {0: 4, 2: 4, 3: 1, 7: 2, 9: 1}  # TensorType FLOAT32, INT32, UINT8, INT16, INT8; else 8
    activations = sum(int(np.prod(t.shape if t.shape is not None else [1])) * width.get(t.type, 8)
                      for t in sg.tensors if not (model.buffers[t.buffer].data is not None
                                                  and len(model.buffers[t.buffer].data)))
    it = runtime.Interpreter.from_bytes(data, arena_size=arena_size or max(1 << 20, 10 * len(data),
                                                                           2 * activations + (1 << 20)))
    ins = []
    for i in range(len(sg.inputs)):
        d = it.get_input_details(i)
        q = d["quantization_parameters"]
        ins.append({"shape": d["shape"], "dtype": d["dtype"], "index": i, **_qparams(q["scales"], q["zero_points"])})
    outs = []
    for i in range(len(sg.outputs)):
        q = it.get_output_details(i)["quantization_parameters"]
        outs.append({"index": i, **_qparams(q["scales"], q["zero_points"])})
    return it, ins, outs


def _per_input(xq: np.ndarray | list[np.ndarray], n_inputs: int) -> list[np.ndarray]:
    xs = list(xq) if isinstance(xq, list | tuple) else [xq]
    if len(xs) != n_inputs:
        raise EdgekilnError(f"the .tflite has {n_inputs} inputs, {len(xs)} input batches were given")
    return xs


def run_litert_int8(tflite_path: str | Path, xq: np.ndarray | list[np.ndarray], *,
                    threads: int = 1) -> list[np.ndarray]:
    """Run pre-quantized inputs ``xq`` (N, *tflite input shape), or one such batch per input, in
    LiteRT; one (N, *shape) array per output, in .tflite layout and output order."""
    it, ins, outd = _litert(tflite_path, threads)
    xs = _per_input(xq, len(ins))
    outs: list[list[np.ndarray]] = [[] for _ in outd]
    for n in range(len(xs[0])):
        for d, x in zip(ins, xs, strict=True):
            it.set_tensor(d["index"], np.ascontiguousarray(x[n]))
        it.invoke()
        for acc, d in zip(outs, outd, strict=True):
            acc.append(it.get_tensor(d["index"]).copy())
    return [np.stack(o) for o in outs]


def run_tflm_int8(tflite_path: str | Path, xq: np.ndarray | list[np.ndarray], *,
                  arena_size: int | None = None) -> list[np.ndarray]:
    """Run pre-quantized inputs in TFLM; like :func:`run_litert_int8`."""
    it, ins, outd = _tflm(tflite_path, arena_size)
    xs = _per_input(xq, len(ins))
    outs: list[list[np.ndarray]] = [[] for _ in outd]
    for n in range(len(xs[0])):
        for i, x in enumerate(xs):
            it.set_input(np.ascontiguousarray(x[n]), i)
        it.invoke()
        for acc, d in zip(outs, outd, strict=True):
            acc.append(np.array(it.get_output(d["index"]), copy=True))
    return [np.stack(o) for o in outs]


def _to_batch(y: np.ndarray) -> np.ndarray:
    """(N, 1, ...) per-sample outputs -> (N, ...) in ONNX layout."""
    return np.concatenate([_tflite_to_nchw(s) for s in y], axis=0)


def _qp(outd: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"scale": d["scale"], "zero_point": d["zero_point"]} for d in outd]


def run_litert(tflite_path: str | Path, x: Batch, *,
               threads: int = 1) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Run float NCHW ``x`` (batch N; one array per input) one sample at a time in LiteRT; int8
    outputs (ONNX layout) and their qparams, one per output."""
    _, ins, outd = _litert(tflite_path, threads)
    ys = run_litert_int8(tflite_path, _quantize_inputs(x, ins), threads=threads)
    return [_to_batch(y) for y in ys], _qp(outd)


def run_tflm(tflite_path: str | Path, x: Batch, *,
             arena_size: int | None = None) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Run float NCHW ``x`` in TFLite Micro's Python interpreter; like :func:`run_litert`."""
    _, ins, outd = _tflm(tflite_path, arena_size)
    ys = run_tflm_int8(tflite_path, _quantize_inputs(x, ins), arena_size=arena_size)
    return [_to_batch(y) for y in ys], _qp(outd)


def run_ort_int8(qdq_onnx_path: str | Path, x: Batch, out_q: list[dict[str, Any]]) -> list[np.ndarray]:
    """onnxruntime on the QDQ model (1 thread), each float output put back on its int8 output grid."""
    from edgekiln.quant.float_pairs import integer_session

    sess = integer_session(qdq_onnx_path)   # NOTE: as the integer graph implements it (quant/float_pairs.py)
    xs = _as_list(x)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(xs):
        raise EdgekilnError(f"{qdq_onnx_path}: {len(names)} inputs, {len(xs)} input arrays were given")
    runs = [sess.run(None, {n: a[i: i + 1] for n, a in zip(names, xs, strict=True)}) for i in range(len(xs[0]))]
    if len(runs[0]) != len(out_q):
        raise EdgekilnError(f"{qdq_onnx_path}: {len(runs[0])} outputs, the .tflite has {len(out_q)}")
    return [quantize_for(np.concatenate([r[k] for r in runs]), q["scale"], q["zero_point"])
            for k, q in enumerate(out_q)]


def compare_int8(y: np.ndarray, ref: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement (last axis) and the histogram of ``|y - ref|`` in LSB."""
    if y.shape != ref.shape:
        raise EdgekilnError(f"output shapes differ: {y.shape} vs reference {ref.shape}")
    diff = np.abs(y.astype(np.int32) - ref.astype(np.int32)).ravel()
    values, counts = np.unique(diff, return_counts=True)
    out: dict[str, Any] = {
        "n_inputs": int(y.shape[0]),
        "n_outputs": int(diff.size),
        "identical_fraction": float(np.mean(diff == 0)),
        "max_abs_diff_lsb": int(diff.max(initial=0)),
        "diff_histogram_lsb": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
    }
    if y.ndim == 2:
        flat_y, flat_r = y.reshape(len(y), -1), ref.reshape(len(ref), -1)
        agree = flat_y.argmax(1) == flat_r.argmax(1)
        out["top1_agreement"] = float(np.mean(agree))
        # NOTE: with every output within 1 LSB, the top-1 can only flip where the reference's
        # top-2 margin is <= 2 LSB; agreement on the other inputs is the meaningful check.
        top2 = np.sort(flat_r.astype(np.int32), axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2
        out["top1_clear_margin_inputs"] = int(clear.sum())
        out["top1_agreement_clear_margin"] = float(np.mean(agree[clear])) if clear.any() else 1.0
        if labels is not None and np.issubdtype(np.asarray(labels).dtype, np.integer):
            out["accuracy"] = float(np.mean(flat_y.argmax(1) == np.asarray(labels).ravel()[: len(y)]))
    return out


def compare_outputs(ys: list[np.ndarray], refs: list[np.ndarray], labels: np.ndarray | None = None,
                    names: list[str] | None = None) -> dict[str, Any]:
    """:func:`compare_int8` over several outputs: the counts over all of them, plus ``outputs``
    (one comparison per output, named) when there is more than one."""
    if len(ys) == 1:
        return compare_int8(ys[0], refs[0], labels)
    per = [compare_int8(y, r) for y, r in zip(ys, refs, strict=True)]
    diff = np.concatenate([np.abs(y.astype(np.int32) - r.astype(np.int32)).ravel() for y, r in zip(ys, refs, strict=True)])
    values, counts = np.unique(diff, return_counts=True)
    return {
        "n_inputs": int(ys[0].shape[0]),
        "n_outputs": int(diff.size),
        "identical_fraction": float(np.mean(diff == 0)),
        "max_abs_diff_lsb": int(diff.max(initial=0)),
        "diff_histogram_lsb": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "outputs": [{"name": n, **c} for n, c in zip(names or [f"output{i}" for i in range(len(ys))], per,
                                                     strict=True)],
    }


def graph_input_int8(graph: Any, x: Batch) -> list[np.ndarray]:
    """Float NCHW batches (one per graph input) -> (N, *input shape) int8 in the IR's (and the
    .tflite's) layout, one per graph input."""
    xs = _as_list(x)
    names = graph.inputs
    if len(xs) != len(names):
        raise EdgekilnError(f"the model has {len(names)} inputs, {len(xs)} input arrays were given")
    out = []
    for a, name in zip(xs, names, strict=True):
        t = graph.tensors[name]
        out.append(np.stack([quantize_for(_nchw_to_tflite(a[i: i + 1], t.shape), t.scale, t.zero_point)
                             for i in range(a.shape[0])]))
    return out


def reference_values(graph: Any, xq: np.ndarray | list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every tensor of the integer reference run (``codegen/reference.py``), per sample; ``xq`` is
    one (N, *input shape) int8 batch in C layout per graph input."""
    from edgekiln.codegen import reference

    xs = _per_input(xq, len(graph.inputs))
    runs = []
    for n in range(len(xs[0])):
        values = {name: np.asarray(a[n], np.int8).reshape(graph.tensors[name].shape)
                  for name, a in zip(graph.inputs, xs, strict=True)}
        for op in graph.ops:
            values[op.output] = reference.run_op(op, [values[i] for i in op.inputs]).reshape(
                graph.tensors[op.output].shape)
        runs.append(values)
    return runs


def reference_outputs(graph: Any, x: Batch) -> list[np.ndarray]:
    """edgekiln's integer reference on float NCHW ``x``: one int8 array per graph output, in ONNX
    layout, batch first."""
    runs = reference_values(graph, graph_input_int8(graph, x))
    return [np.concatenate([_tflite_to_nchw(v[o]) for v in runs])
            for o in graph.outputs]


def compare_tflite(tflite_path: str | Path, qdq_onnx_path: str | Path, x: Batch,
                   labels: np.ndarray | None = None, *, runtimes: tuple[str, ...] = ("litert", "tflm"),
                   graph: Any = None) -> dict:
    """Run ``x`` through each runtime and compare with onnxruntime; returns ``{runtime: comparison}``.

    A runtime that cannot be imported is reported as ``{"skipped": reason}`` instead of failing.
    With several outputs the comparison counts all of them and lists each under ``outputs``. Given
    the ``graph`` (the IntGraph the .tflite was written from), each runtime is also compared with
    edgekiln's integer reference (``vs_reference``), and the reference with onnxruntime
    (``reference``): a writer bug shows against the reference, a rounding-mode difference against
    onnxruntime.
    """
    x = _as_list(x)
    runners = {"litert": run_litert, "tflm": run_tflm}
    result: dict[str, Any] = {}
    refs: list[np.ndarray] | None = None
    names = _onnx_output_names(qdq_onnx_path)
    ints = reference_outputs(graph, x) if graph is not None else None
    for name in runtimes:
        try:
            ys, out_q = runners[name](tflite_path, x)
        except ImportError as exc:
            result[name] = {"skipped": f"{name} not installed ({exc.name})"}
            continue
        if refs is None:
            refs = run_ort_int8(qdq_onnx_path, x, out_q)
            if ints is not None:
                result["reference"] = _brief(compare_outputs(ints, refs, names=names))
        cmp = compare_outputs(ys, refs, labels, names=names)
        if "accuracy" in cmp:
            cmp["onnxruntime_accuracy"] = float(np.mean(refs[0].reshape(len(refs[0]), -1).argmax(1)
                                                        == np.asarray(labels).ravel()[: len(refs[0])]))
        if ints is not None:
            cmp["vs_reference"] = _brief(compare_outputs(ys, ints, names=names))
        result[name] = cmp
    return result


def _brief(cmp: dict[str, Any]) -> dict[str, Any]:
    return {k: cmp[k] for k in ("identical_fraction", "max_abs_diff_lsb", "diff_histogram_lsb")}


def _onnx_output_names(path: str | Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
