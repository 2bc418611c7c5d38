"""Data movement (Reshape, Transpose, Slice, Split, Squeeze, Unsqueeze, Flatten, Gather with constant
indices) lowered to one ``gather`` op, or to a ``reshape`` view when nothing moves.

What each output element reads is worked out at export time by running the ONNX op in numpy on an
array of input *positions* (the C-layout indices ``0..N-1``, seen in ONNX's NCHW order): the result,
back in C layout, is the index table. A channel shuffle (``Reshape -> Transpose -> Reshape``), a
``Split`` or a channel ``Slice`` read the same channels at every pixel, so the table is stored per
pixel (``out_c`` entries); anything else gets one entry per output element. The kernel is
``out[p * out_c + j] = in[p * in_c + idx[j]]`` for ``p < pixels`` (``pixels = 1`` for a full table).

>>> positions = np.arange(2 * 3 * 4).reshape(1, 2, 3, 4)     # NHWC: H=2, W=3, C=4
>>> _per_pixel(np.ascontiguousarray(positions[..., [1, 0, 3, 2]]).reshape(-1), 4, 4, 6).tolist()
[1, 0, 3, 2]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekiln.codegen.ir import LowerContext, Op, QTensor, activation_qparams, to_c_shape
from edgekiln.errors import EdgekilnError

MOVEMENT_OPS = ("Reshape", "Transpose", "Slice", "Split", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Identity")


def _ints(ctx: LowerContext, node: Any, i: int) -> list[int] | None:
    from edgekiln.codegen.lower import node_label

    if len(node.input) <= i or not node.input[i]:
        return None
    if node.input[i] not in ctx.inits:
        raise EdgekilnError(f"{node_label(node)}: input {i} ({node.input[i]!r}) must be a constant for the C backend")
    return [int(v) for v in np.asarray(ctx.inits[node.input[i]]).reshape(-1)]


def _onnx_view(positions: np.ndarray, c_shape: tuple[int, ...]) -> np.ndarray:
    a = positions.reshape(c_shape)
    return a.transpose(0, 3, 1, 2) if len(c_shape) == 4 else a


def move(ctx: LowerContext, node: Any, a: np.ndarray) -> list[np.ndarray]:
    """Apply data-movement ``node`` to the ONNX-order array ``a``; one array per output."""
    from edgekiln.codegen.lower import node_attr

    op = node.op_type
    if op == "Identity":
        return [a]
    if op == "Reshape":
        spec = _ints(ctx, node, 1)
        if not spec:
            raise EdgekilnError(f"Reshape (node {node.name!r}): the target shape must be a constant")
        spec = [a.shape[i] if v == 0 else v for i, v in enumerate(spec)]
        return [a.reshape(spec)]
    if op == "Flatten":
        axis = int(node_attr(node, "axis", 1)) % max(a.ndim, 1)
        return [a.reshape(int(np.prod(a.shape[:axis])), -1)]
    if op == "Transpose":
        perm = node_attr(node, "perm", None)
        return [a.transpose(perm if perm is not None else list(range(a.ndim))[::-1])]
    if op in ("Squeeze", "Unsqueeze"):
        axes = _ints(ctx, node, 1) or list(node_attr(node, "axes", []))
        if op == "Squeeze":
            axes = axes or [i for i, d in enumerate(a.shape) if d == 1]
            return [a.squeeze(tuple(x % a.ndim for x in axes))]
        out_rank = a.ndim + len(axes)
        return [np.expand_dims(a, tuple(sorted(x % out_rank for x in axes)))]
    if op == "Gather":
        idx = np.asarray(ctx.inits[node.input[1]]) if node.input[1] in ctx.inits else None
        if idx is None:
            raise EdgekilnError(f"Gather (node {node.name!r}): the indices must be a constant for the C backend")
        return [np.take(a, idx.astype(np.int64), axis=int(node_attr(node, "axis", 0)))]
    if op == "Slice":
        starts, ends = _ints(ctx, node, 1), _ints(ctx, node, 2)
        axes = _ints(ctx, node, 3) or list(range(len(starts or [])))
        steps = _ints(ctx, node, 4) or [1] * len(axes)
        index = [slice(None)] * a.ndim
        for s, e, ax, st in zip(starts or [], ends or [], axes, steps, strict=True):
            index[ax % a.ndim] = slice(s, e, st)
        return [a[tuple(index)]]
    if op == "Split":
        axis = int(node_attr(node, "axis", 0)) % a.ndim
        sizes = _ints(ctx, node, 1) or list(node_attr(node, "split", []))
        if not sizes:
            n = len(node.output)
            sizes = [-(-a.shape[axis] // n)] * (n - 1)
            sizes.append(a.shape[axis] - sum(sizes))
        return np.split(a, np.cumsum(sizes)[:-1], axis=axis)
    raise EdgekilnError(f"{op}: not a data-movement op")


def _per_pixel(idx: np.ndarray, in_c: int, out_c: int, pixels: int) -> np.ndarray | None:
    """The per-pixel channel table when ``idx`` reads the same channels at every pixel, else None."""
    if out_c == 0 or idx.size != pixels * out_c:
        return None
    rel = idx.reshape(pixels, out_c) - (np.arange(pixels, dtype=np.int64) * in_c)[:, None]
    if (rel == rel[:1]).all() and rel.min() >= 0 and rel.max() < in_c:
        return rel[0]
    return None


def _table(idx: np.ndarray, in_size: int, in_c: int) -> tuple[dict[str, int], np.ndarray]:
    """gather attrs and index array for per-element ``idx`` over an input of ``in_size`` with
    ``in_c`` channels last: one channel table per pixel when every pixel reads alike."""
    pixels = in_size // in_c
    if idx.size % pixels == 0:
        table = _per_pixel(idx, in_c, idx.size // pixels, pixels)
        if table is not None:
            return dict(pixels=pixels, in_c=in_c, out_c=idx.size // pixels), table
    return dict(pixels=1, in_c=in_size, out_c=idx.size), idx


def _out_qparams(ctx: LowerContext, name: str, x: QTensor) -> tuple[float, int, bool]:
    """(scale, zero point, quantized?) of the value ``name``: its QuantizeLinear's, or the input's."""
    qs = ctx.q_of.get(name, [])
    if not qs:
        return x.scale, x.zero_point, False
    scale, zp = activation_qparams(ctx, qs[0])
    return scale, zp, True


def lower_movement(ctx: LowerContext, node: Any) -> None:
    """Append a ``gather`` (or ``reshape`` view) per output of data-movement ``node``, then a
    ``requantize`` where onnxruntime gave the output other qparams than the input's."""
    from edgekiln.codegen.lower import act_input, emit_requantize, node_label

    x = act_input(ctx, node, 0)
    positions = _onnx_view(np.arange(x.size, dtype=np.int64), x.shape)
    outs = move(ctx, node, positions)
    for k, (name, moved) in enumerate(zip(node.output, outs, strict=True)):
        if moved.ndim == 0 or (moved.shape and moved.shape[0] != 1 and moved.ndim in (2, 4)):
            raise EdgekilnError(f"{node_label(node)}: output {k} of shape {moved.shape} has no batch-1 layout in C")
        c_shape = to_c_shape(tuple(int(d) for d in moved.shape))
        c_moved = moved.transpose(0, 2, 3, 1) if moved.ndim == 4 else moved
        idx = np.ascontiguousarray(c_moved).reshape(-1)
        scale, zp, quantized = _out_qparams(ctx, name, x)
        qname = ctx.q_of[name][0].output[0] if quantized else name + "__int8"  # a float value in ONNX
        label = (node.name or node.output[0]) + (f"_{k}" if len(node.output) > 1 else "")
        same = scale == x.scale and zp == x.zero_point
        first = QTensor(qname if same else qname + "_pre", c_shape, x.scale, x.zero_point)
        ctx.graph.tensors[first.name] = first
        if idx.size == x.size and np.array_equal(idx, np.arange(x.size)):
            ctx.graph.ops.append(Op("reshape", label, [x.name], first.name, attrs=dict(size=x.size)))
        else:
            attrs, table = _table(idx, x.size, x.shape[-1])
            ctx.graph.ops.append(Op("gather", label, [x.name], first.name, attrs=attrs,
                                    arrays=dict(index=table.astype(np.int32))))
        if not same:
            final = QTensor(qname, c_shape, scale, zp)
            ctx.graph.tensors[qname] = final
            emit_requantize(ctx, label + "_requant", first, final)
        if not quantized:
            ctx.act_dq[name] = first.name if same else qname  # a float output read directly by the next op


def _full_index(op: Op) -> np.ndarray:
    """The per-element index table of a ``gather`` or ``reshape`` op."""
    if op.kind == "reshape":
        return np.arange(op.attrs["size"], dtype=np.int64)
    a, idx = op.attrs, op.arrays["index"].astype(np.int64)
    return (np.arange(a["pixels"], dtype=np.int64)[:, None] * a["in_c"] + idx[None, :]).reshape(-1)


def compose_gathers(graph: Any) -> None:
    """Merge chains of ``gather``/``reshape`` ops in place (a channel shuffle's Reshape -> Transpose
    -> Reshape becomes one per-pixel ``gather``): the middle tensor must have one reader and not be
    a graph output. A chain that composes to the identity becomes a ``reshape`` view."""
    changed = True
    while changed:
        changed = False
        for second in list(graph.ops):
            if second.kind not in ("gather", "reshape"):
                continue
            mid = second.inputs[0]
            first = next((op for op in graph.ops if op.output == mid), None)
            if first is None or first.kind not in ("gather", "reshape") or mid in graph.outputs \
                    or len(graph.consumers(mid)) != 1 or (first.kind == second.kind == "reshape"):
                continue
            src, dst = graph.tensors[first.inputs[0]], graph.tensors[second.output]
            idx = _full_index(first)[_full_index(second)]
            if idx.size == src.size and np.array_equal(idx, np.arange(src.size)):
                merged = Op("reshape", second.name, [src.name], dst.name, attrs=dict(size=src.size))
            else:
                attrs, table = _table(idx, src.size, src.shape[-1] if src.shape else 1)
                merged = Op("gather", second.name, [src.name], dst.name, attrs=attrs,
                            arrays=dict(index=table.astype(np.int32)))
            graph.ops[graph.ops.index(second)] = merged
            graph.ops.remove(first)
            del graph.tensors[mid]
            changed = True
