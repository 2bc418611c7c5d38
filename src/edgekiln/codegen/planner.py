"""Static memory planning: every intermediate int8 tensor gets a fixed offset in one arena.

:class:`GreedyArenaPlanner` is the greedy-by-size placement TFLite Micro uses: buffers sorted
by size (largest first) each go to the lowest offset that does not overlap any already placed
buffer whose lifetime (first..last step) intersects its own. Three calls: ``add_buffer``,
``offset``, ``total_size``; ``check`` asserts no two simultaneously live buffers overlap.

:func:`plan_memory` builds the buffers from an :class:`~edgekiln.codegen.ir.IntGraph`:
Reshape/Flatten outputs alias their input, elementwise ops (Add, requantize) write into an
input that dies at that step, the graph input is read from the caller's pointer and the graph
output written to the caller's pointer, and an op's scratch (the fast kernels' im2col rows,
:func:`edgekiln.codegen.fast_kernels.scratch`, or the portable fused conv_pool's ring of conv rows)
is a buffer live for that op's step only. It also tries a memory-aware reordering of independent
branches and keeps the schedule with the smaller arena.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekiln.codegen.fast_kernels import scratch
from edgekiln.codegen.ir import IntGraph, Op
from edgekiln.errors import EdgekilnError

#: byte alignment of every buffer offset (keeps int8 maps word-aligned for SIMD kernels later).
ALIGNMENT = 4


@dataclass
class _Buffer:
    size: int
    first: int
    last: int
    offset: int = -1


class GreedyArenaPlanner:
    """Greedy-by-size arena placement.

    ``a`` and ``c`` are never live together, so they share offset 0; ``b`` overlaps both in time
    and goes after them. Offsets are aligned, the total is not (the arena ends where the last
    byte in use ends, as TFLM's ``GetMaximumMemorySize``):

    >>> p = GreedyArenaPlanner()
    >>> a, b, c = p.add_buffer(100, 0, 1), p.add_buffer(50, 1, 2), p.add_buffer(100, 2, 3)
    >>> p.offset(a), p.offset(b), p.offset(c), p.total_size()
    (0, 100, 0, 150)
    """

    def __init__(self, alignment: int = ALIGNMENT) -> None:
        self._alignment = alignment
        self._buffers: list[_Buffer] = []
        self._planned = False

    def add_buffer(self, size: int, first_use: int, last_use: int) -> int:
        """Register a buffer live from step ``first_use`` to ``last_use`` (inclusive); return its id."""
        if size < 0 or last_use < first_use:
            raise ValueError(f"bad buffer: size={size}, first={first_use}, last={last_use}")
        self._buffers.append(_Buffer(int(size), int(first_use), int(last_use)))
        self._planned = False
        return len(self._buffers) - 1

    def offset(self, buffer_id: int) -> int:
        self._plan()
        return self._buffers[buffer_id].offset

    def total_size(self) -> int:
        self._plan()
        return max((b.offset + b.size for b in self._buffers), default=0)

    def _align(self, n: int) -> int:
        return -(-n // self._alignment) * self._alignment

    def _plan(self) -> None:
        if self._planned:
            return
        order = sorted(range(len(self._buffers)), key=lambda i: (-self._buffers[i].size, self._buffers[i].first, i))
        placed: list[_Buffer] = []
        for i in order:
            buf = self._buffers[i]
            live = sorted((b for b in placed if b.first <= buf.last and buf.first <= b.last), key=lambda b: b.offset)
            candidate = 0
            for other in live:  # first gap large enough, scanning by offset
                if candidate + buf.size <= other.offset:
                    break
                candidate = max(candidate, self._align(other.offset + other.size))
            buf.offset = candidate
            placed.append(buf)
        self._planned = True
        self.check()

    def check(self) -> None:
        """Raise AssertionError if two buffers that are live at the same step share bytes."""
        self._plan()
        bufs = self._buffers
        for i, a in enumerate(bufs):
            for b in bufs[i + 1:]:
                if a.first <= b.last and b.first <= a.last and a.size and b.size:
                    assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, \
                        f"arena overlap: {a} and {b}"


@dataclass
class MemoryPlan:
    """Where every tensor lives: ``'input'``, ``'output'`` or ``('arena', offset)``."""

    schedule: list[Op]
    location: dict[str, tuple[str, int]]
    arena_bytes: int
    live_bytes: list[int] = field(default_factory=list)   # arena bytes live at each step
    naive_bytes: int = 0                                   # every tensor in its own buffer
    reordered: bool = False
    #: op name -> bytes of its one-step scratch buffer (im2col rows, conv_pool's ring), part of the arena
    scratch_bytes: dict[str, int] = field(default_factory=dict)
    #: the layers the fast kernels cover run them (ek_kernels_dsp.h); False: every layer the portable kernel
    fast_kernels: bool = True

    def to_dict(self) -> dict[str, object]:
        return {"arena_bytes": self.arena_bytes, "naive_bytes": self.naive_bytes, "reordered": self.reordered,
                "fast_kernels": self.fast_kernels, "scratch_bytes_per_op": self.scratch_bytes,
                "scratch_bytes_max": max(self.scratch_bytes.values(), default=0),
                "live_bytes_per_step": self.live_bytes, "schedule": [op.name for op in self.schedule]}


_INPLACE_KINDS = ("add", "requantize", "lut", "lut_channel", "mul", "add_lut")


def _plan_schedule(graph: IntGraph, schedule: list[Op], fast_kernels: bool = True) -> MemoryPlan:
    in_offsets = dict(zip(graph.inputs, graph.input_offsets, strict=True))
    root: dict[str, str] = {i: i for i in graph.inputs}
    produced_at = dict.fromkeys(graph.inputs, -1)
    last_use: dict[str, int] = {}
    sizes = {name: t.size for name, t in graph.tensors.items()}
    scratch_bytes: dict[str, int] = {}
    for step, op in enumerate(schedule):
        for name in op.inputs:
            last_use[root[name]] = step
        out = op.output
        if op.kind == "reshape":
            root[out] = root[op.inputs[0]]
        elif op.kind in _INPLACE_KINDS and out not in graph.outputs:
            dying = [root[n] for n in op.inputs if root[n] not in in_offsets and n not in graph.outputs
                     and graph.tensors[n].size == graph.tensors[out].size
                     and _last_consumer(schedule, root, root[n], step) == step]
            root[out] = dying[0] if dying else out
        else:
            root[out] = out
        produced_at.setdefault(root[out], step)
        last_use[root[out]] = max(last_use.get(root[out], step), step)
        own = scratch(op, graph.tensors[op.scratch].size if op.scratch else 0, fast=fast_kernels)
        if own:  # NOTE: scratch lives for this one step only; it must not overlap in/out
            root[own[0]] = own[0]
            sizes[own[0]] = own[1]
            scratch_bytes[op.name] = own[1]
            produced_at[own[0]] = last_use[own[0]] = step
    for o in graph.outputs:
        last_use[root[o]] = len(schedule)  # the caller reads it after the last step
    planner = GreedyArenaPlanner()
    ids: dict[str, int] = {}
    # NOTE: outputs live in the caller's buffer, packed in graph order (IntGraph.output_offsets).
    out_roots = {root[o]: off for o, off in zip(graph.outputs, graph.output_offsets, strict=True)}
    if len(out_roots) != len(graph.outputs) or any(i in out_roots for i in graph.inputs):
        raise EdgekilnError("two graph outputs share one buffer (one is a reshape of the other or of the "
                            "input); C export needs distinct outputs")
    for r in sorted(set(root.values()), key=lambda r: (produced_at[r], r)):
        if r in in_offsets or r in out_roots:
            continue
        ids[r] = planner.add_buffer(sizes[r], produced_at[r], last_use[r])
    arena = planner.total_size()
    location: dict[str, tuple[str, int]] = {}
    for name, r in root.items():
        if r in in_offsets:
            location[name] = ("input", in_offsets[r])
        elif r in out_roots:
            location[name] = ("output", out_roots[r])
        else:
            location[name] = ("arena", planner.offset(ids[r]))
    live = [sum(sizes[r] for r in ids if produced_at[r] <= s <= last_use[r]) for s in range(len(schedule))]
    naive = sum(sizes[r] for r in ids)
    return MemoryPlan(schedule, location, arena, live, naive, scratch_bytes=scratch_bytes, fast_kernels=fast_kernels)


def _last_consumer(schedule: list[Op], root: dict[str, str], r: str, step: int) -> int:
    last = step
    for s in range(step, len(schedule)):
        if any(root.get(n) == r for n in schedule[s].inputs):
            last = s
    return last


def _memory_aware_order(graph: IntGraph) -> list[Op]:
    """A topological order that, among ready ops, runs the one leaving the fewest live bytes."""
    producers = {op.output: op for op in graph.ops}
    remaining = list(graph.ops)
    done: set[str] = set(graph.inputs)
    order: list[Op] = []
    while remaining:
        ready = [op for op in remaining if all(n in done or n not in producers for n in op.inputs)]

        def cost(op: Op) -> tuple[int, int]:
            frees = sum(graph.tensors[n].size for n in set(op.inputs)
                        if all(n not in o.inputs for o in remaining if o is not op))
            return (graph.tensors[op.output].size - frees, graph.ops.index(op))
        nxt = min(ready, key=cost)
        order.append(nxt)
        remaining.remove(nxt)
        done.add(nxt.output)
    return order


def plan_memory(graph: IntGraph, *, reorder: bool = True, fast_kernels: bool = True) -> MemoryPlan:
    """Plan the arena for ``graph``; with ``reorder`` also try a memory-aware op order. ``fast_kernels``:
    plan the scratch of the fast kernels (:mod:`edgekiln.codegen.fast_kernels`) the emitter then calls;
    False plans (and makes the emitter call) the portable kernels everywhere.

    >>> from edgekiln.codegen.ir import load_qdq
    >>> from edgekiln.codegen.testmodels import tiny_qdq_model
    >>> plan = plan_memory(load_qdq(tiny_qdq_model("tiny_int8.onnx")))
    >>> plan.arena_bytes, plan.naive_bytes
    (336, 672)
    """
    plan = _plan_schedule(graph, list(graph.ops), fast_kernels)
    if reorder:
        alt = _plan_schedule(graph, _memory_aware_order(graph), fast_kernels)
        if alt.arena_bytes < plan.arena_bytes:
            alt.reordered = True
            plan = alt
    return plan


def plot_live_memory(plan: MemoryPlan, path: str) -> None:
    """Bar chart of arena bytes live at each step, with the planned arena size as a line."""
    from edgekiln.report import new_figure, save_figure

    fig, ax = new_figure(max(6.0, 0.35 * len(plan.schedule)), 3.5)
    steps = range(len(plan.schedule))
    ax.bar(steps, plan.live_bytes, color="#4c78a8", label="live tensors")
    ax.axhline(plan.arena_bytes, color="#e45756", linestyle="--", label=f"arena {plan.arena_bytes} B")
    ax.set_xticks(list(steps))
    ax.set_xticklabels([op.name for op in plan.schedule], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("bytes")
    ax.set_title("live activation memory per step")
    ax.legend(fontsize=8)
    save_figure(fig, path)
