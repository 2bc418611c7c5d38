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

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="edgekiln-prof-")) / "ort")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
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


def split_graph(model_path: str | Path, feeds: dict[str, np.ndarray], *, device_factor: float,
                server_factor: float = 1.0, int8_transfer: bool = False, runs: int = 30) -> SplitGraph:
    """The planner's graph: each node's device time is its measured host time times
    ``device_factor`` (e.g. the profile's throughput ratio, or 1.0 when the device is this
    machine) and its server time the host time times ``server_factor``."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(model_path)))
    host = node_latencies_ms(model_path, feeds, runs=runs)
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
    return SplitGraph(tuple(nodes), sizes, inputs, outputs)


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
