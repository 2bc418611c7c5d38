"""Tiny, seeded deployment bundles for fleet tests, demos and the load benchmark.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> sample_bundle(d / "v1", version=1).name
    'v1'
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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
