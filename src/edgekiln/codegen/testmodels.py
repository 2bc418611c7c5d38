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

    NOTE: ``softmax`` is off by default: onnxruntime's fused QLinearSoftmax approximates exp with
    its own table and differs from exact float math by 1 LSB on ~12% of outputs, whereas the
    edgekiln kernel matches exact math; end-to-end comparisons use the logits.
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


#: op types :func:`cnn_ops_float` needs quantized beyond onnxruntime's defaults.
CNN_OPS_EXTRA = ("HardSwish", "HardSigmoid", "Tanh", "Elu", "ReduceMean", "BatchNormalization", "Sigmoid")


def quantize_qdq(float_model: Any, out_path: str | Path, *, calib_n: int = 16, seed: int = 0,
                 extra_ops: tuple[str, ...] = ()) -> Path:
    """Quantize a float ONNX model with onnxruntime ``quantize_static`` (QDQ, per-channel int8).

    ``extra_ops``: op types to quantize besides onnxruntime's defaults (it leaves e.g. HardSwish,
    HardSigmoid and ReduceMean in float unless asked).
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
    shape = [d.dim_value for d in float_model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    batches = [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(calib_n)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT logs a pre-processing hint at WARNING
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry) | set(extra_ops)) if extra_ops else None
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
