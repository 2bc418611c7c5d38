"""A model run as a chain of segment files, each in its own runtime, behind the ``Session`` protocol.

A placement (``edgekiln place``) cuts a model into contiguous segments and writes one file per
segment plus ``placement.json``. :class:`ChainSession` opens every segment with
:func:`~edgekiln.execution.runtimes.load_session` and runs them in order. Tensors crossing a
boundary live in host memory, in ONNX convention (NCHW, the ONNX dtype), and are dropped after
their last reader. A LiteRT segment (``.tflite``, NHWC, int8) gets its inputs transposed and
quantized with the tensor's scale and zero point, and its outputs transposed back (and
dequantized when the next reader takes float); that conversion is counted in its segment's time.

A segment with ``simulated_ms`` stands for a unit this machine does not have (an Edge TPU, an
NPU): it runs on onnxruntime's CPU, so its outputs are real, and ``last_ms`` reports the
estimate with ``sources`` saying ``"simulated"``.

>>> import tempfile, onnx
>>> from onnx import TensorProto, helper
>>> def one_op(op, x, y, path):   # a one-node segment file
...     g = helper.make_graph([helper.make_node(op, [x], [y])], op,
...                           [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3])],
...                           [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 3])])
...     onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
...     return path
>>> d = Path(tempfile.mkdtemp())
>>> chain = ChainSession([SegmentSpec(one_op("Neg", "x", "t", d / "a.onnx"), "onnxruntime", ("x",), ("t",), 0.4),
...                       SegmentSpec(one_op("Relu", "t", "y", d / "b.onnx"), "onnxruntime", ("t",), ("y",))])
>>> chain.run({"x": np.array([[-1.0, 2.0, -3.0]], np.float32)})[0].tolist(), chain.sources
([[1.0, 0.0, 3.0]], ['simulated', 'measured'])
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import sha256_file

PLACEMENT_VERSION = 1


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: its model file, the runtime that runs it, the ONNX names of the tensors it
    reads and writes, and, for a unit simulated on the CPU, the estimated time in ms."""

    file: str | Path
    runtime: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    simulated_ms: float | None = None


class ChainSession:
    """Segments run in order; satisfies :class:`~edgekiln.execution.runtimes.Session`.

    ``input_names`` are the tensors a segment reads that no earlier segment writes.
    ``output_names`` are ``outputs`` when given (the unplaced model's outputs, in its order),
    else every tensor written and never read by a later segment. After :meth:`run`,
    ``last_ms[i]`` is segment i's time (its runtime call plus its boundary conversions, or its
    ``simulated_ms``) and ``sources[i]`` is ``"measured"`` or ``"simulated"``. ``frees[i]``
    are the tensors dropped after segment i (read there for the last time).
    """

    def __init__(self, specs: Sequence[SegmentSpec], *, threads: int = 1,
                 outputs: Sequence[str] | None = None) -> None:
        from edgekiln.execution.runtimes import load_session

        if not specs:
            raise EdgekilnError("a chain needs at least one segment")
        self.specs = [SegmentSpec(s.file, s.runtime, tuple(s.inputs), tuple(s.outputs), s.simulated_ms)
                      for s in specs]
        written: set[str] = set()
        self.input_names: list[str] = []
        for i, s in enumerate(self.specs):
            for name in s.inputs:
                if name not in written and name not in self.input_names:
                    self.input_names.append(name)
            clash = sorted(written & set(s.outputs))
            if clash:
                raise EdgekilnError(f"segment {i} ({Path(s.file).name}) writes {', '.join(clash)}, "
                                    "which an earlier segment already wrote")
            written |= set(s.outputs)
        read_later = {n: max(i for i, s in enumerate(self.specs) if n in s.inputs)
                      for s in self.specs for n in s.inputs}
        if outputs is None:
            outputs = [n for i, s in enumerate(self.specs) for n in s.outputs if read_later.get(n, -1) <= i]
        missing = [n for n in outputs if n not in written and n not in self.input_names]
        if missing:
            raise EdgekilnError(f"chain outputs {', '.join(missing)} are written by no segment")
        self.output_names = list(outputs)
        keep = set(self.output_names)
        # tensors freed after segment i: read there for the last time and not a chain output
        self.frees = [tuple(n for n in s.inputs if read_later[n] == i and n not in keep)
                      for i, s in enumerate(self.specs)]
        self.sources = ["simulated" if s.simulated_ms is not None else "measured" for s in self.specs]
        self.sessions = [load_session(s.file, "onnxruntime" if s.simulated_ms is not None else s.runtime,
                                      threads=threads) for s in self.specs]
        self._ports = [_Ports(s, sess) for s, sess in zip(self.specs, self.sessions, strict=True)]
        # NOTE: a chain input's shape and dtype come from an onnx reader when there is one: a
        # LiteRT reader declares NHWC int8, while the chain takes the ONNX tensor (NCHW, float)
        where: dict[str, tuple[int, int]] = {}
        for k, p in enumerate(self._ports):
            for j, n in enumerate(p.reads):
                if n not in where or (self._ports[where[n][0]].litert and not p.litert):
                    where[n] = (k, j)
        self.input_shapes: list[list[int | None]] = []
        self.input_dtypes: list[Any] = []
        for name in self.input_names:
            k, j = where[name]
            self.input_shapes.append(list(self._ports[k].onnx_shape(j)))
            self.input_dtypes.append(self._ports[k].onnx_dtype(j))
        # what each tensor must look like for its first ONNX-convention reader (a LiteRT output
        # read by an onnx segment as int8 stays int8; read as float, or a chain output, is dequantized)
        self._wanted: dict[str, Any] = {}
        for p in self._ports:
            for j, n in enumerate(p.reads):
                if not p.litert:
                    self._wanted.setdefault(n, np.dtype(p.session.input_dtypes[p.index_in[j]]))
        self.last_ms: list[float] = [0.0] * len(self.specs)
        self.last_peak_live = 0      # most tensors held at once during the last run

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise EdgekilnError(f"missing chain input(s) {', '.join(missing)}; inputs are {', '.join(self.input_names)}")
        live: dict[str, np.ndarray] = {n: feeds[n] for n in self.input_names}
        peak = len(live)
        for i, (spec, port) in enumerate(zip(self.specs, self._ports, strict=True)):
            start = time.perf_counter()
            outs = port.call({n: live[n] for n in spec.inputs}, self._wanted)
            elapsed = (time.perf_counter() - start) * 1000.0
            self.last_ms[i] = float(spec.simulated_ms) if spec.simulated_ms is not None else elapsed
            live.update(outs)
            peak = max(peak, len(live))
            for n in self.frees[i]:
                live.pop(n, None)
        self.last_peak_live = peak
        return [live[n] for n in self.output_names]


class _Ports:
    """How one segment's session names its tensors, and the conversions at a LiteRT boundary."""

    def __init__(self, spec: SegmentSpec, session: Any) -> None:
        self.session = session
        self.litert = Path(spec.file).suffix.lower() == ".tflite"
        self.reads = list(spec.inputs)
        self.index_in = _match(spec.inputs, list(session.input_names), spec.file, "inputs")
        file_outs = _onnx_outputs(spec.file) or list(session.output_names)
        self.index_out = _match(spec.outputs, file_outs, spec.file, "outputs")
        self.writes = list(spec.outputs)
        # NOTE: LiteRT's tensor details (layout, dtype, scale and zero point) drive the boundary conversion
        self._in_det = session.input_details if self.litert else None
        self._out_det = session.output_details if self.litert else None

    def onnx_shape(self, j: int) -> list[int | None]:
        shape = list(self.session.input_shapes[self.index_in[j]])
        return [shape[0], shape[3], shape[1], shape[2]] if self.litert and len(shape) == 4 else shape

    def onnx_dtype(self, j: int) -> Any:
        dtype = np.dtype(self.session.input_dtypes[self.index_in[j]])
        if self.litert and np.issubdtype(dtype, np.integer) and self._in_det[self.index_in[j]]["quantization"][0]:
            return np.dtype(np.float32)   # a quantized LiteRT input takes the float tensor and quantizes it
        return dtype

    def call(self, values: Mapping[str, np.ndarray], wanted: Mapping[str, Any]) -> dict[str, np.ndarray]:
        names = self.session.input_names
        if self.litert:
            feeds = {names[self.index_in[j]]: _to_litert(np.asarray(values[n]), self._in_det[self.index_in[j]])
                     for j, n in enumerate(self.reads)}
        else:
            feeds = {names[self.index_in[j]]: values[n] for j, n in enumerate(self.reads)}
        outs = self.session.run(feeds)
        if self.litert:
            return {n: _from_litert(outs[self.index_out[j]], self._out_det[self.index_out[j]], wanted.get(n))
                    for j, n in enumerate(self.writes)}
        return {n: outs[self.index_out[j]] for j, n in enumerate(self.writes)}


def _match(wanted: Sequence[str], have: list[str], file: str | Path, what: str) -> list[int]:
    """Positions in ``have`` of the names ``wanted``: by name, else by position when the counts
    agree (a ``.tflite`` may name its tensors its own way)."""
    if all(n in have for n in wanted):
        return [have.index(n) for n in wanted]
    if len(wanted) == len(have):
        return list(range(len(have)))
    raise EdgekilnError(f"segment {Path(file).name}: its {what} are {', '.join(have)}; "
                        f"the placement names {', '.join(wanted)}")


def _onnx_outputs(file: str | Path) -> list[str] | None:
    """The graph output names of an ONNX file in order (the order every runtime returns them)."""
    if Path(file).suffix.lower() != ".onnx":
        return None
    import onnx

    return [o.name for o in onnx.load(str(file), load_external_data=False).graph.output]


def _to_litert(x: np.ndarray, det: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(det["dtype"])
    if x.ndim == 4:             # chain tensors are NCHW; a .tflite takes NHWC
        x = x.transpose(0, 2, 3, 1)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
        scale, zp = det["quantization"]
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x / scale) + zp, info.min, info.max)
    return np.ascontiguousarray(x, dtype=dtype)


def _from_litert(y: np.ndarray, det: dict[str, Any], wanted: Any) -> np.ndarray:
    if y.ndim == 4:
        y = y.transpose(0, 3, 1, 2)
    if np.issubdtype(y.dtype, np.integer) and (wanted is None or np.issubdtype(np.dtype(wanted), np.floating)):
        scale, zp = det["quantization"]
        if scale:
            return ((y.astype(np.float32) - zp) * np.float32(scale)).astype(np.dtype(wanted or np.float32))
    return np.ascontiguousarray(y)


def load_chain(placement_json: str | Path, *, threads: int = 1) -> ChainSession:
    """The chain ``placement.json`` (version 1) describes. Segment files are resolved beside it,
    must stay inside its folder and must match their ``sha256``. A segment whose ``source`` is
    ``"simulated"`` runs on onnxruntime with ``simulated_ms = est_ms``. An optional top-level
    ``"outputs"`` (the unplaced model's output names) fixes the chain's output order."""
    path = Path(placement_json)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgekilnError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekilnError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != PLACEMENT_VERSION:
        found = data.get("version") if isinstance(data, dict) else None
        raise EdgekilnError(f"{path}: placement version {found!r} is not supported (expected {PLACEMENT_VERSION})")
    segments = data.get("segments")
    if not isinstance(segments, list) or not segments:
        raise EdgekilnError(f"{path}: lists no segments")
    specs = []
    for k, seg in enumerate(segments):
        try:
            rel = str(seg["file"])
            pure = PurePosixPath(rel)
            if pure.is_absolute() or ".." in pure.parts or not rel:
                raise EdgekilnError(f"{path}: segment {k} file '{rel}' is not inside the placement folder")
            file = path.parent / Path(*pure.parts)
            if not file.is_file():
                raise EdgekilnError(f"{path}: segment {k} file {rel} is missing")
            digest = sha256_file(file)
            if digest != seg["sha256"]:
                raise EdgekilnError(f"{path}: segment {k} file {rel} does not match its SHA-256 "
                                    f"(placement {str(seg['sha256'])[:12]}..., file {digest[:12]}...)")
            simulated = seg.get("source") == "simulated"
            est = seg.get("est_ms")
            if simulated and not isinstance(est, (int, float)):
                raise EdgekilnError(f"{path}: simulated segment {k} has no numeric est_ms")
            specs.append(SegmentSpec(file, seg.get("runtime") or "onnxruntime", tuple(seg["inputs"]),
                                     tuple(seg["outputs"]), float(est) if simulated else None))
        except KeyError as exc:
            raise EdgekilnError(f"{path}: segment {k} has no {exc}") from None
        except TypeError as exc:
            raise EdgekilnError(f"{path}: segment {k} is malformed ({exc})") from None
    outputs = data.get("outputs")
    return ChainSession(specs, threads=threads, outputs=list(outputs) if outputs else None)
