"""Run an early-exit model exported as stages (numpy + onnxruntime only).

Stage k returns (features, exit_logits[, exit_confidence]); the runner stops at the first exit
whose top-1 softmax probability clears its threshold, otherwise feeds the features to the next
stage. Stages exported by :func:`edgekiln.compress.early_exit.export_stages` carry the
confidence as a third output, so the decision between stage calls is one float comparison.

For the batch-1 shape a device serves, the stages are chained through buffers bound once
(:class:`~edgekiln.runtime.bound.BoundSession`): each stage writes its features straight into
the next stage's input, so staging costs the extra onnxruntime calls and nothing else.

>>> runner = StagedRunner(["stage0.onnx", "stage1.onnx"], [0.9])   # doctest: +SKIP
>>> logits, exit_index = runner(x)                                  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgekiln.runtime.bound import BoundSession, bind_chain
from edgekiln.runtime.cascade import confidence


def _exit_confidence(outs: Sequence[np.ndarray]) -> float:
    """The exit's confidence: the stage's third output, or the top-1 softmax of its logits."""
    return float(outs[2].reshape(-1)[0]) if len(outs) > 2 else float(confidence(outs[1])[0])


class StagedRunner:
    """Batch-1 staged inference with per-exit confidence thresholds (a threshold above 1 means
    "never exit here"). ``exits_taken[k]`` counts the requests answered by exit ``k`` (the last
    index is the full model)."""

    def __init__(self, stage_paths: Sequence[str | Path], thresholds: Sequence[float], *, threads: int = 1) -> None:
        from edgekiln.execution.ort import ort_session

        if len(thresholds) != len(stage_paths) - 1:
            raise ValueError(f"{len(stage_paths)} stages need {len(stage_paths) - 1} thresholds, got {len(thresholds)}")
        self.sessions = [ort_session(Path(p), threads=threads) for p in stage_paths]
        self.input_names = [s.get_inputs()[0].name for s in self.sessions]
        # NOTE: naming the outputs instead of passing None saves ~3 us of a ~20 us stage call.
        self.output_names = [[o.name for o in s.get_outputs()] for s in self.sessions]
        self.thresholds = [float(t) for t in thresholds]
        self.exits_taken = [0] * len(stage_paths)
        self._chain = self._bind_batch_one()
        self._lock = threading.Lock()

    def _bind_batch_one(self) -> list[BoundSession] | None:
        """Stages chained through bound buffers for a batch-1 input, when the first stage's
        input shape is fixed apart from the batch dimension (else ``None``: plain calls)."""
        first = self.sessions[0].get_inputs()[0]
        dims = list(first.shape)
        if not dims or any(not isinstance(d, int) for d in dims[1:]) or "float" not in first.type:
            return None
        dtype = np.float16 if "float16" in first.type else np.float32
        return bind_chain(self.sessions, np.zeros([1, *dims[1:]], dtype))

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits for one input (batch 1) and the index of the exit that produced them."""
        chain = self._chain
        if chain is not None and x.shape == chain[0].input.shape and self._lock.acquire(blocking=False):
            try:
                return self._call_bound(chain, x)
            finally:
                self._lock.release()
        h = x
        for k in range(len(self.sessions) - 1):
            outs = self.sessions[k].run(self.output_names[k], {self.input_names[k]: h})
            h, logits = outs[0], outs[1]
            if _exit_confidence(outs) >= self.thresholds[k]:
                self.exits_taken[k] += 1
                return logits, k
        self.exits_taken[-1] += 1
        return self.sessions[-1].run(self.output_names[-1][:1], {self.input_names[-1]: h})[0], len(self.sessions) - 1

    def _call_bound(self, chain: list[BoundSession], x: np.ndarray) -> tuple[np.ndarray, int]:
        np.copyto(chain[0].input, x, casting="same_kind")
        for k in range(len(chain) - 1):
            outs = chain[k]()
            if _exit_confidence(outs) >= self.thresholds[k]:
                self.exits_taken[k] += 1
                return outs[1].copy(), k
        self.exits_taken[-1] += 1
        return chain[-1]()[0].copy(), len(chain) - 1

    def all_exits(self, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
        """Logits of every exit and of the final stage on a batch (for choosing thresholds)."""
        outs: list[list[np.ndarray]] = [[] for _ in self.sessions]
        for i in range(0, len(x), batch_size):
            h = x[i:i + batch_size]
            for k, sess in enumerate(self.sessions):
                res = sess.run(None, {self.input_names[k]: h})
                if k < len(self.sessions) - 1:
                    h = res[0]
                    outs[k].append(res[1])
                else:
                    outs[k].append(res[0])
        return [np.concatenate(o) for o in outs]
