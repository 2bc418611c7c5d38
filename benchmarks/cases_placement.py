"""Heterogeneous execution (issue 24): per-segment runtime placement on this CPU, measured end to end,
and the placements the planner makes on NPU/GPU profiles (estimates; no such unit here).

For each model, ``edgekiln.targets.place_measure.measure_placement`` times the whole model on every
host runtime and its candidate chains (the 3 cheapest by blocks timed alone) round-robin, and keeps a
chain only if it beats the best single runtime by more than max(2%, 2 x spread). Table 1 is the
result per model, table 2 each chosen segment's estimate (alone, less merged boundaries) against its
time measured inside the chain, table 3 the cost of one runtime call (the price of a boundary) for a
tiny and a 512 KB tensor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.suite import CaseResult

TITLE = ("Heterogeneous execution: per-segment runtime placement on this CPU (measured) and placements on "
         "NPU/GPU profiles (simulated)")
SIMULATED = ("coral-edgetpu", "rk3588", "jetson-nano")
HOST_RUNTIMES = ("onnxruntime", "openvino", "litert")


# ---- models (built in code, seeded) -------------------------------------------------------------------

def _inits(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)


def mobilenet_v1(size: int = 128, alpha: float = 0.5) -> Any:
    """MobileNetV1 (13 depthwise-separable blocks, ReLU6) at width ``alpha``, seeded random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1)]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    nodes, x, cin = [], "input", 3
    stem = int(32 * alpha)

    def conv(name: str, src: str, cout: int, cin_g: int, k: int, stride: int, group: int = 1) -> str:
        inits.append(_inits(rng, name + "_w", (cout, cin_g, k, k), cin_g * k * k))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), name + "_b"))
        nodes.append(helper.make_node("Conv", [src, name + "_w", name + "_b"], [name], name=name, group=group,
                                      kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]))
        nodes.append(helper.make_node("Clip", [name, "zero", "six"], [name + "_r"], name=name + "_relu6"))
        return name + "_r"

    x, cin = conv("stem", x, stem, 3, 3, 2), stem
    for i, (c, s) in enumerate(cfg):
        c = int(c * alpha)
        x = conv(f"dw{i}", x, cin, 1, 3, s, group=cin)
        x, cin = conv(f"pw{i}", x, c, cin, 1, 1), c
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1)]
    inits += [_inits(rng, "fc_w", (10, cin), cin), numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "mobilenet_v1", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, 3, size, size])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_transformer(size: int = 64, d: int = 128, layers: int = 2, heads: int = 4, ff: int = 256) -> Any:
    """A conv stem (3 stride-2 convs, 3 -> 32 -> 64 -> d) whose (size/8)^2 pixels are the tokens of
    ``layers`` post-norm transformer encoder layers (ReLU MLP, as torch's default layer), then mean + FC."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    t = (size // 8) ** 2
    dh = d // heads
    f = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    i = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [i("tokens", [1, d, t]), i("split_heads", [1, t, heads, dh]), i("merge", [1, t, d]),
             f("scale", 1 / np.sqrt(dh)), f("ln_g", np.ones(d)), f("ln_b", np.zeros(d))]
    mk = helper.make_node
    nodes, x, cin = [], "input", 3
    for k, c in enumerate((32, 64, d)):
        inits += [_inits(rng, f"c{k}_w", (c, cin, 3, 3), cin * 9), f(f"c{k}_b", np.zeros(c))]
        nodes += [mk("Conv", [x, f"c{k}_w", f"c{k}_b"], [f"c{k}"], name=f"conv{k}", kernel_shape=[3, 3],
                     pads=[1, 1, 1, 1], strides=[2, 2]), mk("Relu", [f"c{k}"], [f"c{k}r"], name=f"relu{k}")]
        x, cin = f"c{k}r", c
    nodes += [mk("Reshape", [x, "tokens"], ["tk"], name="to_tokens"),
              mk("Transpose", ["tk"], ["h0"], name="tokens_last", perm=[0, 2, 1])]
    h = "h0"
    for L in range(layers):
        p = f"l{L}_"
        inits += [_inits(rng, p + n, (d, d), d) for n in ("wq", "wk", "wv", "wo")]
        inits += [_inits(rng, p + "w1", (d, ff), d), _inits(rng, p + "w2", (ff, d), ff)]
        for n in ("q", "k", "v"):
            nodes += [mk("MatMul", [h, p + "w" + n], [p + n + "0"], name=p + "proj_" + n),
                      mk("Reshape", [p + n + "0", "split_heads"], [p + n + "1"], name=p + "heads_" + n),
                      mk("Transpose", [p + n + "1"], [p + n], name=p + "t_" + n,
                         perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3])]
        nodes += [mk("MatMul", [p + "q", p + "k"], [p + "s0"], name=p + "scores"),
                  mk("Mul", [p + "s0", "scale"], [p + "s"], name=p + "scaled"),
                  mk("Softmax", [p + "s"], [p + "p"], name=p + "softmax", axis=-1),
                  mk("MatMul", [p + "p", p + "v"], [p + "a0"], name=p + "attend"),
                  mk("Transpose", [p + "a0"], [p + "a1"], name=p + "t_out", perm=[0, 2, 1, 3]),
                  mk("Reshape", [p + "a1", "merge"], [p + "a2"], name=p + "merge_heads"),
                  mk("MatMul", [p + "a2", p + "wo"], [p + "a"], name=p + "proj_o"),
                  mk("Add", [h, p + "a"], [p + "r1"], name=p + "res1"),
                  mk("LayerNormalization", [p + "r1", "ln_g", "ln_b"], [p + "n1"], name=p + "ln1", axis=-1),
                  mk("MatMul", [p + "n1", p + "w1"], [p + "f1"], name=p + "fc1"),
                  mk("Relu", [p + "f1"], [p + "f1r"], name=p + "relu"),
                  mk("MatMul", [p + "f1r", p + "w2"], [p + "f2"], name=p + "fc2"),
                  mk("Add", [p + "n1", p + "f2"], [p + "r2"], name=p + "res2"),
                  mk("LayerNormalization", [p + "r2", "ln_g", "ln_b"], [p + "out"], name=p + "ln2", axis=-1)]
        h = p + "out"
    inits += [_inits(rng, "head_w", (d, 10), d), f("head_b", np.zeros(10))]
    nodes += [mk("ReduceMean", [h], ["pooled"], name="mean", axes=[1], keepdims=0),
              mk("MatMul", ["pooled", "head_w"], ["logits"], name="head"),
              mk("Add", ["logits", "head_b"], ["output"], name="head_bias")]
    graph = helper.make_graph(nodes, "conv_transformer",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _models(work: Path, quick: bool) -> list[tuple[str, Path, str, dict[str, tuple[int, ...]] | None]]:
    """(name, path, note, input shapes) of the benchmark's models; the YOLOv8n only when the corpus cache
    has it (exported with dynamic H, W: placed at the corpus entry's 320x320)."""
    import onnx

    from edgekiln.codegen.testmodels import quantize_qdq

    size = 64 if quick else 128
    out: list[tuple[str, Path, str, dict[str, tuple[int, ...]] | None]] = [
        (f"MobileNetV1 0.5x {size}² int8 QDQ", quantize_qdq(mobilenet_v1(size), work / "mbv1.onnx"),
         "per-channel QDQ (onnxruntime quantize_static)", None)]
    try:
        from edgekiln.testing.corpus import CORPUS, _cached

        got = _cached(CORPUS["yolov8n_nudenet"])
    except Exception:  # noqa: BLE001 - the corpus cache is optional here
        got = None
    if got is not None and not quick:
        out.append(("YOLOv8n (nudenet 320n) fp32", got.path, "real weights, corpus cache",
                    dict(CORPUS["yolov8n_nudenet"].input_shapes) or None))
    if not quick:
        out += _corpus_int8(work)
    path = work / "convtx.onnx"
    size = 32 if quick else 64
    onnx.save(conv_transformer(size), str(path))
    out.append((f"conv stem ({size}²) + 2-layer transformer fp32", path, f"d=128, {(size // 8) ** 2} tokens", None))
    return out


def _corpus_int8(work: Path) -> list[tuple[str, Path, str, dict[str, tuple[int, ...]] | None]]:
    """Corpus models as ``edgekiln quantize`` writes them with its defaults (the form it measured fastest,
    Q/DQ pairs left out for OpenVINO where that won): MTCNN O-Net (real weights) and the CRNN (conv + LSTM)."""
    from edgekiln.api import quantize
    from edgekiln.testing.corpus import CORPUS, ensure

    out = []
    for name, label in (("mtcnn_onet", "MTCNN O-Net int8 (edgekiln quantize)"),
                        ("crnn_rec", "CRNN conv + BiLSTM int8 (edgekiln quantize)")):
        try:
            cm = ensure(name)
            run = quantize(cm.path, out=work / f"q_{name}", calib=cm.calib, bench_runs=20)
        except Exception as exc:  # noqa: BLE001 - an optional corpus model: the table says what is missing
            print(f"placement: {name} skipped ({str(exc).splitlines()[0][:120]})")
            continue
        shapes = dict(CORPUS[name].input_shapes) or None
        out.append((label, run.path / "model.onnx", CORPUS[name].source, shapes))
    return out


# ---- measurement --------------------------------------------------------------------------------------

def host_units() -> tuple[Any, ...]:
    """One measured CPU unit per host runtime (the host profile's, when it lists them)."""
    from edgekiln.targets.compute_units import ComputeUnit, profile_units
    from edgekiln.targets.profiles import load_profile

    units = tuple(u for u in profile_units(load_profile("host")) if u.runtime)
    if len(units) > 1:
        return units
    return tuple(ComputeUnit(name=f"cpu-{r}", type="cpu", precisions=("int8", "fp32"),
                             peak_macs_per_s={"int8": 1.0, "fp32": 1.0}, efficiency=1.0,
                             memory_bandwidth_bytes_per_s=1.0, runtime=r, measured=True, source="measured")
                 for r in HOST_RUNTIMES)


def measure_model(name: str, path: Path, work: Path, settings: Any,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """The host measurement of one model plus the placements the planner makes on the NPU/GPU profiles."""
    from edgekiln.api import load
    from edgekiln.codegen.tflite.candidate import litert_candidate
    from edgekiln.models.run_folder import precision_of
    from edgekiln.targets.compute_units import profile_units
    from edgekiln.targets.place_graph import place_graph
    from edgekiln.targets.place_measure import measure_placement
    from edgekiln.targets.placement import place
    from edgekiln.targets.profiles import load_profile

    art = load(path, input_shapes=input_shapes)
    d = work / name.split()[0].lower()
    d.mkdir(parents=True, exist_ok=True)
    graph = place_graph(art.path, art.input_shapes, precision_of(art.kind))
    placement, measured = measure_placement(art, graph, host_units(), target="host", work=d,
                                            to_tflite=litert_candidate, settings=settings)
    simulated = {}
    for prof in SIMULATED:
        try:
            p = place(graph, profile_units(load_profile(prof)), target=prof)   # the graph built once above
            simulated[prof] = {"segments": [(s.unit, len(s.nodes), round(s.est_ms, 4)) for s in p.segments],
                               "total_ms": p.total_ms, "gain": p.gain}
        except Exception as exc:  # noqa: BLE001 - a profile that cannot place this model says why
            simulated[prof] = {"error": str(exc).splitlines()[0][:160]}
    return {"model": name, "path": str(path), "measured": measured, "simulated": simulated,
            "gain_vs_best_single": placement.gain}


def call_costs(work: Path, settings: Any) -> dict[str, dict[str, float]]:
    """Median ms of one Relu call per runtime on a tiny (32 B) and a 512 KB float tensor."""
    import onnx
    from onnx import TensorProto, helper

    from edgekiln.execution.runtimes import available_runtimes, load_session
    from edgekiln.execution.timing import time_round_robin

    have = [r for r, why in available_runtimes().items() if why is None and r != "litert"]
    out: dict[str, dict[str, float]] = {}
    for label, n in (("tiny (32 B)", 8), ("512 KB", 131072)):
        path = work / f"relu_{n}.onnx"
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        x = {"x": np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)}
        sessions = {r: load_session(path, r) for r in have}
        calls = {r: (lambda s=s, x=x: s.run(x)) for r, s in sessions.items()}
        samples = time_round_robin(calls, rounds=settings.runs, warmup=settings.warmup)
        out[label] = {r: float(np.median(v)) for r, v in samples.items()}
    return out


def run(models: list[tuple[str, Path, str, dict[str, tuple[int, ...]] | None]], work: Path,
        settings: Any) -> dict[str, Any]:
    load = os.getloadavg()
    t0 = time.monotonic()
    rows = [measure_model(name, path, work, settings, shapes) | {"note": note} for name, path, note, shapes in models]
    return {"models": rows, "call_costs": call_costs(work, settings), "load_before": load,
            "load_after": os.getloadavg(), "seconds": round(time.monotonic() - t0, 1),
            "settings": {"warmup": settings.warmup, "runs": settings.runs, "block_runs": settings.block_runs}}


# ---- report -------------------------------------------------------------------------------------------

def _single(m: dict[str, Any], runtime: str) -> str:
    c = next((c for c in m["candidates"] if c["label"] == runtime), None)
    return f"{c['p50_ms']:.3f} / {c['p90_ms']:.3f}" if c else "–"


def markdown(raw: dict[str, Any]) -> str:
    from edgekiln.report import md_table

    s = raw["settings"]
    t1, t2, sim = [], [], []
    for row in raw["models"]:
        m = row["measured"]
        gain = row["gain_vs_best_single"]
        chain = next((c for c in m["candidates"] if c["chain"]), None)
        t1.append([row["model"], *(_single(m, r) for r in HOST_RUNTIMES),
                   f"{chain['label']}: {chain['p50_ms']:.3f}" if chain else "–", m["chosen"],
                   f"{m['chosen_p50_ms']:.3f}", f"{100 * gain:+.1f}%" if gain is not None else "–"])
        for k, seg in enumerate(m["segments"]):
            est, got = seg["est_ms"], seg["in_chain_ms"]
            t2.append([row["model"], str(k), seg["runtime"], f"{seg['blocks'][0]}–{seg['blocks'][1]}",
                       f"{est:.3f}", f"{got:.3f}", f"{got / est:.2f}" if est else "–"])
        for prof, p in row["simulated"].items():
            where = p.get("error") or " → ".join(f"{u} ({n} nodes, {ms} ms)" for u, n, ms in p["segments"])
            sim.append([row["model"], prof, where, "–" if "error" in p else f"{p['total_ms']:.3f}",
                        "–" if "error" in p or p["gain"] is None else f"{100 * p['gain']:.1f}%"])
    t3 = [[label, *(f"{1000 * v:.1f}" for v in costs.values())] for label, costs in raw["call_costs"].items()]
    runtimes = list(next(iter(raw["call_costs"].values())))
    wins = [r["model"] for r in raw["models"] if r["measured"]["chosen"] not in HOST_RUNTIMES]
    verdict = (f"A chain beat the best single runtime on: {', '.join(wins)}." if wins else
               "**No gain on this run:** on every model the best single runtime was kept (no chain beat it by "
               "more than the margin).")
    return "\n".join([
        f"One run, 1 thread (`OMP_NUM_THREADS=1`), round-robin, warmup {s['warmup']}, {s['runs']} runs per "
        f"candidate ({s['block_runs']} for the blocks timed alone, which only rank candidates); load average "
        f"{raw['load_before'][0]:.2f} before, {raw['load_after'][0]:.2f} after; {raw['seconds']} s.",
        "",
        "A chain is kept only if it beats the best single runtime by more than max(2%, 2 × spread), so the "
        "placement is never slower than the best single runtime **by construction**. A gain needs a model whose "
        "parts prefer different runtimes by more than a boundary costs (table 3): the candidates here are a "
        "hybrid conv + transformer, a CNN with LSTM and int8 forms whose Q/DQ pairs OpenVINO and LiteRT treat "
        "differently; the fastest chain's column shows how close the mixed plans came. " + verdict,
        "",
        "**Table 1: whole model per runtime (p50 / p90 ms) and the placed plan**",
        "",
        md_table(["model", "onnxruntime", "openvino", "litert", "fastest chain: p50 ms", "chosen plan",
                  "plan p50 ms", "gain vs best single"], t1),
        "",
        "**Table 2: segments of the chosen plans: estimate (blocks alone, less merged boundaries) vs measured in "
        "the chain**",
        "",
        md_table(["model", "segment", "runtime", "blocks", "est. ms", "in chain ms", "ratio"], t2),
        "",
        "**Table 3: one runtime call (the price of a boundary), µs**",
        "",
        md_table(["tensor", *runtimes], t3),
        "",
        "**Placements on NPU/GPU profiles (estimate: roofline per segment from the profile; no such unit here; "
        "outputs are checked against the whole model in the tests)**",
        "",
        md_table(["model", "profile", "segments", "est. ms", "gain vs best single unit"], sim),
    ])


def placement(work: Path, quick: bool) -> CaseResult:
    from edgekiln.targets.place_measure import Settings

    work.mkdir(parents=True, exist_ok=True)
    settings = Settings(warmup=10, runs=60, block_runs=20) if quick else Settings(warmup=50, runs=300, block_runs=60)
    raw = run(_models(work, quick), work, settings)
    return CaseResult("placement", TITLE, markdown(raw), raw)
