"""edgekiln: take a trained neural network to edge devices.

The Python API mirrors the CLI (the CLI commands call the same functions, in
:mod:`edgekiln.api`): ``load``, ``inspect``, ``fits``, ``bench``, ``quantize``, ``prune``, ``distill``,
``optimize``, and ``RunFolder``, the folder each command writes. Names resolve on first use,
so ``import edgekiln`` stays cheap (no torch, no onnxruntime).

>>> import edgekiln
>>> edgekiln.quantize.__module__, edgekiln.RunFolder.__name__
('edgekiln.api', 'RunFolder')
>>> import tempfile
>>> from edgekiln.testing.tiny import tiny_conv_onnx
>>> report = edgekiln.fits(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"), "cortex-m7", precision="int8")
>>> report.fits, report.precision, int(report.metrics["ram"].value)   # 16 KiB runtime + 288 B activations + 74 B I/O
(True, 'int8', 16746)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_API = {
    "load": "edgekiln.api", "inspect": "edgekiln.api", "fits": "edgekiln.api", "bench": "edgekiln.api", "quantize": "edgekiln.api",
    "prune": "edgekiln.api", "distill": "edgekiln.api", "optimize": "edgekiln.api", "place": "edgekiln.api",
    "learn": "edgekiln.api",
    "RunFolder": "edgekiln.models.run_folder", "ModelArtifact": "edgekiln.models.artifact",
    "EdgekilnError": "edgekiln.errors",
}
__all__ = ["EdgekilnError", "ModelArtifact", "RunFolder", "__version__", "bench", "distill", "fits", "inspect",
           "learn", "load", "optimize", "place", "prune", "quantize"]

if TYPE_CHECKING:
    from edgekiln.api import bench, distill, fits, inspect, learn, load, optimize, place, prune, quantize
    from edgekiln.errors import EdgekilnError
    from edgekiln.models.artifact import ModelArtifact
    from edgekiln.models.run_folder import RunFolder


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'edgekiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
