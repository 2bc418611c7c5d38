"""MACs per kernel kind, and int8 instructions on a microcontroller from measured instructions per MAC.

edgekiln's C kernels cost different amounts per MAC by kind (a depthwise 3x3 has 9 taps per output to
amortise its per-pixel work over, a pointwise conv is a plain GEMM), so a Cortex-M profile carries the
instructions per MAC measured under QEMU for each kind (``benchmarks/cases_mcu_kernels.py``), and the
estimate splits a model's MACs the same way:

- ``depthwise``: Conv with ``group > 1`` and one input channel per group;
- ``pointwise``: Conv with ``group == 1`` and a 1x1 kernel;
- ``conv``: every other Conv and ConvTranspose (a fused conv -> max pool counts here);
- ``fc``: Gemm and MatMul;
- ``add``: an Add or Sub of two same-shaped activations (a residual connection), per output element: no
  MACs, but the C backend spends ~100 instructions per element on it, as much as a small conv layer
  (the code generator counts those elements as the layer's MACs too).

MACs of a kind the profile has no figure for, and every MAC when the split is unknown, use its ``model``
figure: a whole model's instructions over its MACs, pools, additions and requantization included.

>>> kernel_kind(groups=64, cin_per_group=1, k_h=3, k_w=3), kernel_kind(groups=1, cin_per_group=64, k_h=1, k_w=1)
('depthwise', 'pointwise')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: the kinds a profile's ``instructions_per_mac`` may name: per kernel kind, and ``model`` (the fallback).
KERNEL_KINDS = ("conv", "depthwise", "pointwise", "fc", "add")
MODEL_KIND = "model"
#: kinds counted in elements, not MACs (not part of a model's MAC total).
ELEMENT_KINDS = frozenset({"add"})
_ADD_OPS = frozenset({"Add", "Sub"})
#: ONNX op -> input position of its weight (conv-like) ; matrix products are ``fc``.
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1}
_FC_OPS = frozenset({"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"})


def kernel_kind(*, groups: int, cin_per_group: int, k_h: int, k_w: int) -> str:
    """The kernel kind of a convolution from its geometry (see the module doc)."""
    if groups > 1 and cin_per_group == 1:
        return "depthwise"
    if groups == 1 and k_h * k_w == 1:
        return "pointwise"
    return "conv"


def _weight_dims(graph: Any, name: str, producers: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Dims of a constant (an initializer, also behind a DequantizeLinear as in QDQ models), else None."""
    inits = {t.name: t for t in graph.initializer}
    if name in inits:
        return tuple(inits[name].dims)
    producer = producers.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in inits:
        return tuple(inits[producer.input[0]].dims)
    return None


def macs_by_kernel_kind(model: str | Path | Any, layers: Sequence[Any]) -> dict[str, int]:
    """MACs of each kernel kind (elements for ``add``); ``layers`` are the graph's nodes in order with their
    ``macs`` and ``output_shape`` (:func:`edgekiln.models.analysis.analyze`'s ``info.layers``)."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    if len(layers) > len(proto.graph.node):
        # NOTE: an int8 form that left Q/DQ pairs out for a runtime's sake records them; the int8
        # analysis (``analyze(precision="int8")``) counts the graph with them put back
        from edgekiln.models.qdq_pairs import recorded_pairs, restore_qdq_pairs

        if recorded_pairs(proto):
            restored = onnx.ModelProto()
            restored.CopyFrom(proto)
            restore_qdq_pairs(restored)
            proto = restored
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    shapes = {o: layer.output_shape for n, layer in zip(graph.node, layers, strict=True) for o in n.output[:1]}
    out: dict[str, int] = {}
    for node, layer in zip(graph.node, layers, strict=True):
        if node.op_type in _ADD_OPS and layer.output_shape and len(node.input) == 2 and \
                not any(_weight_dims(graph, i, producers) for i in node.input) and \
                shapes.get(node.input[0]) == shapes.get(node.input[1]) == layer.output_shape:
            kind, amount = "add", math.prod(layer.output_shape)
        elif not layer.macs:
            continue
        elif node.op_type in _FC_OPS:
            kind, amount = "fc", layer.macs
        elif node.op_type in _CONV_WEIGHT:
            dims = _weight_dims(graph, node.input[_CONV_WEIGHT[node.op_type]], producers)
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            kind = "conv" if dims is None or len(dims) < 3 or node.op_type == "ConvTranspose" else \
                kernel_kind(groups=groups, cin_per_group=dims[1], k_h=dims[2], k_w=math.prod(dims[3:]))
            amount = layer.macs
        else:
            kind, amount = MODEL_KIND, layer.macs
        out[kind] = out.get(kind, 0) + int(amount)
    return out


def mcu_instructions(instructions_per_mac: Mapping[str, float], macs: int,
                     macs_by_kind: Mapping[str, int] | None = None) -> float:
    """Instructions of one int8 inference: each kind's MACs (``add``: elements) x its measured figure; the
    model's other MACs x ``model``.

    >>> mcu_instructions({"conv": 1.5, "fc": 2.0, "add": 100.0, "model": 3.0}, 1000,
    ...                  {"conv": 600, "fc": 100, "depthwise": 200, "add": 10})
    3000.0
    """
    split = dict(macs_by_kind or {})
    known = {k: v for k, v in split.items() if k in instructions_per_mac and k != MODEL_KIND}
    rest = max(int(macs) - sum(v for k, v in known.items() if k not in ELEMENT_KINDS), 0)
    return float(sum(v * instructions_per_mac[k] for k, v in known.items()) + rest * instructions_per_mac[MODEL_KIND])
