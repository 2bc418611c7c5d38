"""TFLite Micro arena measurement: what TFLM reports, and the smallest arena with which it really runs.

TFLM's Python interpreter (``tflite-micro`` package) prints its arena use with
``print_allocations()`` (head = non-persistent activation buffers, tail = persistent tensor and
kernel data). That number is *not* the arena a user must reserve: on small models the smallest
``arena_size`` that actually ran was 23-32% larger (FIELD-NOTES), because allocation during
``Prepare`` needs temporary space and the arena start is realigned. Both numbers are measured here.

Every probe runs in a child process: a too-small arena can crash the whole Python process
(arenas <= 256 B did, here), which must not take the caller down.

>>> info = tflm_arena("model.tflite")  # doctest: +SKIP
>>> info["smallest_running_bytes"] >= info["reported_bytes"]  # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError

__all__ = ["RESOLUTION_BYTES", "arena_comparison", "parse_allocations", "probe_arena", "tflm_arena"]

# NOTE: TFLM aligns arena allocations to 16 bytes, so a finer search resolution means nothing.
RESOLUTION_BYTES = 16

# One inference with an all-zero-point input. Exit 0 and a JSON line on success; anything else
# (exception, abort, segfault) is a failure to run at this arena size.
_PROBE = r"""
import json, sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
path, arena = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
model = runtime.convert_bytearray_to_object(bytearray(data))
n_in = len(model.subgraphs[0].inputs)
it = runtime.Interpreter.from_bytes(data, arena_size=arena)
for i in range(n_in):
    d = it.get_input_details(i)
    zp = d["quantization_parameters"]["zero_points"]
    fill = int(zp[0]) if len(zp) else 0
    it.set_input(np.full(d["shape"], fill, dtype=d["dtype"]), i)
it.invoke()
sys.stderr.flush()
it.print_allocations()
print(json.dumps({"ok": True}), flush=True)
"""

_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_HEAD = re.compile(r"Arena allocation head (\d+) bytes")
_TAIL = re.compile(r"Arena allocation tail (\d+) bytes")


def probe_arena(path: str | Path, arena_bytes: int, timeout_s: float = 30.0) -> tuple[bool, str]:
    """Run one inference of ``path`` in TFLM with an ``arena_bytes`` arena, in a child process.

    Returns whether it ran and the child's stderr (``print_allocations()`` output on success).

    >>> ok, log = probe_arena("model.tflite", 64 << 10)  # doctest: +SKIP
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="0")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(arena_bytes)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    ok = proc.returncode == 0 and '"ok": true' in proc.stdout
    return ok, proc.stderr


def parse_allocations(text: str) -> dict[str, int]:
    """Parse ``print_allocations()`` output into total / non-persistent (head) / persistent (tail) bytes.

    >>> parse_allocations("Arena allocation total 96 bytes\\nArena allocation head 64 bytes")
    {'total': 96, 'head': 64, 'tail': 0}
    """
    found = {k: rx.search(text) for k, rx in (("total", _TOTAL), ("head", _HEAD), ("tail", _TAIL))}
    if found["total"] is None:
        raise EdgekilnError("TFLM printed no 'Arena allocation total' line; cannot read its arena use")
    return {k: int(m.group(1)) if m else 0 for k, m in found.items()}


def tflm_arena(tflite_path: str | Path, *, max_arena_bytes: int = 64 << 20,
               time_budget_s: float = 120.0, probe_timeout_s: float = 30.0) -> dict[str, Any]:
    """Measure the TFLM arena for ``tflite_path``.

    Returns ``reported_bytes`` (``print_allocations`` total), ``persistent_bytes`` (tail),
    ``nonpersistent_bytes`` (head), ``smallest_running_bytes`` (bisection to 16 B over child
    processes that each run one inference), ``probes`` (child processes used) and ``seconds``.
    Raises :class:`EdgekilnError` if the model does not run even with ``max_arena_bytes``.
    """
    path = Path(tflite_path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: no such .tflite file")
    t0 = time.monotonic()
    probes = 0
    generous = min(max_arena_bytes, max(64 << 10, 10 * path.stat().st_size))
    ok, err = probe_arena(path, generous, probe_timeout_s)
    probes += 1
    if not ok and generous < max_arena_bytes:
        generous = max_arena_bytes
        ok, err = probe_arena(path, generous, probe_timeout_s)
        probes += 1
    if not ok:
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise EdgekilnError(f"{path}: TFLM could not run the model with a {generous} B arena: {last}")
    alloc = parse_allocations(err)

    # Bracket the smallest running size: hi runs, lo does not (sizes <= 256 B are assumed to fail).
    hi, lo = generous, 0
    cand = max(RESOLUTION_BYTES, alloc["total"])
    ok, _ = probe_arena(path, cand, probe_timeout_s)
    probes += 1
    if ok:
        hi = cand
        lo = 0  # reported already runs; search below it
    else:
        lo = cand
        step = max(RESOLUTION_BYTES, cand // 4)
        while lo + step < hi:
            ok, _ = probe_arena(path, lo + step, probe_timeout_s)
            probes += 1
            if ok:
                hi = lo + step
                break
            lo += step
            step *= 2
    timed_out = False
    while hi - lo > RESOLUTION_BYTES:
        if time.monotonic() - t0 > time_budget_s:
            timed_out = True
            break
        mid = (lo + hi) // 2
        mid -= mid % RESOLUTION_BYTES
        if mid <= lo:
            break
        ok, _ = probe_arena(path, mid, probe_timeout_s)
        probes += 1
        if ok:
            hi = mid
        else:
            lo = mid
    return {
        "reported_bytes": alloc["total"],
        "persistent_bytes": alloc["tail"],
        "nonpersistent_bytes": alloc["head"],
        "smallest_running_bytes": hi,
        "resolution_bytes": RESOLUTION_BYTES if not timed_out else hi - lo,
        "probes": probes,
        "seconds": round(time.monotonic() - t0, 2),
    }


def arena_comparison(qdq_onnx_path: str | Path, work_dir: str | Path) -> dict[str, Any]:
    """edgekiln's planned arena vs TFLM's for one int8 QDQ model (the issue's <= 0.6x target).

    Writes ``work_dir/model.tflite`` and measures it with :func:`tflm_arena`. NOTE: TFLM's arena
    holds the input and output tensors and its persistent structs; edgekiln's arena holds only
    intermediates (input and output are the caller's buffers), so ``edgekiln_ram_bytes``
    (arena + input + output) is also given, and both ratios are reported.
    """
    from edgekiln.codegen.ir import load_qdq
    from edgekiln.codegen.planner import plan_memory
    from edgekiln.codegen.tflite.writer import write_tflite

    graph = load_qdq(qdq_onnx_path)
    path = write_tflite(graph, Path(work_dir) / "model.tflite")
    tflm = tflm_arena(path)
    plan = plan_memory(graph)
    io = graph.tensors[graph.input].size + graph.tensors[graph.output].size
    ek, ram = plan.arena_bytes, plan.arena_bytes + io
    return {
        "tflite_bytes": path.stat().st_size,
        "tflm": tflm,
        "edgekiln_arena_bytes": ek,
        "edgekiln_io_bytes": io,
        "edgekiln_ram_bytes": ram,
        "ratio_arena_vs_tflm_reported": round(ek / tflm["reported_bytes"], 4),
        "ratio_arena_vs_tflm_smallest_running": round(ek / tflm["smallest_running_bytes"], 4),
        "ratio_ram_vs_tflm_reported": round(ram / tflm["reported_bytes"], 4),
        "ratio_ram_vs_tflm_smallest_running": round(ram / tflm["smallest_running_bytes"], 4),
    }


if __name__ == "__main__":  # pragma: no cover - manual measurement helper
    # python -m edgekiln.codegen.tflite.tflm MODEL.tflite | MODEL_qdq.onnx [WORK_DIR]
    target = Path(sys.argv[1])
    if target.suffix == ".onnx":
        result = arena_comparison(target, sys.argv[2] if len(sys.argv) > 2 else target.parent)
    else:
        result = tflm_arena(target)
    print(json.dumps(result, indent=2))
