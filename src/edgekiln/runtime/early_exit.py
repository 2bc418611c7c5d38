"""Run an early-exit model exported as stages (numpy + onnxruntime only).

Stage k returns (features, exit_logits); the runner stops at the first exit whose top-1
softmax probability clears its threshold, otherwise feeds the features to the next stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgekiln.runtime.cascade import confidence


class StagedRunner:
    def __init__(self, stage_paths: Sequence[str | Path], thresholds: Sequence[float], *, threads: int = 1) -> None:
        import onnxruntime as ort

        if len(thresholds) != len(stage_paths) - 1:
            raise ValueError(f"{len(stage_paths)} stages need {len(stage_paths) - 1} thresholds, got {len(thresholds)}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in stage_paths]
        self.thresholds = list(thresholds)
        self.exits_taken = [0] * len(stage_paths)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits for one input (batch 1) and the index of the exit that produced them."""
        h = x
        for k, sess in enumerate(self.sessions[:-1]):
            h, logits = sess.run(None, {"input": h})
            if confidence(logits)[0] >= self.thresholds[k]:
                self.exits_taken[k] += 1
                return logits, k
        self.exits_taken[-1] += 1
        return self.sessions[-1].run(None, {"input": h})[0], len(self.sessions) - 1
