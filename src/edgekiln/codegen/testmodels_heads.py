"""Tiny seeded float models of what recognition and detection heads add to a CNN (issue 20), for the C
backend's and the TFLite writer's tests: ReduceMean over one axis, and a YOLO-style box decoder whose
anchor grid is computed from the input's shape (``Shape -> Range -> Cast -> Add 0.5``), added to and
subtracted from the predicted distances, scaled by a per-anchor constant, and concatenated along a
non-channel axis. Quantize them with :func:`edgekiln.codegen.testmodels.quantize_qdq`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class _Params:
    """Seeded initializers: conv and fully connected weights scaled by ``1 / sqrt(fan_in)``, small biases."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inits: list[Any] = []

    def _add(self, name: str, shape: tuple[int, ...], fan_in: int) -> list[str]:
        from onnx import numpy_helper

        w = (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        b = (self.rng.standard_normal(shape[0]) * 0.1).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, name + "_w"), numpy_helper.from_array(b, name + "_b")]
        return [name + "_w", name + "_b"]

    def conv(self, name: str, cout: int, cin: int, k: int) -> list[str]:
        return self._add(name, (cout, cin, k, k), cin * k * k)

    def fc(self, name: str, n_out: int, n_in: int) -> list[str]:
        return self._add(name, (n_out, n_in), n_in)


def reduce_axes_float(*, seed: int = 0, h: int = 5, w: int = 7) -> Any:
    """ReduceMean over one axis, three ways, on 1x3xHxW: Conv -> Relu (6 channels), then the mean over H
    with keepdims=0 (1x6xW, a text recognizer's height pooling) -> Flatten -> Gemm (``vec``); over W,
    kept (1x6xHx1) -> Conv 1x1 (``col``); over the channels, kept (``chan``, 1x1xHxW). Quantize with
    ``extra_ops=("ReduceMean", "Flatten")``."""
    import onnx
    from onnx import TensorProto, helper

    p = _Params(seed)
    mean = lambda src, dst, axes, keep: helper.make_node("ReduceMean", [src], [dst], name=dst, axes=axes,  # noqa: E731
                                                         keepdims=keep)
    nodes = [
        helper.make_node("Conv", ["input", *p.conv("c1", 6, 3, 3)], ["c1"], name="c1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        mean("r", "mean_h", [2], 0),
        helper.make_node("Flatten", ["mean_h"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", *p.fc("fc", 4, 6 * w)], ["vec"], name="fc", transB=1),
        mean("r", "mean_w", [-1], 1),
        helper.make_node("Conv", ["mean_w", *p.conv("cw", 3, 6, 1)], ["col"], name="cw", kernel_shape=[1, 1]),
        mean("r", "chan", [1], 1),
    ]
    outs = [helper.make_tensor_value_info("vec", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("col", TensorProto.FLOAT, [1, 3, h, 1]),
            helper.make_tensor_value_info("chan", TensorProto.FLOAT, [1, 1, h, w])]
    graph = helper.make_graph(nodes, "reduce_axes", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, 3, h, w])], outs, p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


def anchor_head_float(*, seed: int = 0, h: int = 4, w: int = 6) -> Any:
    """A YOLOv8-style head on 1x3xHxW: Conv -> Reshape (1, 4, H*W) -> Split into distances ``lt``, ``rb``;
    anchors ``a`` (1, 2, H*W) = Concat(g, 2 g) of ``g = Cast(Range(0, H*W)) + 0.5`` with ``H*W`` read from
    ``Shape(input)``; boxes = Concat(a - lt, a + rb) (axis 1) * a per-anchor stride constant; scores =
    Sigmoid(Conv) as (1, 2, H*W); ``output`` = Concat(boxes, scores, a constant row like a ViT's class
    token) along axis 1: (1, 7, H*W). Quantize with :data:`ANCHOR_EXTRA`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = _Params(seed)
    n = h * w
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    p.inits += [i64("flat4", [1, 4, n]), i64("flat2", [1, 2, n]), i64("split", [2, 2]), i64("i2", [2]),
                i64("i3", [3]), i64("zero", 0), i64("one", 1), i64("lead", [0, 1]),
                numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                numpy_helper.from_array(np.linspace(0.5, 3.0, n).astype(np.float32), "stride"),
                numpy_helper.from_array(p.rng.uniform(-1, 1, (1, 1, n)).astype(np.float32), "prior")]
    mk = helper.make_node
    nodes = [
        mk("Conv", ["input", *p.conv("box", 4, 3, 3)], ["bx"], name="box", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("Reshape", ["bx", "flat4"], ["d"], name="flat_box"),
        mk("Split", ["d", "split"], ["lt", "rb"], name="distances", axis=1),
        mk("Shape", ["input"], ["shape"], name="shape"),
        mk("Gather", ["shape", "i2"], ["hh"], name="height", axis=0),
        mk("Gather", ["shape", "i3"], ["ww"], name="width", axis=0),
        mk("Mul", ["hh", "ww"], ["hw"], name="pixels"),
        mk("Squeeze", ["hw"], ["hw0"], name="pixels_scalar"),
        mk("Range", ["zero", "hw0", "one"], ["idx"], name="range"),
        mk("Cast", ["idx"], ["idxf"], name="cast", to=TensorProto.FLOAT),
        mk("Add", ["idxf", "half"], ["g"], name="centers"),
        mk("Unsqueeze", ["g", "lead"], ["g3"], name="grid"),
        mk("Mul", ["g3", "two"], ["g3b"], name="grid2"),
        mk("Concat", ["g3", "g3b"], ["a"], name="anchors", axis=1),
        mk("Sub", ["a", "lt"], ["x1"], name="x1y1"),
        mk("Add", ["a", "rb"], ["x2"], name="x2y2"),
        mk("Concat", ["x1", "x2"], ["xyxy"], name="corners", axis=1),
        mk("Mul", ["xyxy", "stride"], ["boxes"], name="scale"),
        mk("Conv", ["input", *p.conv("cls", 2, 3, 1)], ["cl"], name="cls", kernel_shape=[1, 1]),
        mk("Sigmoid", ["cl"], ["sc"], name="sigmoid"),
        mk("Reshape", ["sc", "flat2"], ["scores"], name="flat_scores"),
        mk("Concat", ["boxes", "scores", "prior"], ["output"], name="detections", axis=1),
    ]
    graph = helper.make_graph(nodes, "anchor_head", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, 3, h, w])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 7, n])], p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


#: op types :func:`anchor_head_float` needs quantized beyond onnxruntime's defaults (all of them).
ANCHOR_EXTRA = ("Reshape", "Split", "Sub", "Add", "Mul", "Concat", "Sigmoid", "Unsqueeze")
#: op types :func:`reduce_axes_float` needs quantized beyond onnxruntime's defaults.
REDUCE_EXTRA = ("ReduceMean", "Flatten")
