"""Graph rewrite after lowering: fuse Conv -> (clamp) -> MaxPool/AveragePool into one ``conv_pool`` op.

The fused kernel computes the convolution a few output rows at a time into a small ring of
``k_h`` rows (the pool window's height) and writes the pooled map directly, so the full conv
output never exists in the arena. On the MNIST-style CNN that tensor (28x28xC) is the peak of
the unfused plan. Clamps (ReLU/ReLU6) are already folded into the conv by
:func:`edgekiln.codegen.lower.fuse_activations`, so they ride along.

Bit-exactness holds by construction: every conv row is computed by the same code as the
unfused kernel and pooled by the same arithmetic; the numpy reference
(:func:`edgekiln.codegen.reference.conv_pool`) *is* the unfused composition.

>>> from edgekiln.codegen.ir import load_qdq
>>> from edgekiln.codegen.testmodels import tiny_qdq_model
>>> graph = fuse_conv_pool(load_qdq(tiny_qdq_model("tiny_int8.onnx")))
>>> [op.kind for op in graph.ops]
['conv_pool', 'conv_pool', 'reshape', 'fully_connected']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekiln.codegen.ir import IntGraph, Op, QTensor

#: ek_pool_params fields, stored in the fused op's attrs with a ``pool_`` prefix.
POOL_FIELDS = ("in_h", "in_w", "channels", "out_h", "out_w", "k_h", "k_w", "stride_h", "stride_w", "pad_top",
               "pad_left", "count_include_pad", "input_zp", "output_zp", "mult", "shift")
#: suffix of the scratch-row tensor a fused op owns for exactly its own step.
SCRATCH_SUFFIX = "__rows"


def split_attrs(attrs: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """A fused op's attrs -> (conv attrs, pool attrs) as the unfused kernels take them."""
    conv = {k: v for k, v in attrs.items() if not k.startswith("pool_") and k != "rows"}
    pool = {k[len("pool_"):]: v for k, v in attrs.items() if k.startswith("pool_")}
    return conv, pool


def fuse_conv_pool(graph: IntGraph, *, whole_map: bool = False) -> IntGraph:
    """Rewrite ``conv2d -> max_pool|avg_pool`` pairs in place when the conv output has no other reader
    and the fused op needs fewer conv rows than the conv output has (``whole_map``: fuse those too; the
    golden tests pin the fused kernel's arithmetic on such shapes).

    Returns the same graph (mutated). A fused op keeps the conv's inputs, constants and name,
    writes the pool's output and owns a scratch tensor of ``pool k_h`` conv rows
    (``op.scratch``), which the planner gives a one-step lifetime.
    """
    for pool in list(graph.ops):
        if pool.kind not in ("max_pool", "avg_pool"):
            continue
        mid = pool.inputs[0]
        conv = next((op for op in graph.ops if op.output == mid), None)
        if conv is None or conv.kind != "conv2d" or mid in graph.outputs or len(graph.consumers(mid)) != 1:
            continue
        pa = dict.fromkeys(POOL_FIELDS, 0)
        pa.update(pool.attrs)
        if pool.kind == "max_pool":
            pa["input_zp"] = pa["output_zp"] = conv.attrs["output_zp"]  # unused by the max kernel
        t = graph.tensors[mid]
        scratch = pool.output + SCRATCH_SUFFIX
        # NOTE: a ring of k_h rows suffices: the conv rows one pooled row needs span at most
        # k_h consecutive rows, and they only move forward, so row r can live in slot r % k_h.
        rows = min(pa["k_h"], conv.attrs["out_h"])
        if rows >= conv.attrs["out_h"] and not whole_map:
            # NOTE: a ring as tall as the conv output (a global pool) saves no memory, and the fused
            # kernel is the slow portable one: DS-CNN's last pointwise + global average pool took
            # 9.4 instructions/MAC fused, 2.0 unfused (Cortex-M4 -O2), at 64 B more arena fused.
            continue
        graph.tensors[scratch] = QTensor(scratch, (rows, conv.attrs["out_w"], conv.attrs["out_c"]),
                                         t.scale, t.zero_point)
        attrs = dict(conv.attrs)
        attrs.update({f"pool_{k}": int(pa[k]) for k in POOL_FIELDS})
        attrs["pool_is_avg"] = int(pool.kind == "avg_pool")
        attrs["rows"] = rows
        fused = Op("conv_pool", conv.name, list(conv.inputs), pool.output, attrs=attrs, arrays=dict(conv.arrays),
                   macs=conv.macs + pool.macs, scratch=scratch, weight_scale=conv.weight_scale)
        graph.ops[graph.ops.index(conv)] = fused
        graph.ops.remove(pool)
        del graph.tensors[mid]
    return graph


def lower_for_c(model: str | Path | Any, *, fuse: bool = True,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> IntGraph:
    """:func:`~edgekiln.codegen.ir.load_qdq` (dynamic dims from ``input_shapes``) plus, with
    ``fuse``, :func:`fuse_conv_pool`.

    This is the graph ``export_c`` emits; use it (with :func:`~edgekiln.codegen.planner.plan_memory`)
    wherever the C backend's real arena is needed.
    """
    from edgekiln.codegen.ir import load_qdq

    graph = load_qdq(model, input_shapes)
    return fuse_conv_pool(graph) if fuse else graph
