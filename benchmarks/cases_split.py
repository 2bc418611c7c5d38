"""Bench case ``split``: the split planner's choice against every valid cut, measured over a
shaped network (:mod:`benchmarks.netns`) at 1, 10 and 100 Mbit/s.

For each model the planner gets per-node latencies profiled on this machine (device = this
machine's time times ``DEVICE_FACTOR``, the device process emulating that slowdown by waiting
after each local compute), the cut tensor sizes, the shaped bandwidth and the round trip it
measures itself (a small HTTP request over the same link). Then every valid cut is run end to
end (head on the device, npz over HTTP, tail on the FastAPI tail server) and timed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.suite import CaseResult

BANDWIDTHS_MBIT = (1.0, 10.0, 100.0)
DELAY_MS = 2.0            # round-trip delay on the link
DEVICE_FACTOR = 30.0      # the device is this many times slower than this machine
TOLERANCE = 0.05          # chosen cut within 5% of the best measured cut
REPEATS, REPEATS_QUICK = 21, 7   # requests per cut at 10 and 100 Mbit/s (3 at 1 Mbit/s, where one takes ~1 s)


def _conv(name: str, x: str, y: str, cin: int, cout: int, k: int, rng: np.random.Generator) -> tuple[Any, list[Any]]:
    from onnx import helper, numpy_helper

    w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    node = helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, pads=[k // 2] * 4)
    return node, [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]


def _model(nodes: list[Any], inits: list[Any], name: str, in_shape: list[int], path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    from edgekiln.fileio import atomic_save_onnx

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln-benchmarks")
    onnx.checker.check_model(model, full_check=True)
    return atomic_save_onnx(path, model)


def chain_cnn(path: Path, seed: int = 0) -> Path:
    """3x64x64 -> a cheap stem that shrinks the data 6x (conv 3->8, pool 4) -> three heavier
    convs (128, 256, 256 channels) -> fc: 13 nodes in a chain, 60M MACs."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    h = helper.make_node
    pool = lambda x, y, k: h("MaxPool", [x], [y], name=f"pool_{y}", kernel_shape=[k, k], strides=[k, k])  # noqa: E731
    stem, w0 = _conv("stem", "input", "s", 3, 8, 3, rng)
    c1, w1 = _conv("conv1", "p0", "c1", 8, 128, 3, rng)
    c2, w2 = _conv("conv2", "p1", "c2", 128, 256, 3, rng)
    c3, w3 = _conv("conv3", "r2", "c3", 256, 256, 3, rng)
    fc = (rng.standard_normal((10, 256 * 16)) * 0.02).astype(np.float32)
    nodes = [stem, h("Relu", ["s"], ["sr"], name="stem_relu"), pool("sr", "p0", 4),
             c1, h("Relu", ["c1"], ["r1"], name="relu1"), pool("r1", "p1", 2),
             c2, h("Relu", ["c2"], ["r2"], name="relu2"), c3, h("Relu", ["c3"], ["r3"], name="relu3"),
             pool("r3", "p3", 2), h("Flatten", ["p3"], ["flat"], name="flatten"),
             h("Gemm", ["flat", "fc.w"], ["logits"], name="fc", transB=1)]
    return _model(nodes, [*w0, *w1, *w2, *w3, numpy_helper.from_array(fc, "fc.w")], "chain_cnn", [1, 3, 64, 64],
                  path)


def branchy_cnn(path: Path, seed: int = 0) -> Path:
    """A residual block and a two-branch concat: stem (conv, pool 4) -> conv, conv + skip ->
    (3x3 | 1x1 branches, 128 channels each) -> concat -> pool -> conv 256->256 -> pool -> fc: 17
    nodes, 41M MACs."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    h = helper.make_node
    stem, w0 = _conv("stem", "input", "s", 3, 8, 3, rng)
    ca, w1 = _conv("res_a", "p0", "a", 8, 8, 3, rng)
    cb, w2 = _conv("res_b", "ar", "b", 8, 8, 3, rng)
    left, w3 = _conv("left", "rr", "lft", 8, 128, 3, rng)
    right, w4 = _conv("right", "rr", "rgt", 8, 128, 1, rng)
    post, w5 = _conv("post", "p1", "q", 256, 256, 3, rng)
    fc = (rng.standard_normal((10, 256 * 16)) * 0.02).astype(np.float32)
    nodes = [
        stem, h("Relu", ["s"], ["sr"], name="stem_relu"),
        h("MaxPool", ["sr"], ["p0"], name="pool0", kernel_shape=[4, 4], strides=[4, 4]),
        ca, h("Relu", ["a"], ["ar"], name="res_a_relu"), cb,
        h("Add", ["p0", "b"], ["res"], name="residual_add"), h("Relu", ["res"], ["rr"], name="res_relu"),
        left, right, h("Concat", ["lft", "rgt"], ["cat"], name="concat", axis=1),
        h("Relu", ["cat"], ["catr"], name="concat_relu"),
        h("MaxPool", ["catr"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        post, h("Relu", ["q"], ["qr"], name="post_relu"),
        h("MaxPool", ["qr"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        h("Flatten", ["p2"], ["flat"], name="flatten"), h("Gemm", ["flat", "fc.w"], ["logits"], name="fc", transB=1),
    ]
    inits = [*w0, *w1, *w2, *w3, *w4, *w5, numpy_helper.from_array(fc, "fc.w")]
    return _model(nodes, inits, "branchy_cnn", [1, 3, 64, 64], path)


def measure_all_cuts(model: Path, link: Any, work: Path, *, bandwidths_mbit: tuple[float, ...] = BANDWIDTHS_MBIT,
                     delay_ms: float = DELAY_MS, device_factor: float = DEVICE_FACTOR, repeats: int = 7,
                     port: int = 18790) -> dict[str, Any]:
    """Plan and measure every valid cut of ``model`` at each bandwidth over ``link`` (a
    :class:`~benchmarks.netns.ShapedLink` that is already up)."""
    from edgekiln.runtime.split_exec import cut_model
    from edgekiln.runtime.split_plan import breakpoints, evaluate, plan, valid_splits
    from edgekiln.runtime.split_profile import split_graph

    work.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.save(work / "x.npy", x)
    graph = split_graph(model, {"input": x}, device_factor=device_factor, runs=50)
    every = frozenset(n.name for n in graph.nodes)
    tails = work / "tails"
    tails.mkdir(exist_ok=True)
    cuts, by_nodes = [], {}
    for i, nodes in enumerate(valid_splits(graph)):
        cid = f"c{i}"
        sent = list(evaluate(graph, nodes, bandwidth_bps=1e7, rtt_ms=0.0).sent)
        if nodes == every:
            cut = {"id": cid, "head": None, "full": str(model), "sent": []}
        elif not nodes:
            shutil.copyfile(model, tails / f"tail_{cid}.onnx")
            cut = {"id": cid, "head": None, "full": None, "sent": sent}
        else:
            head, tail = cut_model(model, sent, work / "parts" / cid)
            shutil.move(str(tail), tails / f"tail_{cid}.onnx")
            cut = {"id": cid, "head": str(head), "full": None, "sent": sent}
        cuts.append(cut)
        by_nodes[nodes] = cid
    qdisc = link.shape(rate_mbit=bandwidths_mbit[0], delay_ms=delay_ms)
    server = link.popen(link.server_ns, [sys.executable, "-m", "benchmarks.netns", "serve", str(tails), "--port",
                                          str(port), "--delay-ms", str(link.delay_in_server_ms)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = []
    try:
        for bw in bandwidths_mbit:
            link.shape(rate_mbit=bw, delay_ms=delay_ms)
            job = {"input": str(work / "x.npy"), "input_name": "input", "output_name": "logits",
                   "device_factor": device_factor, "url": f"http://{_server_ip()}:{port}",
                   "repeats": 3 if bw < 10 else repeats, "cuts": cuts}
            (work / "job.json").write_text(json.dumps(job))
            out = work / f"measured-{bw:g}.json"
            proc = link.popen(link.device_ns, [sys.executable, "-m", "benchmarks.netns", "measure",
                                               str(work / "job.json"), str(out)], stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"measuring at {bw} Mbit/s failed: {err.strip().splitlines()[-1:]}")
            measured = json.loads(out.read_text())
            median = {cid: float(np.median(t)) for cid, t in measured["times_ms"].items()}
            link_bw, link_rtt = measured["link"]["bandwidth_bps"], measured["link"]["rtt_ms"]
            # The planner as deployed: the link model the device measured (probe_link) ...
            chosen = plan(graph, bandwidth_bps=link_bw, rtt_ms=link_rtt)
            table = breakpoints(graph, rtt_ms=link_rtt)
            # ... and, for comparison, given only the nominal shaped rate and a ping round trip.
            nominal = plan(graph, bandwidth_bps=bw * 1e6, rtt_ms=measured["rtt_ms"])
            best_cid = min(median, key=median.__getitem__)
            all_dev, all_srv = median[by_nodes[every]], median[by_nodes[frozenset()]]
            cid = by_nodes[chosen.device_nodes]
            results.append({
                "bandwidth_mbit": bw, "ping_rtt_ms": measured["rtt_ms"], "link": measured["link"], "qdisc": qdisc,
                "chosen": chosen.label, "chosen_cut": cid, "predicted_ms": chosen.latency_ms, "chosen_ms": median[cid],
                "nominal_choice": nominal.label, "nominal_ms": median[by_nodes[nominal.device_nodes]],
                "best_ms": median[best_cid], "best": _label(cuts[int(best_cid[1:])]), "all_device_ms": all_dev,
                "all_server_ms": all_srv, "table_agrees": table.lookup(link_bw).device_nodes == chosen.device_nodes,
                "valid_cuts": len(cuts), "median_ms": median, "device_part_ms": measured["device_ms"],
            })
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"model": model.stem, "nodes": len(graph.nodes), "device_factor": device_factor, "delay_ms": delay_ms,
            "results": results}


def _server_ip() -> str:
    from benchmarks.netns import SERVER_IP

    return SERVER_IP


def _label(cut: dict[str, Any]) -> str:
    if cut["full"]:
        return "all-device"
    return "all-server" if not cut["head"] else "cut at " + ", ".join(cut["sent"])


def split_netns(work: Path, quick: bool) -> CaseResult:
    from benchmarks.netns import ShapedLink, unusable_reason
    from edgekiln.report import md_table

    reason = unusable_reason()
    if reason:
        return CaseResult("split", "Split computing over a shaped network", f"Not run: {reason}.",
                          {"skipped": reason})
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    models = [chain_cnn(work / "chain_cnn.onnx"), branchy_cnn(work / "branchy_cnn.onnx")]
    runs = []
    with ShapedLink(tag="bnch") as link:
        for m in models:
            runs.append(measure_all_cuts(m, link, work / m.stem, repeats=REPEATS_QUICK if quick else REPEATS))
    rows, ok_all = [], True
    for r in runs:
        for b in r["results"]:
            within = b["chosen_ms"] <= b["best_ms"] * (1 + TOLERANCE)
            not_worse = b["chosen_ms"] <= min(b["all_device_ms"], b["all_server_ms"]) * (1 + TOLERANCE / 5)
            ok_all &= within and not_worse
            rows.append([r["model"], f"{b['bandwidth_mbit']:g}",
                         f"{b['link']['bandwidth_bps'] / 1e6:.3g} Mbit/s + {b['link']['rtt_ms']:.2f} ms",
                         b["valid_cuts"], b["chosen"], b["predicted_ms"], b["chosen_ms"], b["best"], b["best_ms"],
                         b["all_device_ms"], b["all_server_ms"], f"{100 * (b['chosen_ms'] / b['best_ms'] - 1):+.1f}%",
                         f"{b['nominal_choice']}: {100 * (b['nominal_ms'] / b['best_ms'] - 1):+.1f}%",
                         "yes" if b["table_agrees"] else "no"])
    qdisc = runs[0]["results"][0]["qdisc"]
    how = ("`tc netem` (delay + rate) on both veth ends" if qdisc == "netem" else
           "`tc tbf` (rate) on both veth ends; this kernel has no `sch_netem`, so the round-trip delay is added by "
           "the tail server before it answers")
    md = "\n\n".join([
        f"Device and server in two network namespaces joined by a veth pair (10.213.77.0/30), shaped with {how}. "
        f"Round-trip delay {DELAY_MS:g} ms; the device is emulated {DEVICE_FACTOR:g}x slower than this machine (after each "
        f"head run it stays busy for {DEVICE_FACTOR - 1:g}x that head's fastest run). "
        f"Every valid cut measured end to end (head, npz over HTTP, FastAPI tail server), median of "
        f"{REPEATS_QUICK if quick else REPEATS} requests per cut (3 at 1 Mbit/s), in rounds with the cuts in a "
        f"shuffled order; the device and server processes run at nice -10 (this host is shared). The planner is given the profiled "
        f"per-node latencies and the link as the device measures it (`probe_link`: POST bodies of 0, 16 and 64 KiB to "
        f"the server, fit latency = RTT + bytes / bandwidth). The 'planned on nominal rate + ping' column is the "
        f"planner given only the nominal rate and a GET round trip instead: where the probed link differs from the "
        f"nominal one (short bodies pass faster than the rate at 100 Mbit/s) and the cuts are close, it picks worse.",
        md_table(["model", "shaped Mbit/s", "probed link", "valid cuts", "planner's choice", "predicted ms",
                  "measured ms", "best measured cut", "best ms", "all-device ms", "all-server ms", "choice vs best",
                  "planned on nominal rate + ping", "breakpoint table agrees"], rows),
        f"Done-when (chosen within {100 * TOLERANCE:.0f}% of the best cut and not worse than the better of "
        f"all-device / all-server): **{'met' if ok_all else 'not met'}** on every model and bandwidth above."
        if ok_all else "Done-when: **not met** on at least one row above (see the 'choice vs best' column).",
    ])
    return CaseResult("split", "Split computing over a shaped network (netns + tc)", md,
                      {"runs": runs, "all_met": ok_all, "qdisc": qdisc})
