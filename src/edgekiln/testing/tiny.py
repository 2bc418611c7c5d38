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
