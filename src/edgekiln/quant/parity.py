"""Where a runtime's execution of a quantized model parts from its simulated semantics.

The reference is the QDQ model run by onnxruntime with every graph optimization off: each
QuantizeLinear/DequantizeLinear pair is evaluated in float, exactly what fake-quant simulation
means. A runtime under test fuses Q/DQ into integer kernels (QLinearConv, OpenVINO's
low-precision transformations) and may round, saturate or skip per-channel scales differently.

Checkpoints are the int8/uint8 activations the model defines (QuantizeLinear outputs that are not
weights), in topological order. A checkpoint is read from the runtime by running a *prefix* of the
model that ends at that tensor, so the runtime's own fusions apply up to it. The first checkpoint
whose integers differ from the reference by more than ``tolerance_lsb`` names the layer where the
runtime diverges (the node that feeds that QuantizeLinear), with a likely cause:

* ``saturation``: the runtime pins clearly more values at the integer limits than the reference;
* ``u8s8 overflow``: a Conv/MatMul with weights beyond 7 bits on an x86 CPU without VNNI, where
  the u8 x s8 multiply-add saturates 16-bit sums (quantize with ``reduce_range``);
* ``per-channel``: large errors on a layer with per-channel weight scales, on a runtime other than
  onnxruntime (a runtime that treats them per tensor);
* ``kernel error``: any other error of an integer kernel larger than rounding explains;
* ``float op``: a small difference after a node the runtime computes in float and requantizes;
* ``rounding``: a difference of at most 2 LSB after an integer kernel whose requantization rounds
  differently.

Up to 32 checkpoints are scanned one by one; longer models are bisected (assuming that once a
runtime is off by more than the tolerance, later checkpoints stay off), which costs about
log2(checkpoints) prefix models per runtime.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.quant.size import weight_of
from edgekiln.quant.transformer import ancestors

Runner = Callable[[Path], Callable[[dict[str, np.ndarray]], np.ndarray]]   # prefix model -> run(feeds) -> output
INTEGER_KERNELS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FUSED_ACTIVATIONS = ("Relu", "Clip")
LINEAR_SCAN_MAX = 32
ROUNDING_LSB = 2        # what differently rounded requantization can explain


@dataclass(frozen=True)
class Checkpoint:
    tensor: str        # the quantized activation (QuantizeLinear output)
    source: str        # the float tensor it quantizes
    layer: str         # the node producing ``source``
    op: str            # its op type
    qmin: int
    qmax: int


def checkpoints(model: Any) -> list[Checkpoint]:
    """The quantized activations of a QDQ model in topological (graph) order."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    out = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        src = producer.get(node.input[0])
        if src is None and node.input[0] not in graph_inputs:
            continue
        while src is not None and src.op_type in FUSED_ACTIVATIONS and src.input[0] in producer:
            src = producer[src.input[0]]          # Conv -> Relu -> Q runs as one integer kernel
        qmin, qmax = _zero_point_range(model, node)
        out.append(Checkpoint(node.output[0], node.input[0], (src.name or src.output[0]) if src else node.input[0],
                              src.op_type if src else "input", qmin, qmax))
    return out


def runtime_runner(name: str) -> Runner:
    """A :data:`Runner` for a runtime of the bench adapter table, with its default optimizations."""
    def load(prefix: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        from edgekiln.execution.runtimes import load_session

        sess = load_session(prefix, name)
        return lambda feeds: np.asarray(sess.run(feeds)[0])

    return load


ort_runner = runtime_runner("onnxruntime")   # onnxruntime's fused integer kernels


def first_divergence(quant: str | Path, feeds: Sequence[dict[str, np.ndarray]], runner: Runner, *,
                     tolerance_lsb: int = 1, runtime: str = "onnxruntime") -> dict[str, Any]:
    """The first checkpoint where ``runner`` differs from the simulation by more than
    ``tolerance_lsb`` on any of ``feeds`` (batch-1 dicts), or ``None`` under ``"first"``."""
    import onnx

    model = onnx.load(str(quant))
    points = checkpoints(model)
    if not points:
        return {"first": None, "checked": 0, "checkpoints": 0,
                "note": "no static int8 activations (weights-only or dynamic quantization)"}
    ref = _reference(model, points, feeds)
    with tempfile.TemporaryDirectory(prefix="edgekiln-parity-") as tmp:
        probe = _Probe(model, points, feeds, ref, runner, Path(tmp))
        if len(points) <= LINEAR_SCAN_MAX:
            first = next((i for i in range(len(points)) if probe.lsb(i) > tolerance_lsb), None)
            method = "scan"
        else:
            first = _bisect(lambda i: probe.lsb(i) > tolerance_lsb, len(points))
            method = "bisection"
        result: dict[str, Any] = {"first": None, "checked": len(probe.seen), "checkpoints": len(points),
                                  "method": method,
                                  "max_lsb": {points[i].tensor: v for i, v in sorted(probe.seen.items())}}
        if first is not None:
            p = points[first]
            got, want = probe.got[first], ref[p.tensor]
            result["first"] = {
                "index": first, "checkpoint": p.tensor, "layer": p.layer, "op": p.op,
                "max_lsb": probe.seen[first], "share_differing": float((got != want).mean()),
                "cause": likely_cause(model, p, got, want, runtime)}
    return result


def likely_cause(model: Any, point: Checkpoint, got: np.ndarray, want: np.ndarray, runtime: str) -> str:
    """A short, evidence-bearing guess at why ``got`` (runtime) differs from ``want`` (simulation)."""
    at_limit = lambda a: float(((a == point.qmin) | (a == point.qmax)).mean())  # noqa: E731
    clipped_got, clipped_want = at_limit(got), at_limit(want)
    max_lsb = int(np.abs(got.astype(np.int32) - want.astype(np.int32)).max())
    if clipped_got - clipped_want > 0.01:
        return (f"saturation: {100 * clipped_got:.1f}% of values at the limits [{point.qmin}, {point.qmax}] "
                f"vs {100 * clipped_want:.1f}% in the simulation")
    weights = _weights_of(model, point.layer)
    if point.op in INTEGER_KERNELS and weights is not None:
        w, per_channel = weights
        if runtime == "onnxruntime" and not cpu_has_vnni() and np.abs(w.astype(np.int32)).max() > 63:
            return ("u8s8 overflow: int8 weights use more than 7 bits on an x86 CPU without VNNI; "
                    "quantize with reduce_range")
        if max_lsb <= ROUNDING_LSB:
            return (f"rounding: {point.op} requantizes with a different rounding (max {max_lsb} LSB); "
                    "the difference can compound in later layers")
        if per_channel and runtime != "onnxruntime":
            return f"per-channel: {point.op} has per-channel weight scales; {runtime} may apply them per tensor"
        return (f"kernel error: {point.op} is off by up to {max_lsb} LSB on {100 * float((got != want).mean()):.1f}% "
                "of values, more than rounding explains (scales, zero points or accumulation)")
    return f"float op: {runtime} computes {point.op} in float and requantizes (max {max_lsb} LSB)"


def cpu_has_vnni() -> bool:
    """True where the CPU has an int8 dot-product instruction (x86 VNNI) or is not x86."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


class _Probe:
    """Reads checkpoint ``i`` from the runtime once (prefix model) and remembers the result."""

    def __init__(self, model: Any, points: list[Checkpoint], feeds: Sequence[dict[str, np.ndarray]],
                 ref: dict[str, np.ndarray], runner: Runner, tmp: Path) -> None:
        self.model, self.points, self.feeds, self.ref, self.runner, self.tmp = model, points, feeds, ref, runner, tmp
        self.seen: dict[int, int] = {}
        self.got: dict[int, np.ndarray] = {}

    def lsb(self, i: int) -> int:
        if i not in self.seen:
            run = self.runner(_prefix(self.model, self.points[i], self.tmp / f"prefix{i}.onnx"))
            got = np.concatenate([np.asarray(run(f)) for f in self.feeds])
            want = self.ref[self.points[i].tensor]
            if got.shape != want.shape:
                raise ValueError(f"checkpoint {self.points[i].tensor}: runtime shape {got.shape} vs {want.shape}")
            self.got[i] = np.rint(got).astype(np.int32) if got.dtype.kind == "f" else got.astype(np.int32)
            self.seen[i] = int(np.abs(self.got[i] - want.astype(np.int32)).max())
        return self.seen[i]


def _reference(model: Any, points: list[Checkpoint], feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every checkpoint's integers in the simulation (onnxruntime, optimizations off)."""
    from edgekiln.execution.ort import run_with_intermediates

    return run_with_intermediates(model, list(feeds), [p.tensor for p in points])


def _prefix(model: Any, point: Checkpoint, path: Path) -> Path:
    """The part of ``model`` that computes the checkpoint from the graph inputs, as its only output."""
    import onnx
    from onnx import TensorProto, helper

    needed = ancestors(model, {point.tensor})
    elem = TensorProto.UINT8 if point.qmin == 0 else TensorProto.INT8
    graph = helper.make_graph(
        [n for n in model.graph.node if any(o in needed for o in n.output)], "prefix",
        [i for i in model.graph.input if i.name in needed],
        [helper.make_tensor_value_info(point.tensor, elem, None)],
        [i for i in model.graph.initializer if i.name in needed])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    onnx.save(sub, str(path))
    return path


def _bisect(diverged: Callable[[int], bool], n: int) -> int | None:
    """Smallest ``i`` with ``diverged(i)``, for a predicate assumed monotone; None when none is."""
    if not diverged(n - 1):
        return None
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if diverged(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _zero_point_range(model: Any, q_node: Any) -> tuple[int, int]:
    from onnx import TensorProto

    zp = next((i for i in model.graph.initializer if len(q_node.input) > 2 and i.name == q_node.input[2]), None)
    unsigned = zp is not None and zp.data_type == TensorProto.UINT8
    return (0, 255) if unsigned else (-128, 127)


def _weights_of(model: Any, layer: str) -> tuple[np.ndarray, bool] | None:
    """The integer weights of ``layer`` (through their DequantizeLinear) and whether they are per-channel."""
    from onnx import numpy_helper

    node = next((n for n in model.graph.node if (n.name or n.output[0]) == layer), None)
    inits = {i.name: i for i in model.graph.initializer}
    found = weight_of(node, inits, {o: n for n in model.graph.node for o in n.output}) if node is not None else None
    if found is None or found[1] is None:
        return None
    weight, dq = found
    scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else np.zeros(1)
    return numpy_helper.to_array(weight), scale.size > 1
