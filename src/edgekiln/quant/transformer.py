"""Graph rewrites that make dynamic int8 transformers (BERT-style encoders) fast and accurate on
onnxruntime. Each one keeps the float function (up to float rounding) and is checked by the caller.

Measured on all-MiniLM-L6-v2 (seq 64, 1 thread, onnxruntime 1.31, thread CPU time):

* **Soft attention-mask fill.** Exporters fill masked attention scores with ``finfo(float32).min``.
  The softmax then evaluates ``exp`` far below its normal range, where onnxruntime's vectorized
  exp takes a slow path: a (1, 12, 64, 64) softmax took 183 us with padded keys vs 23 us without.
  With a fill of -40 a masked key weighs ``exp(-40 + its score - the top score)`` relative to the
  top key: below 1e-13 unless its raw score beats the top one by more than 10. On FP32 MiniLM -40
  gave bit-identical embeddings and 1.7 ms less per call (-87 made it 2x *slower*: exp results
  in the denormal range). With calibration data the quantize pass checks that outputs did not move.
* **Residual adds kept out of SkipLayerNormalization.** onnxruntime fuses ``Add -> LayerNormalization``
  into its SkipLayerNormalization kernel, which ran 6.4x slower single-threaded than the two ops it
  replaces (125 vs 19.5 us at (1, 64, 384)). Writing the add as ``Sum`` (same math) keeps it unfused.
  Whether the fusion is slower is measured on the spot (:func:`skip_layernorm_is_slower`).
* **Per-row int8 embedding tables.** One scale per table row (per token) instead of one per table.
* **Activation smoothing** (SmoothQuant, Xiao et al. 2023) for per-tensor dynamic activations:
  channel k of a MatMul input is divided by ``s_k`` and row k of its weight multiplied by it, with
  ``s_k = max|x_k|^alpha / max|w_k|^(1-alpha)`` from calibration data, so a few outlier channels no
  longer set the quantization step for all of them. The division is an explicit Mul (BERT's
  LayerNorm outputs also feed the residual path, so it cannot be folded into LayerNorm).

For **static** int8 (:func:`prepare_static`) the same rewrites apply, only the weighted MatMuls
are quantized, and :func:`split_outlier_rows` keeps the [CLS] row of the FFN down-projections in
float: on MiniLM the [CLS] row's input peaks at 24.7 where other tokens' 99.9th percentile is 2.7,
and one static scale for both costs cosine (smoothing 0.5: static int8 of every tensor 0.03; of the
weighted MatMul inputs, outputs float: 0.996; with the rows split: 0.9985; NNCF: 0.991, min 0.966).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekiln.quant.correction import consumers as graph_consumers

MASK_FILL = -40.0            # see the module doc: exp(-40) is 4e-18, far from float32's denormals
HUGE_NEGATIVE = -1e30        # constants at or below this are treated as "minus infinity" mask fills


@dataclass
class RewriteReport:
    mask_fills: int = 0                  # constants softened to MASK_FILL
    residual_sums: int = 0               # Add -> LayerNormalization written as Sum
    embedding_tables: list[str] = field(default_factory=list)   # Gather tables stored int8 per row
    smoothed: dict[str, float] = field(default_factory=dict)    # MatMul input -> activation range shrink factor
    outlier_rows: dict[str, int] = field(default_factory=dict)  # static int8: MatMul -> leading rows kept float

    def to_dict(self) -> dict[str, Any]:
        out = {"mask_fills": self.mask_fills, "residual_sums": self.residual_sums,
               "embedding_tables": list(self.embedding_tables), "smoothed": dict(self.smoothed)}
        if self.outlier_rows:
            out["outlier_rows"] = dict(self.outlier_rows)
        return out


def soften_mask_fills(model: Any, fill: float = MASK_FILL) -> int:
    """Replace float constants that are all ``<= -1e30`` (the "minus infinity" of attention masks)
    by ``fill``, in place, when they feed a Softmax. Returns how many were replaced."""
    from onnx import numpy_helper

    feeds_softmax = ancestors(model, {i for n in model.graph.node if n.op_type == "Softmax" for i in n.input})
    count = 0
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in feeds_softmax:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and _is_fill(numpy_helper.to_array(attr.t)):
                arr = numpy_helper.to_array(attr.t)
                attr.t.CopyFrom(numpy_helper.from_array(np.full_like(arr, fill), attr.t.name))
                count += 1
    for init in model.graph.initializer:
        if init.name in feeds_softmax:
            arr = numpy_helper.to_array(init)
            if _is_fill(arr):
                init.CopyFrom(numpy_helper.from_array(np.full_like(arr, fill), init.name))
                count += 1
    return count


def _is_fill(arr: np.ndarray) -> bool:
    return arr.dtype in (np.float32, np.float64) and arr.size > 0 and bool((arr <= HUGE_NEGATIVE).all())


def ancestors(model: Any, names: set[str]) -> set[str]:
    """Every tensor ``names`` are computed from (``names`` included), through the graph's nodes."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return seen


def residual_adds_as_sum(model: Any) -> int:
    """Write every ``Add`` whose only consumers are LayerNormalization nodes as ``Sum`` (in place),
    which onnxruntime does not fuse into SkipLayerNormalization. Returns the count."""
    consumers = graph_consumers(model)
    count = 0
    for node in model.graph.node:
        users = consumers.get(node.output[0], []) if node.op_type == "Add" else []
        if users and all(u.op_type == "LayerNormalization" for u in users):
            node.op_type = "Sum"
            count += 1
    return count


def skip_layernorm_is_slower(hidden: int, tokens: int = 64, runs: int = 300) -> bool:
    """Whether onnxruntime's fused SkipLayerNormalization is slower than Add + LayerNormalization
    on this machine (1 thread, thread CPU time, ``(1, tokens, hidden)``)."""
    import time

    from onnx import TensorProto, helper, numpy_helper

    from edgekiln.execution.ort import ort_session
    from edgekiln.execution.timing import time_round_robin

    def model(add_op: str) -> Any:
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, tokens, hidden]) for n in ("a", "b", "y")]
        inits = [numpy_helper.from_array(np.ones(hidden, np.float32), "g"),
                 numpy_helper.from_array(np.zeros(hidden, np.float32), "z")]
        graph = helper.make_graph([helper.make_node(add_op, ["a", "b"], ["s"]),
                                   helper.make_node("LayerNormalization", ["s", "g", "z"], ["y"], axis=-1)],
                                  "ln", io[:2], io[2:], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((1, tokens, hidden)).astype(np.float32) for k in ("a", "b")}
    sessions = {op: ort_session(model(op)) for op in ("Add", "Sum")}
    t = time_round_robin({op: functools.partial(s.run, None, feeds) for op, s in sessions.items()}, rounds=runs,
                         warmup=20, clock=time.thread_time_ns)
    return float(np.median(t["Add"])) > 1.2 * float(np.median(t["Sum"]))


def embedding_tables_per_row(model: Any, min_elements: int = 4096, skip: set[str] | frozenset[str] = frozenset()
                             ) -> list[str]:
    """Store every float Gather table (axis 0, at least ``min_elements``) as int8 with one
    symmetric scale per row, in place: ``Gather(q) -> Cast -> Mul(Gather(scales))``. Returns the
    table names. Rows are what a Gather reads, so each gathered vector keeps its own full range."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = []
    new_nodes = []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.name not in skip else None
        if table is None or axis != 0 or table.data_type != TensorProto.FLOAT or len(table.dims) != 2 \
                or int(np.prod(table.dims)) < min_elements:
            continue
        w = numpy_helper.to_array(table).astype(np.float64)
        scale = np.abs(w).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        qname, sname = f"{table.name}_int8", f"{table.name}_row_scale"
        model.graph.initializer.extend([numpy_helper.from_array(q, qname),
                                        numpy_helper.from_array(scale.astype(np.float32)[:, None], sname)])
        out = node.output[0]
        base = node.name or out
        node.input[0] = qname
        node.output[0] = f"{out}_int8"
        new_nodes.append((node, [
            helper.make_node("Gather", [sname, node.input[1]], [f"{out}_scale"], name=f"{base}_scale"),
            helper.make_node("Cast", [f"{out}_int8"], [f"{out}_float"], name=f"{base}_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out], name=f"{base}_dequant")]))
        done.append(table.name)
    _insert_after(model, new_nodes)
    _drop_unused_initializers(model)
    return done


def smooth_activations(model: Any, feeds: Sequence[dict[str, np.ndarray]], *, alpha: float = 0.5,
                       min_shrink: float = 1.5, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, float]:
    """Migrate activation outliers of MatMul inputs into the weights (in place).

    Only inputs whose per-tensor range shrinks by at least ``min_shrink`` are rewritten (each costs
    one elementwise Mul at run time); MatMuls named in ``skip`` (kept float) are left alone.
    Returns input name -> range shrink factor.
    """
    from onnx import helper, numpy_helper

    from edgekiln.quant.correction import tensor_values

    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 \
                and node.input[0] not in inits:
            groups.setdefault(node.input[0], []).append(node)
    shared = _weight_users(model)
    groups = {x: g for x, g in groups.items() if all(shared[n.input[1]] == 1 and n.name not in skip for n in g)}
    if not groups or not feeds:
        return {}
    acts = tensor_values(model, list(feeds), list(groups))
    report: dict[str, float] = {}
    new_nodes = []
    for x, nodes in groups.items():
        if x not in acts:
            continue
        a = np.abs(acts[x]).reshape(-1, acts[x].shape[-1]).max(0).astype(np.float64)
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in nodes]
        w = np.max([np.abs(wt).max(1) for wt in weights], axis=0)
        if a.shape != w.shape:
            continue
        s = np.where((a > 0) & (w > 0), a ** alpha / np.maximum(w, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s / np.exp(np.log(s).mean()), 1e-3, 1e3)   # geometric mean 1: weights keep their scale
        shrink = float(a.max() / (a / s).max())
        if shrink < min_shrink:
            continue
        sname = f"{x}_smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), sname))
        for n, wt in zip(nodes, weights, strict=True):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((wt * s[:, None]).astype(np.float32), n.input[1]))
            n.input[0] = f"{x}_smoothed"
        new_nodes.append((x, helper.make_node("Mul", [x, sname], [f"{x}_smoothed"], name=f"{x}_smooth")))
        report[x] = round(shrink, 2)
    _insert_after_tensor(model, new_nodes)
    return report


def is_attention_model(model: Any) -> bool:
    """Whether the graph looks like a transformer encoder/decoder: weighted MatMul/Gemm layers,
    a Softmax and a LayerNormalization, and no convolution."""
    inits = {i.name for i in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    weighted = any(n.op_type in ("MatMul", "Gemm") and n.input[1] in inits for n in model.graph.node)
    return weighted and {"Softmax", "LayerNormalization"} <= ops and not ops & {"Conv", "ConvTranspose"}


def split_outlier_rows(model: Any, feeds: Sequence[dict[str, np.ndarray]], *, ratio: float = 3.0,
                       max_rows: int = 4, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
    """Compute the leading token rows that carry massive activations in float, in place.

    Transformers put activations tens of times larger than any other on fixed leading tokens
    ([CLS]/BOS; Sun et al. 2024, "Massive Activations in Large Language Models"). One static
    activation scale must cover them and then resolves every other token coarsely. For a weighted
    MatMul whose input rows ``0..k-1`` (token axis -2) exceed ``ratio`` times the 99th percentile of
    the other rows' maxima in every calibration sample, the node is rewritten as
    ``Concat(MatMul(x[..., :k, :], W) float, MatMul(x[..., k:, :], W))``: the original node (same
    name, same weight) keeps the rest of the rows. Returns node name -> k.
    """
    from onnx import helper, numpy_helper

    from edgekiln.quant.correction import tensor_values

    inits = {i.name for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and n.input[0] not in inits and n.name and n.name not in skip]
    if not nodes or not feeds:
        return {}
    acts = tensor_values(model, list(feeds), sorted({n.input[0] for n in nodes}))
    heads: dict[str, int] = {}
    for x, a in acts.items():
        if a.ndim < 3 or a.shape[-2] <= 2 * max_rows:
            continue
        row_max = np.abs(a).max(-1).reshape(-1, a.shape[-2])           # (samples, tokens)
        base = float(np.percentile(row_max[:, max_rows:], 99))
        k = 0
        while k < max_rows and base > 0 and row_max[:, k].min() > ratio * base:
            k += 1
        if k:
            heads[x] = k
    if not heads:
        return {}
    model.graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), f"rows_split_{v}")
                                    for v in sorted({0, 1 << 30, -2, *heads.values()})])
    slices = [(x, helper.make_node("Slice", [x, "rows_split_0", f"rows_split_{k}", "rows_split_-2"], [f"{x}_head_rows"],
                                   name=f"{x}/head_rows")) for x, k in heads.items()]
    slices += [(x, helper.make_node("Slice", [x, f"rows_split_{k}", f"rows_split_{1 << 30}", "rows_split_-2"],
                                    [f"{x}_other_rows"], name=f"{x}/other_rows")) for x, k in heads.items()]
    _insert_after_tensor(model, slices)   # NOTE: rebuilds the node list: look the nodes up again
    names = {n.name for n in nodes if n.input[0] in heads}
    done: dict[str, int] = {}
    extra = []
    for n in model.graph.node:
        if n.name not in names:
            continue
        x, y = n.input[0], n.output[0]
        n.input[0], n.output[0] = f"{x}_other_rows", f"{y}_other_rows"
        extra.append((n, [helper.make_node("MatMul", [f"{x}_head_rows", n.input[1]], [f"{y}_head_rows"],
                                           name=f"{n.name}/head_rows"),
                          helper.make_node("Concat", [f"{y}_head_rows", f"{y}_other_rows"], [y],
                                           name=f"{n.name}/rows", axis=-2)]))
        done[n.name] = heads[x]
    _insert_after(model, extra)
    return done


def prepare_static(model: Any, feeds: Sequence[dict[str, np.ndarray]], *, alpha: float | None,
                   embeddings: bool = True, outlier_rows: bool = True,
                   skip: set[str] | frozenset[str] = frozenset()) -> tuple[RewriteReport, list[str]]:
    """Rewrite a transformer for static int8 (in place) and name the nodes to quantize: only the
    weighted MatMul/Gemm layers (LayerNorm, Softmax, GELU and the mask arithmetic stay float, as
    NNCF's transformer mode does), with the mask fill softened (if outputs do not move),
    activations smoothed, embedding tables int8 per row and massive-activation rows in float."""
    report = RewriteReport()
    report.mask_fills = soften_mask_fills_if_harmless(model, feeds)
    if alpha is not None:
        report.smoothed = smooth_activations(model, feeds[:32], alpha=alpha, skip=skip)
    if embeddings:
        report.embedding_tables = embedding_tables_per_row(model, skip=skip)
    if outlier_rows:
        report.outlier_rows = split_outlier_rows(model, feeds[:32], skip=skip)
    inits = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits
             and n.name not in skip and not n.name.endswith("/head_rows")]
    return report, nodes


def soften_mask_fills_if_harmless(model: Any, feeds: Sequence[dict[str, np.ndarray]]) -> int:
    """:func:`soften_mask_fills`, undone when the outputs on the first calibration samples move
    (without samples the fill is kept soft). Returns how many fills were softened."""
    import onnx

    before = onnx.ModelProto()
    before.CopyFrom(model)
    count = soften_mask_fills(model)
    if count and feeds and not same_outputs(before, model, list(feeds[:4])):
        model.CopyFrom(before)
        return 0
    return count


def same_outputs(a: Any, b: Any, feeds: list[dict[str, np.ndarray]], rel: float = 1e-5) -> bool:
    """Whether two float models give the same outputs on ``feeds`` (to ``rel`` of the output range)."""
    from edgekiln.quant.correction import tensor_values

    names = [o.name for o in a.graph.output]
    ya, yb = tensor_values(a, feeds, names), tensor_values(b, feeds, names)
    return all(np.abs(ya[n] - yb[n]).max() <= rel * max(float(np.abs(ya[n]).max()), 1e-12) for n in names)


def _weight_users(model: Any) -> dict[str, int]:
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    return users


def _insert_after(model: Any, pairs: list[tuple[Any, list[Any]]]) -> None:
    """Insert each list of new nodes right after its anchor node (keeps topological order)."""
    after = {id(anchor): extra for anchor, extra in pairs}
    nodes = []
    for n in model.graph.node:
        nodes.append(n)
        nodes.extend(after.get(id(n), []))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _insert_after_tensor(model: Any, pairs: list[tuple[str, Any]]) -> None:
    """Insert each new node right after the producer of its tensor (first if it is a graph input)."""
    producers = {o for n in model.graph.node for o in n.output}
    head = [node for tensor, node in pairs if tensor not in producers]
    after: dict[str, list[Any]] = {}
    for tensor, node in pairs:
        if tensor in producers:
            after.setdefault(tensor, []).append(node)
    nodes = list(head)
    for n in model.graph.node:
        nodes.append(n)
        for o in n.output:
            nodes.extend(after.get(o, []))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_unused_initializers(model: Any) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
