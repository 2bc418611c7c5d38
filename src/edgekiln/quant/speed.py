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

Where it is not clear-cut the quantize pass measures the forms on the target runtime(s) and keeps
the fastest (``QuantizeConfig.speed_rule = "auto"``, ``activations = "auto"``): :func:`choose_form`.

* uint8 activations: onnxruntime on x86 fuses a Conv into QLinearConv only when its int8 input
  can be converted to uint8 (its ``QDQS8ToU8`` rewrite of a Q/DQ pair with one consumer); a
  tensor read by two Convs (SqueezeNet's fire modules) or coming from a Concat kept 24 of
  SqueezeNet-1.1's 26 Convs float: int8 3.17 ms, uint8 0.74 ms, FP32 1.30 ms (same SQNR, 37.8 dB).
  EfficientNet-B0 onnxruntime 55 -> 26 ms; on OpenVINO uint8 was sometimes slower (MobileNetV3-S
  1.65 -> 2.78 ms): measured per model, not assumed.
"""

from __future__ import annotations

import time
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
# NOTE: OpenVINO 2026.4 cannot compile crepe-tiny's int8 model ("[PadTransformation] ...
# broadcast_merge_into" at a Pad after a DequantizeLinear); keeping the Pad float does not help (its
# low-precision transformations move the dequantization into the Pad either way), so that model is
# reported as not running on OpenVINO and ships to onnxruntime.
FLOAT_OPS: dict[str, frozenset[str]] = {"onnxruntime": _ACTIVATIONS, "openvino": _ACTIVATIONS, "auto": _ACTIVATIONS}

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


def ship_runtimes(runtime: str) -> list[str]:
    """The runtimes a quantized ONNX model is timed on: ``runtime`` itself, or for ``"auto"`` every
    installed runtime that runs ONNX files (the fastest of them is the one it ships to)."""
    if runtime != "auto":
        return [runtime]
    from edgekiln.execution.runtimes import available_runtimes

    return [r for r in RUNTIMES if available_runtimes().get(r, "missing") is None]


def time_forms(candidates: Mapping[str, Path], runtimes: Sequence[str], feed: Mapping[str, np.ndarray], *,
               rounds: int = 15, warmup: int = 5) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """p50 ms of each candidate model on each runtime (1 thread, batch of ``feed``), all timed
    round-robin in one loop, in process CPU time: ``({form: {runtime: p50}},
    {"form/runtime": why it did not load})``."""
    from edgekiln.execution.runtimes import load_session
    from edgekiln.execution.timing import latency_stats, time_round_robin

    shapes = {k: tuple(np.asarray(v).shape) for k, v in feed.items()}
    sessions, errors = {}, {}
    for form, path in candidates.items():
        for rt in runtimes:
            try:
                sessions[(form, rt)] = load_session(path, rt, threads=1, input_shapes=shapes)
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot load a form is reported, not fatal
                errors[f"{form}/{rt}"] = str(exc).splitlines()[0][:160]
    feed = dict(feed)
    # NOTE: process CPU time, not wall time: every runtime here runs on one thread, and CPU time does
    # not count the time another process holds the core. Under load (5 busy processes on 2 cores)
    # wall p50 of MobileNetV3-S FP32 on OpenVINO swung 2.0 -> 7.5 ms run to run while CPU time stayed
    # 2.0-2.2 ms, the same ranking as wall time on a quiet machine: decisions stay right on busy hosts.
    samples = time_round_robin({k: (lambda s=s: s.run(feed)) for k, s in sessions.items()}, rounds=rounds,
                               warmup=warmup, per_turn=2, clock=time.process_time_ns)
    p50: dict[str, dict[str, float]] = {form: {} for form in candidates}
    for (form, rt), v in samples.items():
        p50[form][rt] = latency_stats(v)["p50"]
    return p50, errors


FP32 = "fp32"          # the float model's key among the timed forms
MIN_FORM_GAIN = 0.05   # another form replaces the first (default) one only if at least 5% faster
MIN_FORM_GAIN_MS = 0.02  # ... and at least 20 us faster (call-overhead-bound models differ by noise)
SQNR_SLACK_DB = 1.0   # the faster form may lose at most this much SQNR against the other
ACCURACY_GAIN_DB = 1.0   # a pair about as fast (within MIN_FORM_GAIN) wins when at least this much more accurate


def choose_form(src: Path, forms: Mapping[str, Path], runtime: str,
                feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Time every int8 form of ``src`` (``{name: path}``, e.g. with and without the speed rule, int8
    or uint8 activations) on ``runtime`` (``"auto"``: on every installed ONNX runtime, each form
    scored by its fastest runtime where its accuracy holds) with the batch of the first feed, and
    their SQNR against ``src`` on up to 8 feeds on each runtime. The fastest (form, runtime) pair
    whose SQNR is within ``SQNR_SLACK_DB`` of the first form's (on its most accurate runtime) is kept; the first form stays unless
    that pair is at least ``MIN_FORM_GAIN`` (and ``MIN_FORM_GAIN_MS``) faster than the first form's best pair;
    a pair within ``MIN_FORM_GAIN`` of the kept one's time and ``ACCURACY_GAIN_DB`` more accurate replaces it.
    ``src`` itself is timed in the same loop (``fp32_p50_ms``: its fastest runtime).
    Returns ``{"kept_form", "p50_ms", "p50_by_runtime", "sqnr_db", "fp32_p50_ms", "fp32_by_runtime",
    "fastest_runtime", "runtime_errors", "decided_by"}``; when no runtime can time every form here the first form
    stays (the measured default, :data:`FLOAT_OPS`)."""
    runtimes = ship_runtimes(runtime)
    by_rt, errors = time_forms({**forms, FP32: src}, runtimes, feeds[0])
    fp32 = by_rt.pop(FP32)
    errors = {k: v for k, v in errors.items() if not k.startswith(f"{FP32}/")}
    usable = [rt for rt in runtimes if all(rt in by_rt[f] for f in forms)]
    first = next(iter(forms))
    if not usable:
        why = "; ".join(f"{k}: {v}" for k, v in errors.items())[:200] or "no runtime installed"
        return {"kept_form": first, "decided_by": f"default (timing on {runtime} failed: {why})",
                "runtime_errors": errors}
    acc = runtime_sqnr(src, forms, usable, list(feeds[:8]))
    best_sqnr = max((db for per in acc.values() for db in per.values()), default=float("-inf"))
    # NOTE: a (form, runtime) pair is a candidate only where its accuracy holds on that runtime:
    # within SQNR_SLACK_DB of the first (default) form on its most accurate runtime. Not of the best
    # pair: on MobileViT-XXS the fused form reached 20.1 dB on onnxruntime and every other pair at most
    # 17.7, which left one 24 ms pair (FP32 11.7 ms; uint8 on OpenVINO: 17.4 dB, 12.3 ms).
    ref = max(acc[first].values(), default=best_sqnr)
    pairs = [(f, rt) for f in forms for rt in usable if acc[f].get(rt, float("-inf")) >= ref - SQNR_SLACK_DB]
    keep, fastest_rt = min(pairs, key=lambda p: by_rt[p[0]][p[1]])
    default = [p for p in pairs if p[0] == first]
    if keep != first and default:
        # NOTE: the first form (the default) stays unless another is clearly faster: near-equal
        # forms (tiny, call-overhead-bound models) would otherwise flip between runs
        d = min(default, key=lambda p: by_rt[p[0]][p[1]])
        gain = by_rt[d[0]][d[1]] - by_rt[keep][fastest_rt]
        if gain < by_rt[d[0]][d[1]] * MIN_FORM_GAIN or gain < MIN_FORM_GAIN_MS:
            keep, fastest_rt = d
    # NOTE: between pairs about as fast (within MIN_FORM_GAIN), the clearly more accurate one: DeiT-tiny's
    # "on" form on OpenVINO ran 14.9 ms at 10.0 dB, its "inputs" form on onnxruntime 15.2 ms at 29.3 dB
    near = [p for p in pairs if by_rt[p[0]][p[1]] <= by_rt[keep][fastest_rt] * (1 + MIN_FORM_GAIN)]
    sharper = max(near, key=lambda p: (acc[p[0]][p[1]], -by_rt[p[0]][p[1]]))
    if acc[sharper[0]][sharper[1]] >= acc[keep][fastest_rt] + ACCURACY_GAIN_DB:
        keep, fastest_rt = sharper
    p50 = {f: min([by_rt[f][rt] for f2, rt in pairs if f2 == f], default=min(by_rt[f].values())) for f in forms}
    sqnr = {f: max(acc[f].values(), default=float("-inf")) for f in forms}
    return {"kept_form": keep, "p50_ms": p50, "p50_by_runtime": by_rt, "sqnr_db": sqnr, "sqnr_by_runtime": acc,
            "fp32_p50_ms": min(fp32.values()) if fp32 else None, "fp32_by_runtime": fp32,
            "runtime_errors": errors, "fastest_runtime": fastest_rt, "accuracy_floor_db": ref - SQNR_SLACK_DB,
            "decided_by": f"measured on {', '.join(usable)}"}


def costly_layers(model_path: Path, runtime: str, feed: Mapping[str, np.ndarray], layers: Sequence[str],
                  k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` named ``layers`` of the quantized model that take the most time on ``runtime``
    (its profiler, :func:`edgekiln.execution.profile.layer_profile`), ``[(layer, ms)]``. A
    profiled node belongs to the layer whose name is the longest prefix of its name (onnxruntime
    names a fused QLinearConv ``<layer>_token_<n>``, OpenVINO ``<layer>/WithoutBiases``)."""
    from edgekiln.execution.profile import layer_profile

    by_len = sorted(layers, key=len, reverse=True)
    total: dict[str, float] = {}
    for row in layer_profile(model_path, runtime, feed):
        owner = next((name for name in by_len if row["node"].startswith(name)), None)
        if owner is not None:
            total[owner] = total.get(owner, 0.0) + row["ms"]
    return sorted(total.items(), key=lambda kv: -kv[1])[:k]


def sqnr_db(reference: Path, quantized: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> float:
    """``20 log10(|y| / |y - y_q|)`` of ``quantized`` against ``reference`` on ``feeds`` (onnxruntime;
    the lowest over the outputs)."""
    from edgekiln.execution.ort import ort_session

    ref, q = ort_session(reference), ort_session(quantized)
    return sqnr_of([ref.run(None, dict(f)) for f in feeds], [q.run(None, dict(f)) for f in feeds])


def sqnr_of(reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]) -> float:
    """The lowest SQNR (dB) over the outputs of per-feed output lists (``inf`` when identical).

    >>> a = [[np.ones(4)], [np.ones(4)]]
    >>> sqnr_of(a, a), round(sqnr_of(a, [[np.ones(4) * 1.1], [np.ones(4)]]), 1)
    (inf, 23.0)
    """
    worst = float("inf")
    for k in range(len(reference[0])):
        a = np.concatenate([np.ravel(o[k]) for o in reference]).astype(np.float64)
        b = np.concatenate([np.ravel(o[k]) for o in outputs]).astype(np.float64)
        noise = float(np.linalg.norm(a - b))
        signal = max(float(np.linalg.norm(a)), 1e-30)
        worst = min(worst, float("inf") if noise == 0 else float(20 * np.log10(signal / noise)))
    return worst


def runtime_sqnr(reference: Path, models: Mapping[str, Path], runtimes: Sequence[str],
                 feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """SQNR of each model on each runtime against ``reference`` on onnxruntime: ``{model: {runtime:
    dB}}`` (a runtime that cannot load a model is left out). Runtimes do not compute an int8 graph
    alike: the same file measured 32.9 dB on onnxruntime and 15.9 dB on OpenVINO (YOLOv8n), so the
    fastest runtime is only a candidate where its accuracy holds."""
    from edgekiln.execution.ort import ort_session
    from edgekiln.execution.runtimes import load_session

    ref_sess = ort_session(reference)
    want = [ref_sess.run(None, dict(f)) for f in feeds]
    shapes = {k: tuple(np.asarray(v).shape) for k, v in feeds[0].items()}
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for name, path in models.items():
        for rt in runtimes:
            try:
                sess = load_session(path, rt, threads=1, input_shapes=shapes)
                got = [sess.run(dict(f)) for f in feeds]
            except Exception:  # noqa: BLE001, S112 - a runtime that cannot run it is simply no candidate
                continue
            out[name][rt] = sqnr_of(want, got)
    return out
