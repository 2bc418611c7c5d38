"""The cosine and sqnr metrics score every output of a multi-output model (MTCNN: scores and boxes;
YOLO: several heads): a candidate that keeps the first output and breaks another must not pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekiln.models.metrics import evaluate_detailed


def _two_outputs(path: Path, second_scale: float, noise: float = 0.0) -> Path:
    """y1 = x * 1, y2 = x * second_scale + noise * cos(x) (a fixed distortion)."""
    nodes = [helper.make_node("Mul", ["x", "one"], ["y1"]),
             helper.make_node("Mul", ["x", "s"], ["xs"]),
             helper.make_node("Cos", ["x"], ["cx"]),
             helper.make_node("Mul", ["cx", "n"], ["cn"]),
             helper.make_node("Add", ["xs", "cn"], ["y2"])]
    inits = [numpy_helper.from_array(np.array(v, np.float32), k)
             for k, v in (("one", 1.0), ("s", second_scale), ("n", noise))]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 8])], inits)
    onnx.save(helper.make_model(graph), path)   # the default opset and IR version, as a user saves it
    return path


def test_second_output_counts(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "eval.npz"
    np.savez(data, x=rng.normal(size=(16, 8)).astype(np.float32))
    ref = _two_outputs(tmp_path / "ref.onnx", 2.0)
    broken = _two_outputs(tmp_path / "broken.onnx", -2.0)      # first output intact, second negated
    same = evaluate_detailed(ref, data, "cosine", reference_path=ref)
    cos = evaluate_detailed(broken, data, "cosine", reference_path=ref)
    assert same["value"] > 0.999999 and same["outputs"] == 2, same
    assert cos["value"] < -0.99, f"cosine with the second output negated: {cos['value']:.4f}, want < -0.99"
    noisy = _two_outputs(tmp_path / "noisy.onnx", 2.0, noise=0.2)
    sqnr = evaluate_detailed(noisy, data, "sqnr", reference_path=ref)["value"]
    # the first output is exact (SQNR 240 dB, the floor); the second carries ~0.14 rms of noise on ~2.0 rms
    assert 15.0 < sqnr < 30.0, f"sqnr {sqnr:.1f} dB: want the second output's (15..30 dB), not the first's"
