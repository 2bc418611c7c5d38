"""Speed-aware int8: which ops stay float because their int8 form is slower on the runtime the
model ships to, and the HardSwish that onnxruntime's pre-processing splits, put back.

Measured on this machine kind (onnxruntime 1.31, OpenVINO 2026.4, 1 thread, batch 1, p50 ms,
round-robin; random-weight CNNs of ``edgekiln.testing.corpus``; FP32 / int8 without / with the rule):

* ``quant_pre_process`` (its graph optimizer) splits every ``HardSwish`` into ``HardSigmoid`` +
  ``Mul``, and each gets a Q/DQ pair: :func:`fuse_hardswish` puts the 19 of MobileNetV3-small back
  before quantization.
* Activations and gates between Convs (``HardSigmoid``, ``HardSwish``, ``Sigmoid``, ``Mul``,
  ``PRelu``) quantized cost a DequantizeLinear/QuantizeLinear pair each that neither runtime fuses
  away on these models; kept float (their inputs and outputs still cross int8 at the Convs) the
  models get faster: MobileNetV3-small onnxruntime 1.76 / 6.93 / 3.14, OpenVINO 1.69 / 2.39 / 1.38;
  EfficientNet-B0 onnxruntime 11.06 / 36.9 / 33.2, OpenVINO 10.56 / 13.63 / 9.41. MTCNN O-Net
  (PRelu) and ResNet-18 (none of these ops): no change beyond noise.
* Not solved here: on onnxruntime a Conv whose int8 output feeds two nodes (SiLU's Sigmoid and Mul
  both read it) is not fused into QLinearConv (54 of EfficientNet-B0's 81 Convs run as float Conv
  with weights dequantized per call). With one ``Swish`` node (opset 24) instead, onnxruntime fused
  both Convs of a Conv-SiLU-Conv test model; not yet tried on the corpus (needs an opset upgrade).

Where it is not clear-cut the quantize pass measures both forms on the target runtime and keeps
the faster (``QuantizeConfig.speed_rule = "auto"``): :func:`faster_model`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")

# NOTE: the same set measured fastest on both runtimes (issue 20 table); ReduceMean,
# GlobalAveragePool, Add and MaxPool made no measurable difference either way, so they stay int8
# (an int8 Add keeps a residual stream int8 for the next Conv).
_ACTIVATIONS = frozenset({"HardSigmoid", "HardSwish", "Sigmoid", "Mul", "PRelu"})
FLOAT_OPS: dict[str, frozenset[str]] = {"onnxruntime": _ACTIVATIONS, "openvino": _ACTIVATIONS}

REASONS = {
    "HardSigmoid": "HardSigmoid (SE gate or split HardSwish): int8 costs a DQ/Q pair the runtime does not fuse",
    "HardSwish": "HardSwish: int8 costs a DQ/Q pair the runtime does not fuse",
    "Sigmoid": "Sigmoid (SiLU/SE gate): int8 costs a DQ/Q pair the runtime does not fuse",
    "Mul": "Mul (SiLU product or SE scale): int8 costs a DQ/Q pair the runtime does not fuse",
    "PRelu": "PRelu: int8 costs a DQ/Q pair the runtime does not fuse",
}


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def fuse_hardswish(model: Any) -> list[str]:
    """Rewrite ``x * HardSigmoid(x; alpha=1/6, beta=0.5)`` as ``HardSwish(x)`` in place (opset
    >= 14, where HardSwish exists); returns the names of the new HardSwish nodes.

    >>> from onnx import helper, TensorProto
    >>> nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], name="hs", alpha=1 / 6, beta=0.5),
    ...          helper.make_node("Mul", ["x", "h"], ["y"], name="mul")]
    >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    >>> fuse_hardswish(m), [n.op_type for n in m.graph.node]
    (['mul_hardswish'], ['HardSwish'])
    """
    from onnx import helper

    if _opset(model) < 14:
        return []
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    uses = Counter(i for n in g.node for i in n.input)
    uses.update(o.name for o in g.output)
    dropped: set[int] = set()
    fused: dict[int, Any] = {}
    for node in g.node:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for gate, x in ((0, 1), (1, 0)):
            hs = producer.get(node.input[gate])
            if hs is None or hs.op_type != "HardSigmoid" or hs.input[0] != node.input[x] or uses[hs.output[0]] != 1 \
                    or id(hs) in dropped:
                continue
            attrs = {a.name: a.f for a in hs.attribute}
            if abs(attrs.get("alpha", 0.2) - 1 / 6) > 1e-6 or abs(attrs.get("beta", 0.5) - 0.5) > 1e-6:
                continue
            dropped.add(id(hs))
            fused[id(node)] = helper.make_node("HardSwish", [node.input[x]], [node.output[0]],
                                               name=f"{node.name or hs.name}_hardswish")
            break
    if not fused:
        return []
    nodes = [fused.get(id(n), n) for n in g.node if id(n) not in dropped]
    del g.node[:]
    g.node.extend(nodes)
    return [fused[k].name for k in fused]


def float_for_speed(model: Any, runtime: str = "onnxruntime", skip: Sequence[str] = ()) -> dict[str, str]:
    """``{node name: why}`` for the nodes the int8 scheme leaves float on ``runtime`` (see
    :data:`FLOAT_OPS`); nodes must be named (``float_statistics`` names the unnamed ones).

    >>> from onnx import helper, TensorProto
    >>> g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
    ...                        helper.make_node("Mul", ["x", "s"], ["y"], name="silu")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    >>> sorted(float_for_speed(helper.make_model(g)))
    ['sig', 'silu']
    """
    ops = FLOAT_OPS.get(runtime, FLOAT_OPS["onnxruntime"])
    skipped = set(skip)
    return {n.name: REASONS[n.op_type] for n in model.graph.node
            if n.op_type in ops and n.name and n.name not in skipped}


def faster_model(candidates: Mapping[str, Path], runtime: str, feed: Mapping[str, np.ndarray], *,
                 rounds: int = 15, warmup: int = 5) -> dict[str, float]:
    """p50 ms of each candidate model on ``runtime`` (1 thread, batch of ``feed``), timed
    round-robin so machine load falls on all alike."""
    from edgekiln.execution.runtimes import load_session
    from edgekiln.execution.timing import latency_stats, time_round_robin

    shapes = {k: tuple(np.asarray(v).shape) for k, v in feed.items()}
    sessions = {k: load_session(p, runtime, threads=1, input_shapes=shapes) for k, p in candidates.items()}
    feed = dict(feed)
    samples = time_round_robin({k: (lambda s=s: s.run(feed)) for k, s in sessions.items()}, rounds=rounds,
                               warmup=warmup, per_turn=2)
    return {k: latency_stats(v)["p50"] for k, v in samples.items()}


SQNR_SLACK_DB = 1.0   # the faster form may lose at most this much SQNR against the other


def choose_form(src: Path, with_rule: Path, without: Path, runtime: str,
                feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Time both int8 forms of ``src`` on ``runtime`` (batch of the first feed) and compare their
    SQNR against ``src`` on up to 8 feeds; the faster is kept unless it loses more than
    ``SQNR_SLACK_DB``. Returns ``{"applied", "p50_ms", "sqnr_db", "decided_by"}``; when the runtime
    cannot time here the rule stays applied (the measured default, :data:`FLOAT_OPS`)."""
    try:
        p50 = faster_model({"on": with_rule, "off": without}, runtime, feeds[0])
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot load or time here is reported, not fatal
        return {"applied": True, "decided_by": f"default (timing on {runtime} failed: {str(exc).splitlines()[0][:120]})"}
    held = list(feeds[:8])
    sqnr = {"on": sqnr_db(src, with_rule, held), "off": sqnr_db(src, without, held)}
    faster, slower = ("on", "off") if p50["on"] <= p50["off"] else ("off", "on")
    keep = faster if sqnr[faster] >= sqnr[slower] - SQNR_SLACK_DB else slower
    return {"applied": keep == "on", "p50_ms": p50, "sqnr_db": sqnr, "decided_by": f"measured on {runtime}"}


def sqnr_db(reference: Path, quantized: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> float:
    """``20 log10(|y| / |y - y_q|)`` of ``quantized`` against ``reference`` on ``feeds`` (onnxruntime;
    the lowest over the outputs)."""
    from edgekiln.execution.ort import ort_session

    ref, q = ort_session(reference), ort_session(quantized)
    worst = float("inf")
    outs_ref = [ref.run(None, dict(f)) for f in feeds]
    outs_q = [q.run(None, dict(f)) for f in feeds]
    for k in range(len(outs_ref[0])):
        a = np.concatenate([o[k].ravel() for o in outs_ref]).astype(np.float64)
        b = np.concatenate([o[k].ravel() for o in outs_q]).astype(np.float64)
        noise = float(np.linalg.norm(a - b))
        signal = max(float(np.linalg.norm(a)), 1e-30)
        worst = min(worst, float("inf") if noise == 0 else float(20 * np.log10(signal / noise)))
    return worst
