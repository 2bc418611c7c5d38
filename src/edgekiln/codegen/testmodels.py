"""Tiny seeded int8 QDQ models for the C backend's tests and docs (onnx.helper + onnxruntime; no torch).

Each builder writes a float ONNX model, quantizes it with onnxruntime ``quantize_static`` in QDQ
format (per-channel int8 weights, int8 activations, int32 bias) on seeded random calibration
data and returns the QDQ path.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np


def _init(name: str, arr: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


class _Params:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inits: list[Any] = []

    def conv(self, name: str, cout: int, cin_g: int, k: int) -> list[str]:
        fan_in = cin_g * k * k
        self.inits.append(_init(name + "_w", self.rng.standard_normal((cout, cin_g, k, k)) / np.sqrt(fan_in)))
        self.inits.append(_init(name + "_b", self.rng.standard_normal(cout) * 0.1))
        return [name + "_w", name + "_b"]

    def fc(self, name: str, n_out: int, n_in: int) -> list[str]:
        self.inits.append(_init(name + "_w", self.rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)))
        self.inits.append(_init(name + "_b", self.rng.standard_normal(n_out) * 0.1))
        return [name + "_w", name + "_b"]


def _finish(nodes: list[Any], p: _Params, shape: tuple[int, ...], out_shape: list[int], name: str) -> Any:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


def small_cnn_float(*, seed: int = 0, size: int = 28, c1: int = 8, c2: int = 16) -> Any:
    """conv-relu-maxpool x2 + flatten + fc on 1x1xSIZExSIZE (the MNIST-example shape)."""
    from onnx import helper

    p = _Params(seed)
    flat = c2 * (size // 4) * (size // 4)
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("conv1", c1, 1, 3)], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", *p.conv("conv2", c2, c1, 3)], ["c2"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", *p.fc("fc", 10, flat)], ["output"], name="fc", transB=1),
    ]
    return _finish(nodes, p, (1, 1, size, size), [1, 10], "small_cnn")


def mobilenet_style_float(*, seed: int = 0, size: int = 16, softmax: bool = False) -> Any:
    """Stem conv s2 -> inverted residual (expand, depthwise, project, Add) -> depthwise s2 ->
    Concat of two 1x1 branches -> AveragePool -> GlobalAveragePool -> FC [-> Softmax].

    NOTE: ``softmax`` is off by default (end-to-end comparisons use the logits). onnxruntime's fused
    QLinearSoftmax multiplies by floor(1 / s_out) instead of 1 / s_out; the edgekiln kernel does the
    same (lower.py ``_softmax``) and matched it on 200 of 200 inputs of this model.
    """
    from onnx import helper

    p = _Params(seed)
    p.inits += [_init("zero", np.array(0.0)), _init("six", np.array(6.0))]

    def relu6(src: str, dst: str) -> Any:
        return helper.make_node("Clip", [src, "zero", "six"], [dst], name=dst)

    k3 = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("stem", 8, 1, 3)], ["s"], name="stem", strides=[2, 2], **k3),
        relu6("s", "s6"),
        helper.make_node("Conv", ["s6", *p.conv("expand", 16, 8, 1)], ["e"], name="expand", kernel_shape=[1, 1]),
        relu6("e", "e6"),
        helper.make_node("Conv", ["e6", *p.conv("dw1", 16, 1, 3)], ["d"], name="dw1", group=16, **k3),
        relu6("d", "d6"),
        helper.make_node("Conv", ["d6", *p.conv("project", 8, 16, 1)], ["pr"], name="project",
                         kernel_shape=[1, 1]),
        helper.make_node("Add", ["pr", "s6"], ["res"], name="residual"),
        helper.make_node("Conv", ["res", *p.conv("dw2", 8, 1, 3)], ["d2"], name="dw2", group=8,
                         strides=[2, 2], **k3),
        helper.make_node("Relu", ["d2"], ["d2r"], name="relu_dw2"),
        helper.make_node("Conv", ["d2r", *p.conv("br_a", 8, 8, 1)], ["ba"], name="branch_a", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["d2r", *p.conv("br_b", 4, 8, 1)], ["bb"], name="branch_b", kernel_shape=[1, 1]),
        helper.make_node("Concat", ["ba", "bb"], ["cat"], name="concat", axis=1),
        helper.make_node("AveragePool", ["cat"], ["ap"], name="avgpool", kernel_shape=[3, 3], strides=[1, 1],
                         pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["ap"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", *p.fc("fc", 10, 12)], ["logits" if softmax else "output"], name="fc",
                         transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["output"], name="softmax", axis=1))
    return _finish(nodes, p, (1, 1, size, size), [1, 10], "mobilenet_style")


def cnn_ops_float(*, seed: int = 0, size: int = 11, keepdims: bool = False, avg_pool: bool = True) -> Any:
    """The ops real CNNs add to the basic set (issue 20), on 1x3xSIZExSIZE:
    Conv -> BatchNormalization (not folded by ORT: a Q/DQ sits between) -> Sigmoid ->
    MaxPool 3x3 s2 ceil_mode -> Conv -> HardSwish [-> AveragePool 3x3 s2 ceil_mode, asymmetric
    pads] -> Conv -> HardSigmoid -> Tanh -> Conv -> LeakyRelu -> Elu -> ReduceMean over H,W
    [keepdims -> Flatten] -> FC. Quantize with :data:`CNN_OPS_EXTRA` (ORT leaves several of
    these in float by default).

    NOTE: ``avg_pool=False`` drops the AveragePool for end-to-end comparisons with onnxruntime:
    its QLinearAveragePool sums float32 values, so exact .5 ties of the average land on either
    side by float rounding (~3% of this pool's outputs), and those 1-LSB differences spread.
    """
    from onnx import helper

    p = _Params(seed)
    c = 8
    p.inits += [_init("bn_g", p.rng.uniform(0.5, 2, c) * np.sign(p.rng.standard_normal(c))),
                _init("bn_b", p.rng.standard_normal(c) * 0.3), _init("bn_m", p.rng.standard_normal(c) * 0.2),
                _init("bn_v", p.rng.uniform(0.5, 2, c))]
    k3 = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("c1", c, 3, 3)], ["c1"], name="c1", **k3),
        helper.make_node("BatchNormalization", ["c1", "bn_g", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn",
                         epsilon=1e-3),
        helper.make_node("Sigmoid", ["bn"], ["sg"], name="sigmoid"),
        helper.make_node("MaxPool", ["sg"], ["mp"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                         ceil_mode=1),
        helper.make_node("Conv", ["mp", *p.conv("c2", c, c, 3)], ["c2"], name="c2", **k3),
        helper.make_node("HardSwish", ["c2"], ["hw"], name="hardswish"),
        helper.make_node("AveragePool", ["hw"], ["ap"], name="avgpool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 0, 0, 1], ceil_mode=1),
        helper.make_node("Conv", ["ap", *p.conv("c3", c, c, 1)], ["c3"], name="c3", kernel_shape=[1, 1]),
        helper.make_node("HardSigmoid", ["c3"], ["hs"], name="hardsigmoid", alpha=0.25, beta=0.4),
        helper.make_node("Tanh", ["hs"], ["th"], name="tanh"),
        helper.make_node("Conv", ["th", *p.conv("c4", c, c, 1)], ["c4"], name="c4", kernel_shape=[1, 1]),
        helper.make_node("LeakyRelu", ["c4"], ["lr"], name="leakyrelu", alpha=0.1),
        helper.make_node("Elu", ["lr"], ["el"], name="elu"),
        helper.make_node("ReduceMean", ["el"], ["rm"], name="reducemean", axes=[2, 3], keepdims=int(keepdims)),
    ]
    if not avg_pool:
        nodes = [n for n in nodes if n.name != "avgpool"]
        nodes[nodes.index(next(n for n in nodes if n.name == "c3"))].input[0] = "hw"
    if keepdims:
        nodes.append(helper.make_node("Flatten", ["rm"], ["rmf"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["rmf" if keepdims else "rm", *p.fc("fc", 5, c)], ["output"], name="fc",
                                  transB=1))
    return _finish(nodes, p, (1, 3, size, size), [1, 5], "cnn_ops")


def multi_head_float(*, seed: int = 0, size: int = 12) -> Any:
    """An MTCNN-like detector with three outputs on 1x3xSIZExSIZE: a shared trunk (Conv -> Relu ->
    MaxPool ceil_mode) feeding a per-pixel Sigmoid score map ``prob``, a box-regression map
    ``box`` and a pooled class vector ``cls`` (GlobalAveragePool -> Flatten -> Gemm)."""
    import onnx
    from onnx import TensorProto, helper

    p = _Params(seed)
    k3 = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("trunk", 8, 3, 3)], ["t"], name="trunk", **k3),
        helper.make_node("Relu", ["t"], ["tr"], name="relu"),
        helper.make_node("MaxPool", ["tr"], ["tp"], name="pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("Conv", ["tp", *p.conv("score", 2, 8, 1)], ["s"], name="score", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["s"], ["prob"], name="prob"),
        helper.make_node("Conv", ["tp", *p.conv("box", 4, 8, 1)], ["box"], name="box", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["tp"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["gf"], name="flatten", axis=1),
        helper.make_node("Gemm", ["gf", *p.fc("cls", 3, 8)], ["cls"], name="cls", transB=1),
    ]
    half = -(-(size - 3) // 2) + 1
    outs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 2, half, half]),
            helper.make_tensor_value_info("box", TensorProto.FLOAT, [1, 4, half, half]),
            helper.make_tensor_value_info("cls", TensorProto.FLOAT, [1, 3])]
    graph = helper.make_graph(nodes, "multi_head", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   [1, 3, size, size])], outs, p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


def shuffle_island_float(*, seed: int = 0, size: int = 8) -> Any:
    """The ops of MTCNN and ShuffleNetV2 on 1x4xSIZExSIZE, two outputs: Conv -> PRelu (per-channel
    slope) -> MaxPool -> channel shuffle (Reshape to 5-D with a target computed by Shape -> Gather
    -> Unsqueeze -> Concat, Transpose, Reshape back) -> Split in two: SiLU (Conv -> Sigmoid ->
    Mul(x, .)) | per-channel Mul and Add of constants -> Concat -> Conv -> Softmax over channels
    (``probs``, 4-D); and Slice of 3 channels -> Transpose to NHWC -> Flatten -> Gemm (``vec``).
    Quantize with :data:`SHUFFLE_EXTRA` (every op int8) or ``float_ops=SPEED_FLOAT`` (PRelu,
    Sigmoid and Mul left float, as ``edgekiln quantize``'s speed rule leaves them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = _Params(seed)
    c, h = 8, size // 2
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    p.inits += [_init("slope", p.rng.uniform(0.05, 0.4, (c, 1, 1))), _init("mscale", p.rng.uniform(0.5, 1.5, (4, 1, 1))),
                _init("mshift", p.rng.standard_normal((4, 1, 1)) * 0.3),
                i64("zero", [0]), i64("rest", [2, c // 2, h, h]), i64("flat", [1, -1, h, h]),
                i64("split", [4, 4]), i64("s0", [1]), i64("s1", [4]), i64("sax", [1])]
    k3 = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("c1", c, 4, 3)], ["c1"], name="c1", **k3),
        helper.make_node("PRelu", ["c1", "slope"], ["pr"], name="prelu"),
        helper.make_node("MaxPool", ["pr"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["mp"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "zero"], ["n"], name="batch", axis=0),
        helper.make_node("Concat", ["n", "rest"], ["tgt"], name="target", axis=0),
        helper.make_node("Reshape", ["mp", "tgt"], ["r5"], name="to5d"),
        helper.make_node("Transpose", ["r5"], ["t5"], name="shuffle", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "flat"], ["sh"], name="to4d"),
        helper.make_node("Split", ["sh", "split"], ["a", "b"], name="split", axis=1),
        helper.make_node("Conv", ["a", *p.conv("ca", 4, 4, 1)], ["ca"], name="ca", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["ca"], ["sg"], name="sigmoid"),
        helper.make_node("Mul", ["ca", "sg"], ["silu"], name="silu"),
        helper.make_node("Mul", ["b", "mscale"], ["bm"], name="scale"),
        helper.make_node("Add", ["bm", "mshift"], ["ba"], name="shift"),
        helper.make_node("Concat", ["silu", "ba"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", *p.conv("head", 2, c, 1)], ["logit"], name="head", kernel_shape=[1, 1]),
        helper.make_node("Softmax", ["logit"], ["probs"], name="softmax", axis=1),
        helper.make_node("Slice", ["cat", "s0", "s1", "sax"], ["sl"], name="slice"),
        helper.make_node("Transpose", ["sl"], ["nhwc"], name="nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["nhwc"], ["fl"], name="flatten", axis=1),
        helper.make_node("Gemm", ["fl", *p.fc("fc", 5, 3 * h * h)], ["vec"], name="fc", transB=1),
    ]
    outs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 2, h, h]),
            helper.make_tensor_value_info("vec", TensorProto.FLOAT, [1, 5])]
    graph = helper.make_graph(nodes, "shuffle_island", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [1, 4, size, size])], outs, p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


def se_block_float(*, seed: int = 0, size: int = 6, c: int = 8) -> Any:
    """A squeeze-excite block on 1x3xSIZExSIZE: Conv -> Relu -> (GlobalAveragePool -> Conv -> Relu ->
    Conv -> HardSigmoid) gate -> Mul(features [1,C,H,W], gate [1,C,1,1]) -> Conv -> output map."""
    from onnx import helper

    p = _Params(seed)
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("c1", c, 3, 3)], ["c1"], name="c1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["x"], name="relu"),
        helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
        helper.make_node("Conv", ["g", *p.conv("sq", c // 2, c, 1)], ["sq"], name="squeeze", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["sq"], ["sqr"], name="relu_sq"),
        helper.make_node("Conv", ["sqr", *p.conv("ex", c, c // 2, 1)], ["ex"], name="excite", kernel_shape=[1, 1]),
        helper.make_node("HardSigmoid", ["ex"], ["gate"], name="gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["x", "gate"], ["se"], name="scale"),
        helper.make_node("Conv", ["se", *p.conv("out", 4, c, 1)], ["output"], name="out", kernel_shape=[1, 1]),
    ]
    return _finish(nodes, p, (1, 3, size, size), [1, 4, size, size], "se_block")


def se_hswish_float(*, seed: int = 0, size: int = 6, c: int = 8) -> Any:
    """MobileNetV3's block with what the speed rule leaves float, on a 1xSIZExSIZE input: Unsqueeze ->
    Conv -> HardSwish, read by an SE squeeze (GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid)
    and by the SE Mul -> Conv -> Sigmoid as the graph output (``prob``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = _Params(seed)
    p.inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes = [
        helper.make_node("Unsqueeze", ["input", "axis1"], ["x4"], name="unsqueeze"),
        helper.make_node("Conv", ["x4", *p.conv("c1", c, 1, 3)], ["c1"], name="c1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["hs"], name="hswish"),
        helper.make_node("GlobalAveragePool", ["hs"], ["g"], name="squeeze"),
        helper.make_node("Conv", ["g", *p.conv("r", c // 2, c, 1)], ["r"], name="reduce", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["r"], ["rr"], name="relu"),
        helper.make_node("Conv", ["rr", *p.conv("e", c, c // 2, 1)], ["e"], name="expand", kernel_shape=[1, 1]),
        helper.make_node("HardSigmoid", ["e"], ["gate"], name="gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["hs", "gate"], ["se"], name="scale"),
        helper.make_node("Conv", ["se", *p.conv("o", 2, c, 1)], ["o"], name="head", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["o"], ["prob"], name="prob"),
    ]
    graph = helper.make_graph(nodes, "se_hswish", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 [1, size, size])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 2, size, size])],
                              p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


def arith_float(*, seed: int = 0, size: int = 5, c: int = 8) -> Any:
    """Add with channel broadcasting, Sub of two tensors: Conv -> Relu (x) -> GlobalAveragePool -> Conv ->
    Sigmoid (g, [1,C,1,1]) -> Add(x, g) -> Sub(., x) -> Conv -> output, on 1x4xSIZExSIZE."""
    from onnx import helper

    p = _Params(seed)
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("c1", c, 4, 3)], ["c1"], name="c1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["x"], name="relu"),
        helper.make_node("GlobalAveragePool", ["x"], ["g0"], name="gap"),
        helper.make_node("Conv", ["g0", *p.conv("gc", c, c, 1)], ["gc"], name="gc", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["gc"], ["g"], name="sigmoid"),
        helper.make_node("Add", ["x", "g"], ["s"], name="add_bcast"),
        helper.make_node("Sub", ["s", "x"], ["d"], name="sub"),
        helper.make_node("Conv", ["d", *p.conv("o", 3, c, 1)], ["output"], name="out", kernel_shape=[1, 1]),
    ]
    return _finish(nodes, p, (1, 4, size, size), [1, 3, size, size], "arith")


def decoder_float(*, seed: int = 0, size: int = 6) -> Any:
    """A segmentation-style decoder on 1x3xSIZExSIZE: Conv -> Pad (asymmetric) -> Conv (no pad) ->
    ConvTranspose 2x2 s2 -> Relu -> Resize x2 nearest (by scales) and Resize linear align_corners (by
    sizes) of the same map -> Add -> Conv 1x1."""
    from onnx import helper, numpy_helper

    p = _Params(seed)
    c = 6
    out_h, out_w = 4 * (size - 1), 4 * (size + 1)  # pad -> (size+1, size+3), conv 3x3 -> -2, x2, x2
    p.inits += [numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 0, 1], np.int64), "pads"),
                _init("scales", np.array([1, 1, 2, 2])), _init("no_roi", np.array([])),
                numpy_helper.from_array(np.array([1, c, out_h, out_w], np.int64), "sizes")]
    p.inits.append(_init("ct_w", p.rng.standard_normal((c, c, 2, 2)) / np.sqrt(c * 4)))
    p.inits.append(_init("ct_b", p.rng.standard_normal(c) * 0.1))
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("c1", c, 3, 3)], ["c1"], name="c1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["c1", "pads"], ["pd"], name="pad", mode="constant"),
        helper.make_node("Conv", ["pd", *p.conv("c2", c, c, 3)], ["c2"], name="c2", kernel_shape=[3, 3]),
        helper.make_node("ConvTranspose", ["c2", "ct_w", "ct_b"], ["ct"], name="deconv", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Relu", ["ct"], ["ctr"], name="relu"),
        helper.make_node("Resize", ["ctr", "no_roi", "scales"], ["near"], name="nearest", mode="nearest"),
        helper.make_node("Resize", ["ctr", "no_roi", "", "sizes"], ["lin"], name="linear", mode="linear",
                         coordinate_transformation_mode="align_corners"),
        helper.make_node("Add", ["near", "lin"], ["sum"], name="add"),
        helper.make_node("Conv", ["sum", *p.conv("out", 2, c, 1)], ["output"], name="out", kernel_shape=[1, 1]),
    ]
    return _finish(nodes, p, (1, 3, size, size), [1, 2, out_h, out_w], "decoder")


def two_input_float(*, seed: int = 0, size: int = 6) -> Any:
    """Two graph inputs: an image 1x3xSIZExSIZE (Conv -> Relu -> GlobalAveragePool -> Flatten) and a
    1x4 side vector ``aux`` (Gemm -> Relu), concatenated -> Gemm -> ``output`` (1x3)."""
    import onnx
    from onnx import TensorProto, helper

    p = _Params(seed)
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("c", 8, 3, 3)], ["c"], name="c", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu"),
        helper.make_node("GlobalAveragePool", ["cr"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["gf"], name="flatten", axis=1),
        helper.make_node("Gemm", ["aux", *p.fc("side", 8, 4)], ["s"], name="side", transB=1),
        helper.make_node("Relu", ["s"], ["sr"], name="relu_side"),
        helper.make_node("Concat", ["gf", "sr"], ["cat"], name="concat", axis=1),
        helper.make_node("Gemm", ["cat", *p.fc("head", 3, 16)], ["output"], name="head", transB=1),
    ]
    graph = helper.make_graph(nodes, "two_input", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size]),
        helper.make_tensor_value_info("aux", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])], p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


#: op types :func:`shuffle_island_float` needs quantized beyond onnxruntime's defaults (all of them).
SHUFFLE_EXTRA = ("PRelu", "Sigmoid", "Mul", "Add", "Split", "Slice", "Transpose", "Reshape", "Softmax", "Concat",
                 "MaxPool", "Flatten")
#: the ops ``edgekiln quantize``'s speed rule keeps float (quant/speed.py), for float-island tests.
SPEED_FLOAT = ("PRelu", "Sigmoid", "Mul", "HardSigmoid", "HardSwish")

#: op types :func:`cnn_ops_float` needs quantized beyond onnxruntime's defaults.
CNN_OPS_EXTRA = ("HardSwish", "HardSigmoid", "Tanh", "Elu", "ReduceMean", "BatchNormalization", "Sigmoid")


def quantize_qdq(float_model: Any, out_path: str | Path, *, calib_n: int = 16, seed: int = 0,
                 extra_ops: tuple[str, ...] = (), float_ops: tuple[str, ...] = ()) -> Path:
    """Quantize a float ONNX model with onnxruntime ``quantize_static`` (QDQ, per-channel int8).

    ``extra_ops``: op types to quantize besides onnxruntime's defaults (it leaves e.g. HardSwish,
    HardSigmoid and ReduceMean in float unless asked); ``float_ops``: op types to leave float.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from edgekiln.execution.ort import lower_for_ort

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    float_path = out_path.with_name(out_path.stem + "_float.onnx")
    # NOTE: quantize_static opens the file in onnxruntime: write the IR/opset it reads
    onnx.save(lower_for_ort(float_model), str(float_path))
    inits = {i.name for i in float_model.graph.initializer}
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in float_model.graph.input
              if i.name not in inits}
    rng = np.random.default_rng(seed)
    batches = [{k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()} for _ in range(calib_n)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT logs a pre-processing hint at WARNING
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ops = sorted((set(QLinearOpsRegistry) | set(QDQRegistry) | set(extra_ops)) - set(float_ops)) \
                if extra_ops or float_ops else None
            quantize_static(str(float_path), str(out_path), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=ops)
    finally:
        logging.getLogger().setLevel(level)
    return out_path


def small_cnn_qdq(out_path: str | Path, *, seed: int = 0, size: int = 28) -> Path:
    """The small CNN, quantized: ``small_cnn_qdq(tmp / "cnn.onnx")``."""
    return quantize_qdq(small_cnn_float(seed=seed, size=size), out_path, seed=seed)


def tiny_qdq_model(out_path: str | Path, *, seed: int = 0) -> Path:
    """An 8x8 two-conv CNN with 4/8 channels (the golden-snapshot model)."""
    return quantize_qdq(small_cnn_float(seed=seed, size=8, c1=4, c2=8), out_path, seed=seed)


def mobilenet_style_qdq(out_path: str | Path, *, seed: int = 0, softmax: bool = False) -> Path:
    """The MobileNetV2-style model (depthwise, residual Add, Concat, pools [, Softmax]), quantized."""
    return quantize_qdq(mobilenet_style_float(seed=seed, softmax=softmax), out_path, seed=seed)


def random_inputs(shape: tuple[int, ...], n: int, *, seed: int = 1) -> np.ndarray:
    """``n`` seeded standard-normal float32 inputs of ``shape`` (batch dim included, set to n)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape[1:])).astype(np.float32)
