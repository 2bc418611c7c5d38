"""Simplify pass: fold constants, drop redundant nodes and fuse Conv+BatchNorm with onnxruntime's
offline graph optimizer, then check the result computes the same function.

Only the ``basic`` level is portable: it rewrites the graph with standard ONNX ops, so the
result still runs everywhere (OpenVINO, the C backend, TFLite export). ``extended`` adds
onnxruntime-only fused ops (``com.microsoft`` domain) and is therefore opt-in.

>>> SimplifyConfig().level
'basic'
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, provenance_record

LEVELS = ("basic", "extended")


@dataclass(frozen=True, kw_only=True)
class SimplifyConfig(PassConfig):
    """Rewrite the float graph into an equivalent, smaller one."""

    level: str = "basic"  # basic: portable ONNX ops only; extended: also onnxruntime-only fusions
    max_rel_error: float = 1e-4  # max |simplified - original| / max |original| on random inputs

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)} (got {self.level!r})")
        if not self.max_rel_error > 0:
            raise ValueError(f"max_rel_error must be > 0 (got {self.max_rel_error})")


def run(artifact: ModelArtifact, config: SimplifyConfig, ctx: PassContext) -> ModelArtifact:
    import onnx

    from edgekiln.execution.ort import error_line, ort_session

    out = ctx.work_dir / "model.onnx"
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=ctx.work_dir)
    os.close(fd)
    try:
        try:
            ort_session(Path(artifact.path), optimize="basic" if config.level == "basic" else "extended",
                        save_optimized=tmp)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for a bad graph
            raise EdgekilnError(f"simplify: onnxruntime cannot load {artifact.path}: {error_line(exc)}") from exc
        err = _relative_error(artifact.path, Path(tmp), artifact, ctx.seed)
        if not err <= config.max_rel_error:
            raise EdgekilnError(f"simplify: the simplified model differs from its input by {err:.3g} "
                                f"(relative; limit {config.max_rel_error:g})")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    before = len(onnx.load(str(artifact.path), load_external_data=False).graph.node)
    after = len(onnx.load(str(out), load_external_data=False).graph.node)
    record = provenance_record("simplify", config, artifact, nodes_before=before, nodes_after=after,
                               max_rel_error=err)
    return artifact.with_pass(kind=ONNX_FLOAT, path=out, record=record)


def _relative_error(original: Path, simplified: Path, artifact: ModelArtifact, seed: int) -> float:
    """Max abs difference of the first output over 4 random feeds, relative to the output's range."""
    from edgekiln.execution.feeds import random_feeds
    from edgekiln.execution.ort import ort_session

    a = ort_session(original, optimize=False)
    b = ort_session(simplified, optimize=False)
    worst, scale = 0.0, 0.0
    for k in range(4):
        feeds = random_feeds(artifact.inputs, seed=seed + k)   # every input, in its dtype
        ya = a.run(None, feeds)[0]
        yb = b.run(None, feeds)[0]
        worst = max(worst, float(np.abs(ya - yb).max()))
        scale = max(scale, float(np.abs(ya).max()))
    return worst / max(scale, 1e-12)


SPEC = PassSpec(name="simplify", config_type=SimplifyConfig, run=run, consumes=frozenset({ONNX_FLOAT}),
                produces=ONNX_FLOAT, summary="constant folding, redundant-node removal, Conv+BN fusion (onnxruntime offline)")
