"""Split execution: the head of the model runs on the device, the tail on a server.

:func:`cut_model` extracts the head (graph inputs -> cut tensors) and tail (cut tensors ->
graph outputs) as ONNX models. :func:`edgekiln.runtime.split_server.create_app` is the
server (FastAPI; ``edgekiln split serve``); :class:`SplitClient` is the device side: it runs the head, sends the cut tensors,
and falls back to the full model on the device when the server is down, slow or answers with
something that is not the expected output. Every result says which path produced it.

Wire format: an ``.npz`` body (numpy's own container: named arrays, no pickle) both ways.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def cut_model(model_path: str | Path, cut: Sequence[str], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``head.onnx`` and ``tail.onnx`` for the cut tensors ``cut``."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    outputs = [o.name for o in model.graph.output]
    ex = Extractor(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from edgekiln.fileio import atomic_save_onnx

    head = atomic_save_onnx(out / "head.onnx", ex.extract_model(inputs, list(cut)))
    tail = atomic_save_onnx(out / "tail.onnx", ex.extract_model(list(cut), outputs))
    return head, tail


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def session(path: str | Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@dataclass
class SplitResult:
    output: np.ndarray
    path: str            # "split" (head on device + tail on server) or "local" (fallback)
    reason: str | None   # why it fell back
    latency_ms: float


class SplitClient:
    """The device side. ``transport`` lets tests run against the app in-process (httpx)."""

    def __init__(self, head_path: str | Path, full_path: str | Path, url: str, *, timeout_s: float = 0.5,
                 transport: Any = None, threads: int = 1) -> None:
        import httpx

        self.head = session(head_path, threads)
        self.full = session(full_path, threads)
        self.out_spec = [(o.name, o.shape) for o in self.full.get_outputs()]
        self.client = httpx.Client(base_url=url, timeout=timeout_s, transport=transport)
        self.paths = {"split": 0, "local": 0}

    def __call__(self, x: np.ndarray) -> SplitResult:
        start = time.perf_counter()
        feeds = {self.head.get_inputs()[0].name: x}
        cut = {o.name: v for o, v in zip(self.head.get_outputs(), self.head.run(None, feeds), strict=True)}
        reason = None
        try:
            resp = self.client.post("/v1/tail", content=pack(cut))
            if resp.status_code != 200:
                reason = f"server answered {resp.status_code}"
            else:
                out = unpack(resp.content)
                name, shape = self.out_spec[0]
                y = out.get(name)
                if y is None or y.ndim != len(shape) or not np.all(np.isfinite(y)):
                    reason = "server answered with something that is not the expected output"
                else:
                    self.paths["split"] += 1
                    return SplitResult(y, "split", None, (time.perf_counter() - start) * 1000)
        except Exception as exc:  # noqa: BLE001 - timeouts, refused connections, bad bodies
            reason = f"{type(exc).__name__}: {str(exc)[:120]}"
        y = self.full.run(None, feeds)[0]
        self.paths["local"] += 1
        return SplitResult(y, "local", reason, (time.perf_counter() - start) * 1000)
