"""Tiny seeded int8 QDQ ONNX models for the TFLite writer's tests, docs and measurements.

Each builder writes a float model with ``onnx.helper`` (no torch) and quantizes it with
onnxruntime's ``quantize_static`` in QDQ format, per-channel symmetric int8 weights, int8
activations: the format the quantize pass produces.

>>> qdq, x = build_qdq("cnn", "models")
>>> qdq.name, x.shape
('cnn_qdq.onnx', (64, 1, 28, 28))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.fileio import atomic_save_onnx


def _conv(rng: np.random.Generator, name: str, x: str, y: str, cin: int, cout: int, k: int, *,
          group: int = 1, pad: int = 0, stride: int = 1) -> tuple[list[Any], list[Any]]:
    from onnx import helper, numpy_helper

    fan_in = cin // group * k * k
    w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(fan_in)).astype(np.float32)
    # NOTE: a spread of per-channel magnitudes makes per-channel quantization matter.
    w *= np.linspace(0.5, 2.0, cout, dtype=np.float32)[:, None, None, None]
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    node = helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, kernel_shape=[k, k],
                            pads=[pad] * 4, strides=[stride] * 2, group=group)
    return [node], [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]


def _gemm(rng: np.random.Generator, name: str, x: str, y: str, n_in: int, n_out: int) -> tuple[list, list]:
    from onnx import helper, numpy_helper

    w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    node = helper.make_node("Gemm", [x, f"{name}_w", f"{name}_b"], [y], name=name, transB=1)
    return [node], [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]


def float_model(kind: str, *, seed: int = 0) -> tuple[Any, tuple[int, ...]]:
    """A float ONNX model: ``cnn`` / ``mnist`` (conv-relu-pool x2 + fc on 1x28x28, widths 8/16 and
    16/32), ``tiny`` (1x8x8), ``dwres`` (depthwise +
    residual add + global average pool, 3x10x10), ``concat`` (concat + average pool + softmax, 2x8x8).
    """
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []

    def add(pair: tuple[list, list]) -> None:
        nodes.extend(pair[0])
        inits.extend(pair[1])

    mk = helper.make_node
    if kind in ("cnn", "mnist"):
        c1, c2 = (8, 16) if kind == "cnn" else (16, 32)
        shape = (1, 1, 28, 28)
        add(_conv(rng, "conv1", "input", "c1", 1, c1, 3, pad=1))
        nodes += [mk("Relu", ["c1"], ["r1"], name="relu1"),
                  mk("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2])]
        add(_conv(rng, "conv2", "p1", "c2", c1, c2, 3, pad=1))
        nodes += [mk("Relu", ["c2"], ["r2"], name="relu2"),
                  mk("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
                  mk("Flatten", ["p2"], ["f"], name="flatten", axis=1)]
        add(_gemm(rng, "fc", "f", "output", c2 * 7 * 7, 10))
        n_out = 10
    elif kind == "tiny":
        shape = (1, 1, 8, 8)
        add(_conv(rng, "conv1", "input", "c1", 1, 4, 3))
        nodes += [mk("Relu", ["c1"], ["r1"], name="relu1"), mk("Flatten", ["r1"], ["f"], name="flatten", axis=1)]
        add(_gemm(rng, "fc", "f", "output", 4 * 6 * 6, 10))
        n_out = 10
    elif kind == "dwres":
        shape = (1, 3, 10, 10)
        add(_conv(rng, "stem", "input", "s", 3, 8, 3, pad=1, stride=2))
        nodes.append(mk("Relu", ["s"], ["s_r"], name="stem_relu"))
        add(_conv(rng, "dw", "s_r", "d", 8, 8, 3, pad=1, group=8))
        nodes.append(mk("Clip", ["d", "c_lo", "c_hi"], ["d_r"], name="dw_relu6"))
        inits += [helper.make_tensor("c_lo", TensorProto.FLOAT, [], [0.0]),
                  helper.make_tensor("c_hi", TensorProto.FLOAT, [], [6.0])]
        add(_conv(rng, "pw", "d_r", "p", 8, 8, 1))
        nodes += [mk("Add", ["p", "s_r"], ["a"], name="residual"),
                  mk("GlobalAveragePool", ["a"], ["g"], name="gap"),
                  mk("Flatten", ["g"], ["f"], name="flatten", axis=1)]
        add(_gemm(rng, "fc", "f", "output", 8, 5))
        n_out = 5
    elif kind == "concat":
        shape = (1, 2, 8, 8)
        add(_conv(rng, "a", "input", "ya", 2, 4, 3, pad=1))
        add(_conv(rng, "b", "input", "yb", 2, 4, 1))
        nodes += [mk("Relu", ["ya"], ["ra"], name="relu_a"),
                  mk("Concat", ["ra", "yb"], ["cat"], name="concat", axis=1),
                  mk("AveragePool", ["cat"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
                  mk("Reshape", ["ap", "flat_shape"], ["f"], name="reshape")]
        inits.append(helper.make_tensor("flat_shape", TensorProto.INT64, [2], [1, 8 * 4 * 4]))
        add(_gemm(rng, "fc", "f", "logits", 8 * 4 * 4, 6))
        n_out = 6
        nodes.append(mk("Softmax", ["logits"], ["output"], name="softmax", axis=-1))
    else:
        raise ValueError(f"unknown test model kind {kind!r}")
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.tests")
    onnx.checker.check_model(model, full_check=True)
    return model, shape


def build_qdq(kind: str, out_dir: str | Path, *, seed: int = 0, n_calib: int = 32,
              n_eval: int = 64) -> tuple[Path, np.ndarray]:
    """Write ``<kind>_float.onnx`` and ``<kind>_qdq.onnx`` into ``out_dir``; return (qdq path, eval x)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgekiln.execution.ort import lower_for_ort

    out_dir = Path(out_dir)
    model, shape = float_model(kind, seed=seed)
    # NOTE: quantize_static opens the file in onnxruntime: write the IR/opset it reads
    fpath = atomic_save_onnx(out_dir / f"{kind}_float.onnx", lower_for_ort(model))
    rng = np.random.default_rng(seed + 1)
    calib = rng.standard_normal((n_calib, *shape[1:])).astype(np.float32)
    x_eval = rng.standard_normal((n_eval, *shape[1:])).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib[i: i + 1] for i in range(len(calib)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            nxt = next(self._it, None)
            return None if nxt is None else {"input": nxt}

    qpath = out_dir / f"{kind}_qdq.onnx"
    quantize_static(str(fpath), str(qpath), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return qpath, x_eval
