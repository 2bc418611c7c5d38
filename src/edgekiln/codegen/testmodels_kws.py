"""A seeded int8 DS-CNN shaped like MLPerf Tiny's keyword-spotting model, for the C backend's measurements.

MLPerf Tiny KWS (``ds_cnn``, 12 classes) on 49 MFCC frames x 10 coefficients: Conv 10x4 stride 2
"same" to 64 channels -> 4 x (depthwise 3x3 "same" -> pointwise 64), each conv followed by ReLU
(the reference model's BatchNormalization is folded into the convs: random weights carry no BN
statistics) -> AveragePool over the whole 25x5 map -> Flatten -> FC 12. 2,656,768 MACs, 22,604 parameters.
Weights are seeded random (``1 / sqrt(fan_in)``), quantized per channel to int8 by onnxruntime's
``quantize_static`` on seeded standard-normal calibration inputs (:func:`testmodels.quantize_qdq`).

    >>> import tempfile, pathlib
    >>> path = ds_cnn_kws_qdq(pathlib.Path(tempfile.mkdtemp()) / "kws.onnx")
    >>> path.name
    'kws.onnx'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.codegen.testmodels import quantize_qdq

#: the model's input shape, NCHW: one channel of 49 frames x 10 MFCC coefficients.
KWS_INPUT_SHAPE = (1, 1, 49, 10)
#: keyword classes (MLPerf Tiny: 10 words + silence + unknown).
KWS_CLASSES = 12


def ds_cnn_kws_float(*, seed: int = 0, channels: int = 64, blocks: int = 4) -> Any:
    """The float DS-CNN (ONNX ModelProto, opset 17) on a 1x1x49x10 input, output 1x12 logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: list[Any] = []

    def weights(name: str, shape: tuple[int, ...], fan_in: int) -> list[str]:
        w = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(shape[0]) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, name + "_w"), numpy_helper.from_array(b, name + "_b")])
        return [name + "_w", name + "_b"]

    c = channels
    # NOTE: TF "same" padding of a 10x4 kernel, stride 2, on 49x10 -> 25x5: 9 rows (4 top, 5 bottom), 2 columns.
    nodes = [
        helper.make_node("Conv", ["input", *weights("conv0", (c, 1, 10, 4), 40)], ["c0"], name="conv0",
                         kernel_shape=[10, 4], strides=[2, 2], pads=[4, 1, 5, 1]),
        helper.make_node("Relu", ["c0"], ["x0"], name="relu0"),
    ]
    x = "x0"
    for i in range(1, blocks + 1):
        nodes += [
            helper.make_node("Conv", [x, *weights(f"dw{i}", (c, 1, 3, 3), 9)], [f"d{i}"], name=f"dw{i}", group=c,
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"d{i}"], [f"dr{i}"], name=f"relu_dw{i}"),
            helper.make_node("Conv", [f"dr{i}", *weights(f"pw{i}", (c, c, 1, 1), c)], [f"p{i}"], name=f"pw{i}",
                             kernel_shape=[1, 1]),
            helper.make_node("Relu", [f"p{i}"], [f"x{i}"], name=f"relu_pw{i}"),
        ]
        x = f"x{i}"
    nodes += [
        helper.make_node("AveragePool", [x], ["ap"], name="avgpool", kernel_shape=[25, 5]),
        helper.make_node("Flatten", ["ap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", *weights("fc", (KWS_CLASSES, c), c)], ["output"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "ds_cnn_kws",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(KWS_INPUT_SHAPE))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, KWS_CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.codegen")
    onnx.checker.check_model(model, full_check=True)
    return model


def ds_cnn_kws_qdq(out_path: str | Path, *, seed: int = 0, calib_n: int = 16) -> Path:
    """The DS-CNN, quantized to int8 QDQ (per-channel weights): ``ds_cnn_kws_qdq(tmp / "kws.onnx")``."""
    return quantize_qdq(ds_cnn_kws_float(seed=seed), out_path, calib_n=calib_n, seed=seed)
