"""Split execution: the head of the model runs on the device, the tail on a server.

:func:`cut_model` extracts the head (graph inputs -> cut tensors) and tail (cut tensors ->
graph outputs) as ONNX models. :func:`edgekiln.runtime.split_server.create_app` is the
server (FastAPI; ``edgekiln split serve``); :class:`SplitClient` is the device side: it runs the head, sends the cut tensors,
and falls back to the full model on the device when the server is down, slow or answers with
something that is not the expected output. Every result says which path produced it.

Wire format: an ``.npz`` body (numpy's own container: named arrays, no pickle) both ways.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Sequence
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


MAX_NPZ_BYTES = 64 * 1024 * 1024
MAX_NPZ_MEMBERS = 16
NUMERIC_KINDS = "biufc"


class NpzRefused(ValueError):
    """An npz body whose declared sizes or types are not what an array of its bytes can be."""


def unpack(data: bytes, *, max_bytes: int = MAX_NPZ_BYTES, max_members: int = MAX_NPZ_MEMBERS,
           ) -> dict[str, np.ndarray]:
    """The arrays of an npz body, each checked before any of them is read: at most ``max_members``
    uncompressed numeric ``.npy`` members, whose declared shape times item size plus header is
    exactly the member's size, and whose sizes fit in ``data`` and ``max_bytes``. ``np.load``
    alone would allocate a declared ``(10**9,)`` array before finding 16 bytes of data.

    >>> unpack(pack({"x": np.arange(3, dtype=np.int8)}))["x"].tolist()
    [0, 1, 2]
    """
    import math
    import zipfile

    from numpy.lib import format as npy

    if len(data) > max_bytes:
        raise NpzRefused(f"body of {len(data)} bytes is over the {max_bytes}-byte limit")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise NpzRefused(f"npz holds {len(infos)} members, more than {max_members}")
        total = 0
        for info in infos:
            total += info.file_size
            if total > min(len(data), max_bytes):
                raise NpzRefused(f"npz member '{info.filename[:60]}' declared size {info.file_size} bytes is "
                                 f"more than the {len(data)}-byte body holds")
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise NpzRefused(f"npz member '{info.filename[:60]}' is compressed; send np.savez output")
            if not info.filename.endswith(".npy"):
                raise NpzRefused(f"npz member '{info.filename[:60]}' is not an .npy array")
            with zf.open(info) as fh:
                version = npy.read_magic(fh)
                read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = read_header(fh, max_header_size=10000)
                header = fh.tell()
            if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.hasobject:
                raise NpzRefused(f"npz member '{info.filename[:60]}' has dtype {str(dtype)[:40]}, not a number type")
            if math.prod(shape) * dtype.itemsize + header != info.file_size:
                raise NpzRefused(f"npz member '{info.filename[:60]}' declared size {shape} x {dtype.itemsize} bytes "
                                 f"does not match its {info.file_size - header} bytes of data")
        out = {}
        for info in infos:
            with zf.open(info) as fh:
                out[info.filename[:-4]] = npy.read_array(fh, allow_pickle=False)
        return out


def session(path: str | Path, threads: int = 1) -> Any:
    from edgekiln.execution.ort import ort_session

    return ort_session(Path(path), threads=threads)


def probe_link(client: Any, *, path: str = "/v1/probe", sizes: Sequence[int] = (0, 16384, 65536),
               repeats: int = 7, clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, float]:
    """Measure the link as the planner models it: POST bodies of several sizes to the server's
    probe endpoint and fit ``latency = rtt + bytes * 8 / bandwidth`` to the medians (least
    squares). ``rtt_ms`` then includes the fixed cost of one HTTP request and
    ``bandwidth_bps`` what the link delivers for bodies of these sizes (TCP included). ``clock``
    returns nanoseconds (tests pass a fake one)."""
    from edgekiln.execution.timing import time_calls

    def post(body: bytes) -> None:
        client.post(path, content=body).raise_for_status()

    med = [float(np.median(time_calls(functools.partial(post, b"\0" * size), repeats, clock=clock)))
           for size in sizes]
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(med), 1)
    bandwidth = 8.0 / (slope / 1000.0) if slope > 0 else float("inf")
    return {"rtt_ms": float(max(intercept, 0.0)), "bandwidth_bps": float(bandwidth),
            "medians_ms": dict(zip(map(str, sizes), med, strict=True))}


@dataclass
class SplitResult:
    output: np.ndarray
    path: str            # "split" (head on device + tail on server) or "local" (fallback)
    reason: str | None   # why it fell back
    latency_ms: float


class SplitClient:
    """The device side. ``token`` is sent as a bearer token; ``ca`` is the CA file the server's TLS
    certificate chains to (None: the system's); plain ``http://`` is refused off this machine
    unless ``insecure_http``. ``transport`` lets tests run against the app in-process (httpx; the
    URL check is then skipped)."""

    def __init__(self, head_path: str | Path, full_path: str | Path, url: str, *, timeout_s: float = 0.5,
                 transport: Any = None, threads: int = 1, token: str | None = None, ca: str | Path | None = None,
                 insecure_http: bool = False) -> None:
        import httpx

        from edgekiln.runtime.transport_security import check_server_url, client_ssl_context

        if transport is None:
            check_server_url(url, insecure_http=insecure_http)
        self.head = session(head_path, threads)
        self.full = session(full_path, threads)
        self.out_spec = [(o.name, o.shape) for o in self.full.get_outputs()]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url, timeout=timeout_s, transport=transport, headers=headers,
                                   verify=client_ssl_context(ca) if ca else True)
        self.paths = {"split": 0, "local": 0}

    def __call__(self, x: np.ndarray) -> SplitResult:
        start = time.perf_counter()
        feeds = {self.head.get_inputs()[0].name: x}
        cut = {o.name: v for o, v in zip(self.head.get_outputs(), self.head.run(None, feeds), strict=True)}
        try:
            resp = self.client.post("/v1/tail", content=pack(cut))
            reason = self._refusal(resp, len(x))
            if reason is None:
                self.paths["split"] += 1
                return SplitResult(self._answer, "split", None, (time.perf_counter() - start) * 1000)
        except Exception as exc:  # noqa: BLE001 - timeouts, refused connections, broken streams
            reason = f"{type(exc).__name__}: {str(exc)[:120]}"
        y = self.full.run(None, feeds)[0]
        self.paths["local"] += 1
        return SplitResult(y, "local", reason, (time.perf_counter() - start) * 1000)

    def _refusal(self, resp: Any, batch: int) -> str | None:
        """Why the server's answer cannot be used (None: it can; it is left in ``_answer``)."""
        if resp.status_code != 200:
            return f"server answered {resp.status_code}"
        try:
            y = unpack(resp.content).get(self.out_spec[0][0])
        except Exception:  # noqa: BLE001 - numpy raises several types for a broken body
            return "server answered with a body that is not an npz of arrays"
        if not self._plausible(y, batch):
            return "server answered with something that is not the expected output"
        self._answer = y
        return None

    def _plausible(self, y: np.ndarray | None, batch: int) -> bool:
        """The server's answer has the full model's output name, dtype and (static) shape, and is finite."""
        if y is None or y.dtype != np.float32 and y.dtype != np.float16:
            return False
        shape = self.out_spec[0][1]
        if y.ndim != len(shape) or (y.ndim and y.shape[0] != batch):
            return False
        if any(isinstance(d, int) and d != got for d, got in zip(shape[1:], y.shape[1:], strict=True)):
            return False
        return bool(np.all(np.isfinite(y)))
