"""Per-layer time on a runtime: where a model's milliseconds go, from the runtime's own profiler.

* onnxruntime: ``enable_profiling`` writes a Chrome-trace JSON; each ``Node`` event
  ``<node>_kernel_time`` carries the (optimized, fused) node's name and ``op_name``.
* OpenVINO: ``PERF_COUNT`` on the compiled model; ``get_profiling_info()`` gives each executed
  node's type, the kernel that ran it (``exec_type``, e.g. ``brgconv_avx512_amx_I8`` or
  ``jit_avx512_FP32``: whether an int8 kernel ran) and its time.

Both report the graph as the runtime executes it (after its fusions), so an int8 model shows the
QLinearConv / int8 convolutions it fused and the float islands left between them. Times are means
per call over ``runs`` calls after a warm-up, one thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def layer_profile(model_path: str | Path, runtime: str, feed: Mapping[str, np.ndarray], *, runs: int = 20,
                  warmup: int = 5) -> list[dict[str, Any]]:
    """``[{"node", "op", "kernel", "ms"}]`` per executed node of ``model_path`` on ``runtime``
    (``onnxruntime`` or ``openvino``), costliest first; ``ms`` is the mean per call.

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> m = tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx")
    >>> rows = layer_profile(m, "onnxruntime", {"input": np.zeros((1, 1, 8, 8), np.float32)}, runs=3)
    >>> sorted({r["op"] for r in rows}) >= ["Conv"], all(r["ms"] >= 0 for r in rows)
    (True, True)
    """
    if runtime == "onnxruntime":
        return _ort_profile(Path(model_path), dict(feed), runs, warmup)
    if runtime == "openvino":
        return _ov_profile(Path(model_path), dict(feed), runs, warmup)
    raise ValueError(f"no per-layer profiler for runtime {runtime!r} (have: onnxruntime, openvino)")


def by_op(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Total ms per op type, costliest first.

    >>> by_op([{"op": "Conv", "ms": 1.0}, {"op": "Relu", "ms": 0.5}, {"op": "Conv", "ms": 2.0}])
    {'Conv': 3.0, 'Relu': 0.5}
    """
    total: dict[str, float] = {}
    for r in rows:
        total[r["op"]] = total.get(r["op"], 0.0) + float(r["ms"])
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _ort_profile(path: Path, feed: dict[str, np.ndarray], runs: int, warmup: int) -> list[dict[str, Any]]:
    import tempfile

    from edgekiln.execution.ort import ort_session

    with tempfile.TemporaryDirectory(prefix="edgekiln-prof-") as tmp:
        sess = ort_session(path, threads=1, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(warmup):
            sess.run(None, feed)
        # NOTE: the profiler records from session creation; warm-up calls are dropped below by
        # keeping only the last `runs` events of each node.
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    kernels: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        per_node.setdefault(name, []).append(float(e.get("dur", 0)) / 1000.0)
        args = e.get("args") or {}
        ops[name] = args.get("op_name", "?")
        kernels[name] = args.get("provider", "")
    rows = [{"node": n, "op": ops[n], "kernel": kernels[n], "ms": float(np.mean(v[-runs:]))}
            for n, v in per_node.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def _ov_profile(path: Path, feed: dict[str, np.ndarray], runs: int, warmup: int) -> list[dict[str, Any]]:
    import openvino as ov

    from edgekiln.execution.runtimes.openvino_rt import OvSession

    shapes = {k: tuple(np.asarray(v).shape) for k, v in feed.items()}
    sess = OvSession(path, 1, shapes, extra_config={"PERF_COUNT": True})
    for _ in range(warmup):
        sess.run(feed)
    total: dict[str, float] = {}
    info: dict[str, tuple[str, str]] = {}
    for _ in range(runs):
        sess.run(feed)
        for p in sess.request.get_profiling_info():
            if p.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            total[p.node_name] = total.get(p.node_name, 0.0) + p.real_time.total_seconds() * 1000.0
            info[p.node_name] = (p.node_type, p.exec_type)
    rows = [{"node": n, "op": info[n][0], "kernel": info[n][1], "ms": t / runs} for n, t in total.items()]
    return sorted(rows, key=lambda r: -r["ms"])
