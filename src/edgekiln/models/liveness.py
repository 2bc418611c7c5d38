"""Tensor lifetimes and live memory over a fixed schedule (pure Python, no ONNX needed).

The schedule is a list of steps (one node each). A tensor is live from the step that produces
it to the last step that consumes it, both inclusive; graph inputs are produced "at step 0"
and graph outputs stay live to the last step. Summing the sizes of the live tensors at every
step gives the RAM a static arena needs when no two live tensors share memory (no in-place
reuse). The microcontroller planner reuses :func:`compute_liveness` with its own sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Liveness:
    """Result of :func:`compute_liveness`.

    ``intervals[name] = (first_step, last_step)``, inclusive; ``live_bytes_per_step[k]`` is the
    total size of the tensors live during step ``k``; ``peak_step`` is the first step at the peak.
    """

    intervals: dict[str, tuple[int, int]]
    live_bytes_per_step: tuple[int, ...]
    peak_bytes: int
    peak_step: int


def compute_liveness(
    sizes: Mapping[str, int],
    producers: Mapping[str, int],
    consumers: Mapping[str, Sequence[int]],
    num_steps: int,
    *,
    outputs: Iterable[str] = (),
) -> Liveness:
    """Lifetimes and live bytes per step for the tensors in ``sizes``.

    ``producers[name]`` is the step producing a tensor (absent for graph inputs: step 0);
    ``consumers[name]`` the steps reading it; ``outputs`` are kept live to the last step.
    A tensor nobody reads still occupies memory at the step that writes it.

    >>> lv = compute_liveness({"x": 4, "a": 8, "y": 2}, {"a": 0, "y": 1},
    ...                       {"x": [0], "a": [1]}, 2, outputs=["y"])
    >>> lv.live_bytes_per_step, lv.peak_bytes, lv.peak_step
    ((12, 10), 12, 0)
    """
    last_step = max(num_steps - 1, 0)
    keep = set(outputs)
    intervals: dict[str, tuple[int, int]] = {}
    for name in sizes:
        first = producers.get(name, 0)
        reads = consumers.get(name, ())
        last = max(reads) if reads else first
        if name in keep:
            last = last_step
        if last < first:
            raise ValueError(f"tensor '{name}' is read at step {last} before it is produced at step {first}")
        intervals[name] = (first, last)
    # NOTE: a difference array keeps this O(tensors + steps) for graphs with thousands of nodes.
    delta = [0] * (last_step + 2)
    for name, (first, last) in intervals.items():
        delta[first] += int(sizes[name])
        delta[last + 1] -= int(sizes[name])
    live: list[int] = []
    running = 0
    for step in range(last_step + 1):
        running += delta[step]
        live.append(running)
    peak = max(live) if live else 0
    return Liveness(intervals=intervals, live_bytes_per_step=tuple(live), peak_bytes=peak,
                    peak_step=live.index(peak) if live else 0)
