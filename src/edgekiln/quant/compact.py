"""Compaction of a quantized ONNX file: what onnxruntime's quantizer writes that the model does not
need (zero zero points, bias scales computable from the input and weight scales, duplicate
initializers, shape annotations, generated names), removed in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def compact_qdq(path: Path) -> int:
    """Remove what a quantized file does not need, in place; returns the bytes saved:

    * all-zero zero points of constant DequantizeLinear inputs (the input is optional and
      defaults to 0; per-channel int32 bias zero points are pure overhead), except a Gemm
      weight's (onnxruntime fuses QGemm only with it);
    * stored bias scales that equal ``input_scale * weight_scale``, computed by a ``Mul``
      instead (:mod:`edgekiln.quant.bias_scale`);
    * duplicate initializers (same type, shape and bytes: shared scales and zero points);
    * ``value_info`` (shapes onnxruntime infers again at load time) and the doc string;
    * the generated names of Q/DQ nodes and of internal tensors (layer node names are kept:
      reports and the accuracy budget refer to them).
    """
    import onnx
    from onnx import numpy_helper

    from edgekiln.quant.bias_scale import share_bias_scales

    model = onnx.load(str(path))
    before = model.ByteSize()
    share_bias_scales(model)
    inits = {i.name: i for i in model.graph.initializer}
    # NOTE: onnxruntime 1.31 fuses Q/DQ around a Gemm into QGemm only when the weight's
    # DequantizeLinear spells out its zero point; without it the Gemm runs in float.
    gemm_weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm" and len(n.input) > 1}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits \
                or node.output[0] in gemm_weights:
            continue
        zp = inits.get(node.input[2])
        if zp is not None and not numpy_helper.to_array(zp).any():
            del node.input[2]
    _dedupe_initializers(model)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.doc_string = ""
    del model.graph.value_info[:]
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.name = ""
        _drop_default_attributes(node)
    used_domains = {n.domain or "" for n in model.graph.node}
    keep_ops = [o for o in model.opset_import if (o.domain or "") in used_domains or not o.domain]
    del model.opset_import[:]
    model.opset_import.extend(keep_ops)
    _short_names(model)
    onnx.checker.check_model(model)
    from edgekiln.fileio import atomic_save_onnx

    atomic_save_onnx(path, model)
    return before - model.ByteSize()


_CONV_DEFAULTS = {"auto_pad": b"NOTSET", "group": 1}


def _drop_default_attributes(node: Any) -> None:
    """Drop Conv attributes spelled out with their default value (auto_pad NOTSET, group 1,
    unit strides and dilations): 1,230 of the 6,978 node bytes of the MobileNet-style int8 model."""
    if node.op_type != "Conv":
        return
    keep = []
    for a in node.attribute:
        default = (a.name in ("strides", "dilations") and all(v == 1 for v in a.ints)) or \
            (a.name == "auto_pad" and a.s == _CONV_DEFAULTS["auto_pad"]) or (a.name == "group" and a.i == 1)
        if not default:
            keep.append(a)
    del node.attribute[:]
    node.attribute.extend(keep)


def _dedupe_initializers(model: Any) -> None:
    """Point every use of an initializer at the first one with identical type, shape and bytes."""
    from onnx import numpy_helper

    first: dict[tuple[Any, ...], str] = {}
    alias: dict[str, str] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), arr.tobytes())
        alias[init.name] = first.setdefault(key, init.name)
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        node.input[:] = [alias.get(x, x) if x not in outputs else x for x in node.input]


def _short_names(model: Any) -> None:
    """Rename weights and internal tensors to short names (the quantizer's generated names can
    be a quarter of a small model's file). Graph inputs/outputs and node names are kept."""
    keep = {v.name for v in [*model.graph.input, *model.graph.output]}
    mapping: dict[str, str] = {}
    for i, init in enumerate(model.graph.initializer):
        if init.name not in keep:
            mapping[init.name] = f"w{i}"
    k = 0
    for node in model.graph.node:
        for out in node.output:
            if out and out not in keep and out not in mapping:
                mapping[out] = f"t{k}"
                k += 1
    for init in model.graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]
