"""Build the split planner's graph from an ONNX model: per-node latency measured with
onnxruntime's profiler (the server side, and the device side when the device is this machine
or a measured slowdown factor is given) and the byte size of every tensor that could cross the
network (optionally as int8: a quarter of float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.runtime.split_plan import Node, SplitGraph


def node_latencies_ms(model_path: str | Path, feeds: dict[str, np.ndarray], *, runs: int = 30,
                      threads: int = 1) -> dict[str, float]:
    """Median kernel time per node (ms) over ``runs`` profiled runs, graph optimizations off so
    that nodes keep their names (fusion would merge the candidate cut points)."""
    import tempfile

    from edgekiln.execution.ort import ort_session

    prefix = str(Path(tempfile.mkdtemp(prefix="edgekiln-prof-")) / "ort")
    sess = ort_session(Path(model_path), threads=threads, optimize=False, profile_prefix=prefix)
    for _ in range(5 + runs):
        sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    samples: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            samples.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1000.0)
    return {name: float(np.median(v[-runs:])) for name, v in samples.items()}


def session_latency_ms(model_path: str | Path, feeds: dict[str, np.ndarray], *, runs: int = 30,
                       threads: int = 1) -> float:
    """Median wall time (ms) of one optimized ``session.run`` call, as a deployed session runs."""
    from edgekiln.execution.timing import time_calls
    from edgekiln.runtime.split_exec import session

    sess = session(model_path, threads)
    return float(np.median(time_calls(lambda: sess.run(None, feeds), runs, warmup=5)))


def split_graph(model_path: str | Path, feeds: dict[str, np.ndarray], *, device_factor: float,
                server_factor: float = 1.0, int8_transfer: bool = False, runs: int = 30,
                calibrate: bool = True) -> SplitGraph:
    """The planner's graph: each node's device time is its measured host time times
    ``device_factor`` (e.g. the profile's throughput ratio, or 1.0 when the device is this
    machine) and its server time the host time times ``server_factor``.

    With ``calibrate`` the per-node kernel times (profiled unfused, so every node keeps its
    name) are scaled so that they plus one session call (measured on an Identity model, and
    kept as the graph's per-call cost) add up to the measured wall time of the optimized model:
    kernel times alone leave out fusion and the fixed cost each head and tail call pays."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(model_path)))
    host = node_latencies_ms(model_path, feeds, runs=runs)
    call = call_overhead_ms(feeds, runs=runs) if calibrate else 0.0
    if calibrate and sum(host.values()) > 0:
        wall = session_latency_ms(model_path, feeds, runs=runs)
        scale = max(wall - call, 0.1 * wall) / sum(host.values())
        host = {k: v * scale for k, v in host.items()}
    inits = {i.name for i in model.graph.initializer}
    sizes = _tensor_bytes(model, feeds, int8_transfer)
    nodes = []
    for i, n in enumerate(model.graph.node):
        name = n.name or f"node{i}"
        t = host.get(name, 0.0)
        nodes.append(Node(name, tuple(x for x in n.input if x and x not in inits), tuple(n.output),
                          t * device_factor, t * server_factor))
    inputs = tuple(i.name for i in model.graph.input if i.name not in inits)
    outputs = tuple(o.name for o in model.graph.output)
    return SplitGraph(tuple(nodes), sizes, inputs, outputs, device_call_ms=call * device_factor,
                      server_call_ms=call * server_factor)


def call_overhead_ms(feeds: dict[str, np.ndarray], *, runs: int = 30) -> float:
    """What one ``session.run`` costs besides the kernels: an Identity model on the same inputs."""
    import tempfile

    import onnx
    from onnx import helper

    types = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.int64): onnx.TensorProto.INT64}
    name, arr = next(iter(feeds.items()))
    vi = [helper.make_tensor_value_info(n, types.get(arr.dtype, onnx.TensorProto.FLOAT), list(arr.shape))
          for n in (name, "out")]
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", [name], ["out"])], "call", vi[:1],
                                                vi[1:]), opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "identity.onnx"
        onnx.save(model, str(path))
        return session_latency_ms(path, {name: arr}, runs=runs)


def _tensor_bytes(model: Any, feeds: dict[str, np.ndarray], int8: bool) -> dict[str, int]:
    from onnx import TensorProto

    itemsize = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.INT64: 8, TensorProto.INT32: 4,
                TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.BOOL: 1}
    out: dict[str, int] = {k: int(v.nbytes) for k, v in feeds.items()}
    for vi in [*model.graph.value_info, *model.graph.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        size = int(np.prod(dims)) if dims else 1
        per = itemsize.get(t.elem_type, 4)
        if int8 and t.elem_type == TensorProto.FLOAT:
            per = 1
        out[vi.name] = size * per
    return out
