"""Per-segment runtime choice on this machine, measured end to end (``edgekiln place --target host``).

Segments timed alone mispredict a chain: a runtime that optimises the whole graph (OpenVINO
fuses and keeps its layout across what would be boundaries) loses that at every cut, and every
boundary costs a runtime call. So the estimates here only *rank* candidates; the pick is made on
end-to-end measurements:

1. cut the model into at most 16 blocks at tensors that are the only live activation (an int8
   model only after a QuantizeLinear; that int8 tensor is handed over as its float value, see
   :func:`float_handover`);
2. time every block alone, and the whole model, on every host runtime (LiteRT only for int8 QDQ
   blocks its ``.tflite`` writer covers, converted by ``to_tflite``, which api.py passes in since
   codegen sits above targets); a boundary on runtime r costs ``(sum of blocks alone - whole) /
   (blocks - 1)``;
3. the 3 cheapest chains by those estimates (a top-k DP over blocks), plus the whole model on each
   runtime, are the candidates;
4. every candidate runs end to end, round-robin (``execution.timing.time_round_robin``).

A chain is chosen only if it beats the best single runtime by more than
``max(2%, 2 x spread)``, where a candidate's spread is half the range of the medians of 5
consecutive slices of its samples; otherwise the best single runtime is kept, so the placement is
never slower than the best single runtime by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

MAX_BLOCKS = 16
TOP_K = 3
MIN_GAIN = 0.02          # a chain must beat the best single runtime by 2% ...
SPREAD_FACTOR = 2.0      # ... and by twice the larger p50 spread of the two


@dataclass(frozen=True)
class Block:
    index: int
    nodes: tuple[str, ...]              # ONNX node names, in order
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """Timing settings: block timing only ranks candidates, so it takes fewer runs."""

    warmup: int = 30
    runs: int = 200
    block_runs: int = 60


def _graph_proto(model: str | Path | Any) -> Any:
    """``model`` (a path or ModelProto) as a ModelProto; a path is read without its external weights."""
    if not isinstance(model, (str, Path)):
        return model
    import onnx

    return onnx.load(str(model), load_external_data=False)


def cut_blocks(model: str | Path | Any, max_blocks: int = MAX_BLOCKS) -> list[Block]:
    """The model (a path or ModelProto) in ONNX order cut at single-live tensors (int8 ones only, when
    the model has them) into at most ``max_blocks`` blocks, spread evenly over the cut points."""
    m = _graph_proto(model)
    nodes = list(m.graph.node)
    const = {i.name for i in m.graph.initializer}
    for n in nodes:                      # Constant nodes, weight DQs: outputs of constants only
        if all(x in const or x == "" for x in n.input):
            const.update(n.output)
    inputs = [i.name for i in m.graph.input if i.name not in const]
    outputs = [o.name for o in m.graph.output]
    last_read = {t: len(nodes) for t in outputs}
    for k, n in enumerate(nodes):
        for x in n.input:
            if x and x not in const:
                last_read[x] = max(last_read.get(x, -1), k)
    produced_at = {t: -1 for t in inputs} | {o: k for k, n in enumerate(nodes) for o in n.output}
    int8 = {n.output[0] for n in nodes if n.op_type == "QuantizeLinear"}
    cuts: list[tuple[int, str]] = []      # (position: the cut is before node k, the one live tensor)
    for k in range(1, len(nodes)):
        live = [t for t, p in produced_at.items() if p < k and t not in const and last_read.get(t, -1) >= k]
        if len(live) == 1:
            cuts.append((k, live[0]))
    # one cut per tensor (positions around constant-only nodes repeat it: an empty block otherwise)
    cuts = [c for k, c in enumerate(cuts) if all(c[1] != d[1] for d in cuts[:k])]
    if any(t in int8 for _, t in cuts):
        cuts = [c for c in cuts if c[1] in int8]
    if len(cuts) > max_blocks - 1:
        step = len(cuts) / (max_blocks - 1)
        cuts = [cuts[int(i * step)] for i in range(max_blocks - 1)]
    bounds = [(0, tuple(inputs)), *((k, (t,)) for k, t in cuts), (len(nodes), tuple(outputs))]
    return [Block(i, tuple(n.name or f"node{j}" for j, n in enumerate(nodes) if a <= j < b), ins, outs)
            for i, ((a, ins), (b, outs)) in enumerate(zip(bounds, bounds[1:], strict=False))]


def top_chains(alone: Sequence[Mapping[str, float | None]], boundary: Mapping[str, float], k: int = TOP_K
               ) -> list[tuple[float, tuple[str, ...]]]:
    """The ``k`` cheapest runtime assignments of the blocks: a block costs its time alone, less
    ``boundary[r]`` when it continues a segment on the same runtime r (one call fewer).

    >>> top_chains([{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 1.0}], {"a": 0.5, "b": 0.5}, k=2)
    [(2.0, ('a', 'b')), (2.5, ('b', 'b'))]
    """
    states: dict[str, list[tuple[float, tuple[str, ...]]]] = {
        r: [(float(c), (r,))] for r, c in alone[0].items() if c is not None}
    for costs in alone[1:]:
        nxt: dict[str, list[tuple[float, tuple[str, ...]]]] = {}
        for r, c in costs.items():
            if c is None:
                continue
            options = [(total + c - (boundary[r] if prev == r else 0.0), plan + (r,))
                       for prev, entries in states.items() for total, plan in entries]
            nxt[r] = sorted(options)[:k]
        states = nxt
    return sorted(e for entries in states.values() for e in entries)[:k]


def segments_of(plan: Sequence[str]) -> list[tuple[int, int, str]]:
    """Runs of equal runtimes in a per-block plan as (first block, end block, runtime).

    >>> segments_of(["a", "a", "b", "a"])
    [(0, 2, 'a'), (2, 3, 'b'), (3, 4, 'a')]
    """
    out: list[tuple[int, int, str]] = []
    for i, r in enumerate(plan):
        if out and out[-1][2] == r:
            out[-1] = (out[-1][0], i + 1, r)
        else:
            out.append((i, i + 1, r))
    return out


def spread_ms(samples: np.ndarray, slices: int = 5) -> float:
    """Half the range of the medians of ``slices`` consecutive slices of ``samples`` (ms)."""
    meds = [float(np.median(s)) for s in np.array_split(np.asarray(samples), slices) if len(s)]
    return (max(meds) - min(meds)) / 2.0 if meds else 0.0


def choose(p50: Mapping[str, float], spread: Mapping[str, float], singles: Sequence[str]) -> tuple[str, str]:
    """The chosen candidate and why: the best chain only if it beats the best single runtime by
    more than max(2%, 2 x spread).

    >>> choose({"ort": 1.0, "chain": 0.9}, {"ort": 0.01, "chain": 0.01}, ["ort"])[0]
    'chain'
    >>> choose({"ort": 1.0, "chain": 0.99}, {"ort": 0.01, "chain": 0.01}, ["ort"])[0]
    'ort'
    """
    best_single = min(singles, key=lambda s: p50[s])
    chains = [c for c in p50 if c not in singles]
    if not chains:
        return best_single, "only single runtimes were candidates"
    best_chain = min(chains, key=lambda c: p50[c])
    margin = max(MIN_GAIN * p50[best_single], SPREAD_FACTOR * max(spread[best_chain], spread[best_single]))
    gain = p50[best_single] - p50[best_chain]
    if gain > margin:
        return best_chain, f"beats {best_single} by {gain:.4f} ms > margin {margin:.4f} ms"
    return best_single, f"best chain {best_chain} gains {gain:.4f} ms <= margin {margin:.4f} ms: single runtime kept"


def measure_placement(model: Any, graph: Any, units: Sequence[Any], *, target: str, work: Path | None = None,
                      to_tflite: Callable[..., Any] | None = None, settings: Settings = Settings()
                      ) -> tuple[Any, dict[str, Any]]:
    """The measured placement of ``model`` over the host ``units`` (each with a ``runtime``) and the
    measurements (candidates, block times, boundary costs, the choice and why)."""
    import tempfile

    from edgekiln.execution.runtimes import available_runtimes
    from edgekiln.execution.timing import time_round_robin

    have = available_runtimes()
    by_rt = {u.runtime: u for u in units if have.get(u.runtime) is None}
    int8 = model.kind == "onnx-qdq"
    if not int8 or to_tflite is None:
        by_rt.pop("litert", None)
    if not by_rt:
        raise EdgekilnError(f"no runtime of {target}'s units is installed here: {', '.join(u.runtime for u in units)}")
    work = Path(work or tempfile.mkdtemp(prefix="edgekiln-place-"))
    proto = _graph_proto(model.path)      # read once for the cuts and the hand-over scales
    blocks, handover = float_handover(proto, cut_blocks(proto))
    files = _SegmentFiles(model, work, to_tflite, handover)
    feeds, values = files.values(blocks)
    calls: dict[str, Callable[[], Any]] = {}
    for r in by_rt:
        sess = files.session(0, len(blocks), r, blocks)
        if sess is not None:
            calls[f"whole:{r}"] = _call(sess, feeds)
    if len(blocks) > 1:
        for b in blocks:
            for r in by_rt:
                sess = files.session(b.index, b.index + 1, r, blocks)
                if sess is not None:
                    calls[f"{b.index}:{r}"] = _call(sess, {t: values[t] for t in b.inputs})
    ranking = {k: float(np.median(v)) for k, v in
               time_round_robin(calls, rounds=settings.block_runs, warmup=min(10, settings.warmup)).items()}
    singles = [r for r in by_rt if f"whole:{r}" in ranking]
    if not singles:
        raise EdgekilnError(f"no host runtime could run {Path(model.path).name}")
    alone = [{r: ranking.get(f"{b.index}:{r}") for r in by_rt} for b in blocks] if len(blocks) > 1 else []
    boundary = {r: max(0.0, (sum(a[r] or 0.0 for a in alone) - ranking[f"whole:{r}"]) / (len(blocks) - 1))
                if alone and all(a[r] is not None for a in alone) and r in singles else 0.0 for r in by_rt}
    # single-runtime assignments are the whole-model candidates already: the 3 best mixed ones
    plans = [p for p in (top_chains(alone, boundary, TOP_K + len(by_rt)) if alone else []) if len(set(p[1])) > 1]
    plans = plans[:TOP_K]
    cands: dict[str, tuple[list[tuple[int, int, str]], Callable[[], Any]]] = {}
    for r in singles:
        cands[r] = ([(0, len(blocks), r)], calls[f"whole:{r}"])
    chains: dict[str, Any] = {}
    for _, plan in plans:
        segs = segments_of(plan)
        label = " + ".join(f"{r}[{a}:{b}]" for a, b, r in segs)
        chains[label] = files.chain(segs, blocks)
        cands[label] = (segs, _call(chains[label], feeds))
    samples = time_round_robin({k: v[1] for k, v in cands.items()}, rounds=settings.runs, warmup=settings.warmup)
    p50 = {k: float(np.median(v)) for k, v in samples.items()}
    spread = {k: spread_ms(v) for k, v in samples.items()}
    chosen, why = choose(p50, spread, singles)
    segs = cands[chosen][0]
    in_chain = _in_chain_ms(chains[chosen], feeds, settings.block_runs) if chosen in chains else [p50[chosen]]
    est = [_segment_est(alone, boundary, ranking, a, b, r, len(blocks)) for a, b, r in segs]
    placement = _placement(target, graph, blocks, segs, by_rt, est, values, p50, singles, chosen)
    measured = {
        "blocks": len(blocks), "runtimes": [r for _, _, r in segs], "chosen": chosen, "reason": why,
        "segment_files": [str(files.path(a, b, r, blocks)) for a, b, r in segs],
        "chosen_p50_ms": p50[chosen], "best_single": min(singles, key=lambda s: p50[s]),
        "candidates": [{"label": k, "p50_ms": p50[k], "p90_ms": float(np.percentile(samples[k], 90)),
                        "spread_ms": spread[k], "chain": k not in singles} for k in sorted(p50, key=p50.__getitem__)],
        "boundary_ms": boundary, "block_alone_ms": alone,
        "segments": [{"unit": by_rt[r].name, "runtime": r, "blocks": [a, b], "est_ms": e, "in_chain_ms": m}
                     for (a, b, r), e, m in zip(segs, est, in_chain, strict=True)],
        "settings": {"warmup": settings.warmup, "runs": settings.runs, "block_runs": settings.block_runs},
    }
    return placement, measured


def _segment_est(alone: Sequence[Mapping[str, float | None]], boundary: Mapping[str, float],
                 ranking: Mapping[str, float], a: int, b: int, r: str, n: int) -> float:
    """A segment's estimate: its blocks alone, less the boundaries merged away (or the whole model)."""
    if a == 0 and b == n:
        return ranking[f"whole:{r}"]
    return sum(alone[i][r] or 0.0 for i in range(a, b)) - (b - a - 1) * boundary[r]


def _in_chain_ms(chain: Any, feeds: Mapping[str, np.ndarray], runs: int) -> list[float]:
    """Median time of each segment inside the chain (``ChainSession.last_ms``)."""
    rows = []
    for _ in range(runs):
        chain.run(dict(feeds))
        rows.append(list(chain.last_ms))
    return [float(x) for x in np.median(np.asarray(rows), axis=0)]


def _call(sess: Any, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
    names = list(sess.input_names)
    bound = {n: feeds[n] for n in names}
    return lambda: sess.run(bound)


def float_handover(model: str | Path | Any, blocks: Sequence[Block]
                   ) -> tuple[list[Block], dict[str, tuple[str, Any, Any]]]:
    """``blocks`` with every int8 cut tensor ``T`` (a QuantizeLinear output) handed over as float ``T__f``,
    and the map ``T__f -> (T, scale, zero point)``; ``model`` is a path or ModelProto.

    NOTE: onnxruntime fuses a QDQ group only when its DequantizeLinear does not read a graph input and
    its QuantizeLinear does not write a graph output, so a segment that starts or ends at an int8
    tensor runs its first and last conv in float (WP-B measured ~180 us per boundary on MobileNetV1
    int8). A segment that ends with DequantizeLinear(T) and a next one that starts with
    QuantizeLinear(T__f) at the same scale and zero point is exact (the round trip of an int8 value
    through its float value) and keeps both groups fused (~29 us per boundary).
    """
    from onnx import numpy_helper

    m = _graph_proto(model)
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    cuts = {t for b in blocks[1:] for t in b.inputs}
    handover: dict[str, tuple[str, Any, Any]] = {}
    for t in sorted(cuts):
        q = producer.get(t)
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or \
                q.input[1] not in inits or q.input[2] not in inits:
            continue
        handover[t + "__f"] = (t, numpy_helper.to_array(inits[q.input[1]]), numpy_helper.to_array(inits[q.input[2]]))
    back = {q: f for f, (q, _, _) in handover.items()}
    renamed = [Block(b.index, b.nodes, tuple(back.get(t, t) for t in b.inputs), tuple(back.get(t, t) for t in b.outputs))
               for b in blocks]
    return renamed, handover


def _with_float_handover(seg: Any, handover: Mapping[str, tuple[str, Any, Any]]) -> Any:
    """The extracted segment with its int8 cut inputs taken as float (then quantized) and its int8 cut
    outputs given as float (dequantized): see :func:`float_handover`."""
    from onnx import TensorProto, helper, numpy_helper

    back = {q: (f, s, z) for f, (q, s, z) in handover.items()}
    g = seg.graph
    front, tail = [], []
    for k, vi in enumerate(list(g.input)):
        if vi.name in back:
            f, scale, zp = back[vi.name]
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            g.initializer.extend([numpy_helper.from_array(scale, f + "_scale"), numpy_helper.from_array(zp, f + "_zp")])
            front.append(helper.make_node("QuantizeLinear", [f, f + "_scale", f + "_zp"], [vi.name], name=f + "_q"))
            g.input[k].CopyFrom(helper.make_tensor_value_info(f, TensorProto.FLOAT, dims))
    for k, vi in enumerate(list(g.output)):
        if vi.name in back:
            f, scale, zp = back[vi.name]
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            names = {i.name for i in g.initializer}
            if f + "_scale" not in names:
                g.initializer.extend([numpy_helper.from_array(scale, f + "_scale"),
                                      numpy_helper.from_array(zp, f + "_zp")])
            tail.append(helper.make_node("DequantizeLinear", [vi.name, f + "_scale", f + "_zp"], [f], name=f + "_dq"))
            g.output[k].CopyFrom(helper.make_tensor_value_info(f, TensorProto.FLOAT, dims))
    if front or tail:
        nodes = [*front, *g.node, *tail]
        del g.node[:]
        g.node.extend(nodes)
    return seg


def _set_dims(value_info: Any, shape: Sequence[int]) -> None:
    dims = value_info.type.tensor_type.shape
    dims.ClearField("dim")
    for d in shape:
        dims.dim.add().dim_value = int(d)


def _pinned(proto: Any, inputs: Sequence[Any]) -> Any:
    """``proto`` with its inputs at the artifact's concrete shapes and stale inferred shapes dropped, so
    shape inference makes every block's boundary static (OpenVINO compiles a dynamic input as a
    dynamic model: several times slower)."""
    fixed = {s.name: s.shape for s in inputs if all(isinstance(d, int) and d > 0 for d in s.shape)}
    for vi in proto.graph.input:
        if vi.name in fixed:
            _set_dims(vi, fixed[vi.name])
    del proto.graph.value_info[:]
    return proto


class _SegmentFiles:
    """Segment files (ONNX; ``.tflite`` for LiteRT) and sessions of block ranges, made once each."""

    def __init__(self, model: Any, work: Path, to_tflite: Callable[..., Any] | None,
                 handover: Mapping[str, tuple[str, Any, Any]] | None = None) -> None:
        self.model, self.work, self.to_tflite = model, work, to_tflite
        self.handover = dict(handover or {})      # float name -> (int8 name, scale, zero point)
        self.extractors: dict[str, Any] = {}
        self.paths: dict[tuple[int, int, str], Path | None] = {}
        self.sessions: dict[tuple[int, int, str], Any] = {}
        self.feeds: dict[str, np.ndarray] = {}
        self.tensors: dict[str, np.ndarray] = {}

    def _extractor(self, form: str) -> Any:
        """Extractor over the model as stored ("onnx") or with its recorded Q/DQ pairs put back ("integer")."""
        if form not in self.extractors:
            import onnx
            from onnx.utils import Extractor

            from edgekiln.models.qdq_pairs import restore_qdq_pairs

            proto = _pinned(onnx.load(str(self.model.path)), self.model.inputs)
            if form == "integer":
                restore_qdq_pairs(proto)
            self.extractors[form] = Extractor(onnx.shape_inference.infer_shapes(proto, data_prop=True))
        return self.extractors[form]

    def values(self, blocks: Sequence[Block]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Random model inputs (seed 0) and every block boundary's tensor computed from them."""
        from edgekiln.execution.feeds import random_feeds

        self.feeds = random_feeds(self.model.inputs, seed=0)
        values = dict(self.feeds)
        for b in blocks:
            sess = self.session(b.index, b.index + 1, "onnxruntime", blocks)
            values.update(zip(sess.output_names, sess.run({t: values[t] for t in sess.input_names}), strict=True))
        self.tensors = values
        self.paths.clear()          # rewritten with every block input's measured shape (static for OpenVINO)
        self.sessions.clear()
        return self.feeds, values

    def path(self, a: int, b: int, runtime: str, blocks: Sequence[Block]) -> Path | None:
        key = (a, b, runtime)
        if key not in self.paths:
            from edgekiln.fileio import atomic_save_onnx

            # LiteRT's writer needs every Q/DQ pair: a form that left some out for OpenVINO recorded them
            form = "integer" if runtime == "litert" else "onnx"
            onnx_key = (a, b, form)
            if onnx_key not in self.paths:
                orig = {f: q for f, (q, _, _) in self.handover.items()}
                seg = self._extractor(form).extract_model([orig.get(t, t) for t in blocks[a].inputs],
                                                          [orig.get(t, t) for t in blocks[b - 1].outputs])
                seg = _with_float_handover(seg, self.handover)
                for vi in seg.graph.input:          # a dynamic dim left by shape inference: the measured one
                    if vi.name in self.tensors:
                        _set_dims(vi, self.tensors[vi.name].shape)
                suffix = "_integer" if form == "integer" else ""
                self.paths[onnx_key] = atomic_save_onnx(self.work / f"blocks_{a}_{b}{suffix}.onnx", seg)
            src = self.paths[onnx_key]
            if runtime != "litert":
                self.paths[key] = src
            else:
                assert src is not None and self.to_tflite is not None
                out = self.work / f"blocks_{a}_{b}_litert"
                res = self.to_tflite(src, out, {t: self.tensors[t] for t in blocks[a].inputs}, None)
                self.paths[key] = Path(res["path"]) if "path" in res else None
        return self.paths[key]

    def session(self, a: int, b: int, runtime: str, blocks: Sequence[Block]) -> Any:
        from edgekiln.execution.runtimes import load_session

        key = (a, b, runtime)
        if key not in self.sessions:
            path = self.path(a, b, runtime, blocks)
            try:
                self.sessions[key] = None if path is None else load_session(path, runtime, threads=1)
            except EdgekilnError:
                self.sessions[key] = None      # this runtime cannot run this block: not a candidate
        return self.sessions[key]

    def chain(self, segs: Sequence[tuple[int, int, str]], blocks: Sequence[Block]) -> Any:
        from edgekiln.execution.chain import ChainSession, SegmentSpec

        specs = [SegmentSpec(file=self.path(a, b, r, blocks) or "", runtime=r, inputs=blocks[a].inputs,
                             outputs=blocks[b - 1].outputs) for a, b, r in segs]
        return ChainSession(specs, threads=1, outputs=list(blocks[-1].outputs))


def _placement(target: str, graph: Any, blocks: Sequence[Block], segs: Sequence[tuple[int, int, str]],
               by_rt: Mapping[str, Any], est: Sequence[float], values: Mapping[str, np.ndarray],
               p50: Mapping[str, float], singles: Sequence[str], chosen: str) -> Any:
    from edgekiln.targets.placement import Placement, Segment

    out_of = {}
    for k, (a, b, _) in enumerate(segs):
        for blk in blocks[a:b]:
            out_of.update({name: k for name in blk.nodes})
    macs = [0] * len(segs)
    for node in getattr(graph, "nodes", ()):     # a coarse node's MACs go to the segment of its first member
        k = next((out_of[m] for m in (node.members or (node.name,)) if m in out_of), None)
        if k is not None:
            macs[k] += int(node.macs)

    def nbytes(names: Sequence[str]) -> int:
        return int(sum(values[t].nbytes for t in names if t in values))

    segments = tuple(Segment(index=k, unit=by_rt[r].name, nodes=tuple(n for blk in blocks[a:b] for n in blk.nodes),
                             inputs=blocks[a].inputs, outputs=blocks[b - 1].outputs, macs=macs[k],
                             compute_ms=float(e), launch_ms=0.0, transfer_ms=0.0,
                             transfer_in_bytes=nbytes(blocks[a].inputs), transfer_out_bytes=nbytes(blocks[b - 1].outputs),
                             energy_mj=None, source="measured", runtime=r)
                     for k, ((a, b, r), e) in enumerate(zip(segs, est, strict=True)))
    best = min(p50[s] for s in singles)
    return Placement(target=target, objective="latency", segments=segments, fallback=(),
                     total_ms=p50[chosen], total_energy_mj=None,
                     single_unit={by_rt[s].name: p50[s] for s in singles}, gain=(best - p50[chosen]) / best)
