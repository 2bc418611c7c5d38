"""Tiny seeded models and data for tests and docs (thousands of parameters, not millions).

Shipped with the library so users' own tests can use them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def tiny_conv_onnx(path: str | Path, *, seed: int = 0, batch: int | str = "N") -> Path:
    """Conv(1->4, 3x3) -> Relu -> Flatten -> Gemm(4*6*6 -> 10) on a 1x8x8 input, built with onnx.helper.

    MACs at batch 1: conv 4*6*6*1*3*3 = 1296, gemm 144*10 = 1440.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, 1, 3, 3)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(4).astype(np.float32) * 0.1
    w2 = rng.standard_normal((10, 144)).astype(np.float32) * 0.1
    b2 = rng.standard_normal(10).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["f1"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(nodes, "tiny_conv",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.testing")
    onnx.checker.check_model(model, full_check=True)
    from edgekiln.fileio import atomic_save_onnx

    return atomic_save_onnx(path, model)


def tiny_torch_cnn(in_channels: int = 1, num_classes: int = 10) -> Any:
    """A seeded 8x8-input CNN (about 2.7k parameters) as a torch module: conv-relu-pool-linear."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, num_classes),
    )
    model.input_shape = (1, in_channels, 8, 8)
    return model


def random_npz(path: str | Path, shape: tuple[int, ...], *, n: int = 32, num_classes: int = 10, seed: int = 0) -> Path:
    """An npz with ``x`` (float32, ``(n, *shape[1:])``) and ``y`` (int64 labels)."""
    from edgekiln.fileio import atomic_save_npz

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape[1:])).astype(np.float32)
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    return atomic_save_npz(path, x=x, y=y)


def tiny_head_onnx(path: str | Path, *, classes: int = 8, dim: int = 16, hidden: int = 24, int8: bool = False,
                   seed: int = 0) -> Path:
    """A small classifier of :func:`edgekiln.testing.streams.class_clusters` with a trainable tail:
    Conv(1->dim/4, 3x3, stride 2) -> Relu -> MaxPool(2) -> Flatten (``dim`` features) ->
    Gemm(dim->hidden, transB=1) -> Relu -> Gemm(hidden->classes, transB=1) on a 1x8x8 input.

    The conv and the hidden layer are seeded random; the last layer is fitted in closed form
    (ridge regression on clusters of classes ``0..classes-1``), so the model classifies them
    well. ``int8=True`` writes onnxruntime's static QDQ quantization of it (per channel, int8
    weights and activations, calibrated on the same clusters).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekiln.fileio import atomic_save_onnx
    from edgekiln.testing.streams import class_clusters

    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, not {dim}")
    rng = np.random.default_rng(seed)
    ch = dim // 4
    wc = (rng.standard_normal((ch, 1, 3, 3)) * 0.6).astype(np.float32)
    bc = (rng.standard_normal(ch) * 0.05).astype(np.float32)
    w1 = (rng.standard_normal((hidden, dim)) * np.sqrt(2.0 / dim)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.05 + 0.1).astype(np.float32)
    x, y = class_clusters(40, classes=tuple(range(classes)), seed=seed + 1000)
    h = np.maximum(_tiny_features(x, wc, bc) @ w1.T + b1, 0.0)
    target = np.full((len(y), classes), -1.0) + 5.0 * np.eye(classes)[y]
    hb = np.concatenate([h, np.ones((len(h), 1))], axis=1).astype(np.float64)
    sol = np.linalg.solve(hb.T @ hb + 1e-1 * np.eye(hidden + 1), hb.T @ target)
    w2, b2 = sol[:-1].T.astype(np.float32), sol[-1].astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "wc", "bc"], ["c1"], name="conv", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_c"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["features"], name="flatten", axis=1),
        helper.make_node("Gemm", ["features", "w1", "b1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["logits"], name="fc2", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((wc, "wc"), (bc, "bc"), (w1, "w1"), (b1, "b1"),
                                                       (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(nodes, "tiny_head",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.testing")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = atomic_save_onnx(path, model)
    if int8:
        _ort_qdq(path, x)
    return path


def _tiny_features(x: np.ndarray, wc: np.ndarray, bc: np.ndarray) -> np.ndarray:
    """numpy forward of tiny_head_onnx's backbone (conv stride 2, pad 1 -> relu -> 2x2 max pool)."""
    n, ch = len(x), len(wc)
    xp = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, ch, 4, 4), np.float32)
    for i in range(4):
        for j in range(4):
            patch = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(n, 9)
            out[:, :, i, j] = patch @ wc.reshape(ch, 9).T + bc
    out = np.maximum(out, 0.0)
    return out.reshape(n, ch, 2, 2, 2, 2).max(axis=(3, 5)).reshape(n, -1)


def _ort_qdq(path: Path, calib: np.ndarray) -> None:
    """Quantize ``path`` in place with onnxruntime's static QDQ quantizer (per channel, int8)."""
    import logging
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edgekiln-tiny-", dir=Path(path).parent) as tmp:
        dst = Path(tmp) / "q.onnx"
        quantize_static(str(path), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
        dst.replace(path)
