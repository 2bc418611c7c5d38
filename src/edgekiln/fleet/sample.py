"""Tiny, seeded deployment bundles for fleet tests, demos and the load benchmark.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> sample_bundle(d / "v1", version=1).name
    'v1'

:func:`sample_mlp_bundle` builds an MLP bundle of a chosen size whose later versions change a
chosen share of the weights (the delta-update tests and the ``transfer`` benchmark).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def sample_bundle(out: str | Path, *, name: str = "digits", version: int = 1, seed: int = 0,
                  broken: bool = False) -> Path:
    """Build a one-variant bundle of the tiny test CNN at ``out``. ``broken=True`` gives a bundle that
    is valid (publishable, hashes match) but fails the device health check: its expected outputs
    are shifted far beyond the health tolerance."""
    from edgekiln.execution.specs import TensorSpec
    from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.runtime.bundle import build_bundle
    from edgekiln.testing.tiny import random_npz, tiny_conv_onnx

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="edgekiln-sample-") as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        tiny_conv_onnx(run / "model.onnx", seed=seed)
        random_npz(run / "eval.npz", (1, 1, 8, 8), n=4, seed=seed + 100)
        model = ModelArtifact(kind=ONNX_FLOAT, path=run / "model.onnx", inputs=(TensorSpec("input", (1, 1, 8, 8)),),
                              data={"eval": run / "eval.npz"})
        RunFolder(run).write(command="example", model=model, markdown="# sample",
                             measurements={"metric": 0.9, "latency_ms": 0.1, "metric_name": "accuracy"})
        manifest = build_bundle([run], out, name=name, version=str(version), samples=4)
    if broken:
        path = out / str(manifest.sample_outputs)
        with np.load(path) as npz:
            shifted = {k: npz[k] + 1000.0 for k in npz.files}
        np.savez(path, **shifted)
    return out


MLP_INPUT = 64
MLP_CLASSES = 10
CHANGE_KINDS = ("tail", "scattered", "all")


def _mlp_hidden(params: int) -> int:
    """Width H of the 3 hidden layers (64 -> H -> H -> H -> 10) closest to ``params`` parameters."""
    a, b, c = 2.0, MLP_INPUT + 2 * 1.0 + MLP_CLASSES + 1.0, MLP_CLASSES - params
    return max(4, int(round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))))


def mlp_weights(params: int, *, seed: int = 0, change: float = 0.0, how: str = "tail",
                change_seed: int = 1) -> list[np.ndarray]:
    """The float32 weights [w1, b1, ..., w4, b4] of the MLP; ``change`` (0..1) of the elements moved
    from the seed's values: the last ones of the last layers (``tail``, a fine-tune of the head),
    a seeded random choice (``scattered``), or every weight by a small step (``all``, a FedAvg round)."""
    if how not in CHANGE_KINDS:
        raise ValueError(f"how={how!r}: one of {CHANGE_KINDS}")
    h = _mlp_hidden(params)
    dims = [MLP_INPUT, h, h, h, MLP_CLASSES]
    rng = np.random.default_rng(seed)
    weights: list[np.ndarray] = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
        weights.append((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32))
        weights.append((rng.standard_normal(fan_out) * 0.1).astype(np.float32))
    if change <= 0:
        return weights
    flat = np.concatenate([w.ravel() for w in weights])
    moves = np.random.default_rng(change_seed)
    if how == "all":
        flat = flat + (moves.standard_normal(flat.size) * 1e-3).astype(np.float32)
    else:
        k = int(round(min(1.0, change) * flat.size))
        idx = np.arange(flat.size - k, flat.size) if how == "tail" else moves.choice(flat.size, k, replace=False)
        flat[idx] += (moves.standard_normal(k) * 0.01).astype(np.float32)
    out, at = [], 0
    for w in weights:
        out.append(flat[at:at + w.size].reshape(w.shape).astype(np.float32))
        at += w.size
    return out


def mlp_onnx(path: Path, weights: list[np.ndarray], *, int8: bool = False) -> Path:
    """MatMul+Add+Relu layers; ``int8=True`` stores each matrix as int8 with a per-tensor scale
    (DequantizeLinear), the shape of a re-quantized model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekiln.fileio import atomic_save_onnx

    nodes: list[Any] = []
    inits: list[Any] = []
    x = "input"
    layers = len(weights) // 2
    for i in range(layers):
        w, b = weights[2 * i], weights[2 * i + 1]
        wname = f"w{i}"
        if int8:
            scale = np.float32(np.abs(w).max() / 127.0 or 1.0)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(q, f"{wname}_q"), numpy_helper.from_array(np.array(scale), f"{wname}_s"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{wname}_z")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{wname}_q", f"{wname}_s", f"{wname}_z"], [wname]))
        else:
            inits.append(numpy_helper.from_array(w, wname))
        inits.append(numpy_helper.from_array(b, f"b{i}"))
        nodes.append(helper.make_node("MatMul", [x, wname], [f"m{i}"]))
        out = "logits" if i == layers - 1 else f"a{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out if i == layers - 1 else f"z{i}"]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        x = out
    graph = helper.make_graph(nodes, "sample_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", MLP_INPUT])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", MLP_CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekiln.sample")
    onnx.checker.check_model(model)
    return atomic_save_onnx(path, model)


def sample_mlp_bundle(out: str | Path, *, params: int = 5000, name: str = "mlp", version: int = 1, seed: int = 0,
                      change: float = 0.0, how: str = "tail", int8: bool = False) -> Path:
    """A one-variant bundle of a seeded MLP with about ``params`` float32 parameters (4 bytes each;
    ``params=2_400_000`` gives a ~9.5 MB tar). Version ``v`` with ``change > 0`` moves that share of
    the weights of the same ``seed`` (see :func:`mlp_weights`; the moves are seeded by ``version``)."""
    from edgekiln.execution.specs import TensorSpec
    from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.runtime.bundle import build_bundle
    from edgekiln.testing.tiny import random_npz

    out = Path(out)
    weights = mlp_weights(params, seed=seed, change=change, how=how, change_seed=version)
    with tempfile.TemporaryDirectory(prefix="edgekiln-sample-") as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        mlp_onnx(run / "model.onnx", weights, int8=int8)
        random_npz(run / "eval.npz", (1, MLP_INPUT), n=4, seed=seed + 100)
        model = ModelArtifact(kind=ONNX_FLOAT, path=run / "model.onnx", inputs=(TensorSpec("input", (1, MLP_INPUT)),),
                              data={"eval": run / "eval.npz"})
        RunFolder(run).write(command="example", model=model, markdown="# sample mlp",
                             measurements={"metric": 0.9, "latency_ms": 0.1, "metric_name": "accuracy"})
        build_bundle([run], out, name=name, version=str(version), samples=4)
    return out
