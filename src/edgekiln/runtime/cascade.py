"""Cascade inference: a small on-device model answers the inputs it is confident about; the
rest escalate to a bigger variant or to a server.

Confidence is the top-1 softmax probability (or the margin between the two best classes).
:func:`choose_threshold` picks the lowest threshold whose cascade accuracy on validation data
stays within ``max_drop`` of the big model's, which maximizes the share answered locally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence(logits: np.ndarray, kind: str = "max-prob") -> np.ndarray:
    """Per-row confidence: ``max-prob`` (top-1 probability) or ``margin`` (top-1 minus top-2)."""
    p = softmax(logits.reshape(logits.shape[0], -1).astype(np.float64))
    if kind == "margin":
        top2 = np.sort(p, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    return p.max(axis=-1)


@dataclass
class CascadeResult:
    logits: np.ndarray
    escalated: np.ndarray     # bool per row: answered by the fallback
    fallback_failed: np.ndarray  # bool per row: escalation failed, the small model's answer was kept


class Cascade:
    """``small(x) -> logits`` first; rows below ``threshold`` go to ``big(x_rows) -> logits``.

    If ``big`` raises (server down, timeout), the small model's answer is kept and the row is
    flagged, so the device always answers.
    """

    def __init__(self, small: Callable[[np.ndarray], np.ndarray], big: Callable[[np.ndarray], np.ndarray],
                 threshold: float, kind: str = "max-prob") -> None:
        self.small, self.big, self.threshold, self.kind = small, big, threshold, kind
        self.counts = {"local": 0, "escalated": 0, "fallback_failed": 0}

    def __call__(self, x: np.ndarray) -> CascadeResult:
        logits = np.array(self.small(x), copy=True)
        conf = confidence(logits, self.kind)
        escalate = conf < self.threshold
        failed = np.zeros_like(escalate)
        if escalate.any():
            try:
                logits[escalate] = self.big(x[escalate])
            except Exception:  # noqa: BLE001 - any failure of the fallback keeps the local answer
                failed = escalate.copy()
                escalate = np.zeros_like(escalate)
        self.counts["local"] += int((~escalate).sum() - failed.sum())
        self.counts["escalated"] += int(escalate.sum())
        self.counts["fallback_failed"] += int(failed.sum())
        return CascadeResult(logits, escalate, failed)


def choose_threshold(small_logits: np.ndarray, big_logits: np.ndarray, labels: np.ndarray, *, max_drop: float,
                     kind: str = "max-prob") -> dict[str, float]:
    """The threshold that escalates the fewest rows while the cascade's accuracy is within
    ``max_drop`` of the big model's (on this validation data)."""
    conf = confidence(small_logits, kind)
    small_ok = small_logits.reshape(len(labels), -1).argmax(1) == labels
    big_ok = big_logits.reshape(len(labels), -1).argmax(1) == labels
    target = big_ok.mean() - max_drop
    best = {"threshold": float("inf"), "accuracy": float(big_ok.mean()), "escalated": 1.0}
    for t in np.unique(np.concatenate([conf, [0.0]])):
        esc = conf < t
        acc = float(np.where(esc, big_ok, small_ok).mean())
        if acc >= target and esc.mean() < best["escalated"]:
            best = {"threshold": float(t), "accuracy": acc, "escalated": float(esc.mean())}
    best["big_accuracy"] = float(big_ok.mean())
    best["small_accuracy"] = float(small_ok.mean())
    return best
