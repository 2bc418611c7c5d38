"""The budget round (Linux-class targets): one trial that keeps layers float to meet the drop budget.

The trials quantize every layer: seconds each. When none of them is within ``--max-drop`` and
faster than FP32, the most accurate int8 trial that is faster than FP32 runs once more with the
quantize pass's accuracy budget (``max_drop``: rank the layers by the damage each does alone, keep
the worst float until the budget holds), given all the time left before the wrap-up. That search
costs one quantization per layer and more (MobileNetV3-small: 54 layers, minutes): run inside
every trial, once per calibration method, it ran out of time in all four and showed nothing.

>>> c = Candidate(number=2, label="quantize(scheme=int8, calibration=mse)", steps=[], drop=0.03)
>>> budget_label(c, 0.01)
'quantize(scheme=int8, calibration=mse, max_drop=0.01)'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgekiln.search.selection import beats_fp32
from edgekiln.search.trial import Candidate

MIN_S = 30.0    # a budget round with less time than this (or than twice its trial's own time) is not started


def budget_payload(candidates: Sequence[Candidate], baseline: Candidate, base_payload: dict[str, Any], *,
                   max_drop: float | None, tolerance: float, seconds_left: float | None,
                   number: int) -> tuple[dict[str, Any] | None, str | None]:
    """The payload of the budget round, or None and (when the round was worth running) why it is not.

    ``seconds_left`` is the time before the wrap-up (None: no limit); ``number`` the new trial's number.
    """
    if max_drop is None:
        return None, None
    if any(c.feasible and beats_fp32(c, baseline, tolerance) for c in candidates if c.number != baseline.number):
        return None, None   # a candidate already is faster than FP32 within the budget
    over = [c for c in candidates if _every_layer_int8(c) and c.state == "complete" and c.drop is not None
            and c.violations and all(v.startswith("accuracy drop:") for v in c.violations)]
    if not over:
        return None, None
    # NOTE: faster than FP32 at all, without the selection's noise margin (``tolerance``, used above): trials are
    # timed minutes apart from FP32 (ShuffleNetV2's best every-layer int8 trials: 1.06x and 1.09x FP32 in the
    # final round, inside the margin when the round was decided); the selection still applies the margin.
    faster = [c for c in over if beats_fp32(c, baseline)]
    if not faster:
        return None, (f"budget round not run: no int8 trial over the drop budget is faster than FP32 even with every "
                      f"layer int8 ({len(over)} over it), and keeping layers float only slows a model down")
    best = min(faster, key=lambda c: (c.drop, c.latency_ms_host or 0.0, c.number))
    need = max(MIN_S, 2 * best.seconds)
    if seconds_left is not None and seconds_left < need:
        return None, (f"budget round not run: {seconds_left:.0f} s left before the wrap-up, {need:.0f} s needed at "
                      f"least (trial {best.number} alone took {best.seconds:.0f} s); a larger --timeout gives it time")
    steps = [{**s, "config": {**(s.get("config") or {}), "max_drop": max_drop}} if s.get("pass") == "quantize" else s
             for s in best.steps]
    payload = {**base_payload, "number": number, "label": budget_label(best, max_drop), "steps": steps,
               "time_limit_s": seconds_left}
    return payload, None


def budget_label(c: Candidate, max_drop: float) -> str:
    """``c``'s label with the budget shown as the quantize option it is."""
    return f"{c.label[:-1]}, max_drop={max_drop:g})" if c.label.endswith(")") else f"{c.label} + max_drop={max_drop:g}"


def _every_layer_int8(c: Candidate) -> bool:
    """Whether ``c`` quantized with int8 and no accuracy budget (every layer, as the trials do)."""
    quant = [s for s in c.steps if s.get("pass") == "quantize"]
    return bool(quant) and all((s.get("config") or {}).get("scheme", "int8") == "int8"
                               and (s.get("config") or {}).get("max_drop") is None for s in quant)
