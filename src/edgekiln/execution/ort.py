"""onnxruntime sessions: the one place edgekiln constructs ``onnxruntime.InferenceSession``.

:func:`ort_session` sets the options every measurement here relies on (explicit thread counts,
sequential execution, quiet logs, an optimization level) and opens models whose ONNX IR version
or ai.onnx opset is newer than the installed onnxruntime reads: the installed ``onnx`` writes
IR 14 and opset 28, onnxruntime 1.31 reads IR <= 13 and opens opsets <= 26. :func:`lower_for_ort`
lowers both in memory when no op of the model changed in between (else one line says which op
needs the newer opset). :func:`run_with_intermediates` runs a model with
chosen intermediate tensors exposed as outputs, graph optimizations off so every tensor keeps
its name and value.

>>> import numpy as np
>>> from onnx import TensorProto, helper
>>> vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2])
>>> g = helper.make_graph([helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
...                       "g", [vi("x")], [vi("y")])
>>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
>>> ort_session(m).run(None, {"x": np.array([[1.0, -2.0]], np.float32)})[0].tolist()
[[0.0, 2.0]]
>>> run_with_intermediates(m, {"x": np.array([[1.0, -2.0]], np.float32)}, ["t"])["t"].tolist()
[[-1.0, 2.0]]
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

ModelLike = str | Path | bytes | Any   # a path, serialized bytes or an onnx.ModelProto

_IR_ERROR = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_OPSET_ERROR = re.compile(r"official support for domain ai\.onnx is till opset (\d+)")
_LEVELS = {True: "ORT_ENABLE_ALL", False: "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL",
           "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC", "none": "ORT_DISABLE_ALL"}


def ort_session(model: ModelLike, *, threads: int = 1, optimize: bool | str = True, log_level: int = 3,
                profile_prefix: str | None = None, save_optimized: str | Path | None = None,
                config: Mapping[str, str] | None = None,
                providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An ``onnxruntime.InferenceSession`` with ``threads`` intra-op threads, one inter-op thread
    and sequential execution, on the CPU unless ``providers`` names others (in order of
    preference, as :func:`edgekiln.execution.runtimes.device_providers` gives them).

    ``optimize`` is True (all graph optimizations, onnxruntime's default), False (none: every
    tensor keeps its name) or one of ``"basic"``, ``"extended"``, ``"all"``. ``profile_prefix``
    turns on onnxruntime's profiler; ``save_optimized`` writes the optimized graph there.
    ``config``: session config entries (``{"session.qdqisint8allowed": "1"}``).

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> ort_session(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"), threads=2).get_inputs()[0].shape
    ['N', 1, 8, 8]
    """
    import onnxruntime as ort

    if optimize not in _LEVELS:
        raise ValueError(f"optimize must be True, False or one of basic/extended/all, not {optimize!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = int(log_level)
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimize])
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if save_optimized is not None:
        so.optimized_model_filepath = str(save_optimized)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if not isinstance(model, (str, Path, bytes)):      # a ModelProto: lower before the first try
        model = lower_for_ort(model, copy=True).SerializeToString()
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, so, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
        if not (_IR_ERROR.search(str(exc)) or _OPSET_ERROR.search(str(exc))):
            raise
        name = source if isinstance(source, str) else "model"
        proto = lower_for_ort(_load(source), copy=False, name=name)
        return ort.InferenceSession(proto.SerializeToString(), so, providers=list(providers))


@functools.cache
def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime reads (probed once with a tiny model)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [vi],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = onnx.IR_VERSION
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        found = _IR_ERROR.search(str(exc))
        if found:
            return int(found.group(2))
        raise
    return int(onnx.IR_VERSION)


def lower_ir_version(model: Any, target: int | None = None, *, copy: bool = True) -> Any:
    """``model`` with its ``ir_version`` lowered to ``target`` (default: what onnxruntime reads),
    when the model's opsets exist in that IR version; ``model`` itself when nothing needs to
    change. With ``copy=False`` the model is changed in place. Raises a one-line
    :class:`EdgekilnError` when the opsets need the newer IR.

    >>> from onnx import helper
    >>> m = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 17)])
    >>> lower_ir_version(m, 8).ir_version
    8
    """
    from onnx import helper

    target = max_ir_version() if target is None else int(target)
    if model.ir_version <= target:
        return model
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # noqa: BLE001 - an opset newer than the onnx package knows
        needed = model.ir_version
    if needed > target:
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        raise EdgekilnError(f"the model has ONNX IR version {model.ir_version} and opsets {opsets}, which need IR "
                            f">= {needed}; onnxruntime {_ort_version()} reads IR <= {target}: export it with a lower "
                            f"opset (or convert it with onnx.version_converter)")
    if copy:
        import onnx

        lowered = onnx.ModelProto()
        lowered.CopyFrom(model)
        model = lowered
    model.ir_version = target
    return model


def lower_for_ort(model: Any, *, copy: bool = True, name: str = "model") -> Any:
    """``model`` with its ai.onnx opset and IR version lowered to what the installed onnxruntime
    opens, when no op of the model (subgraphs included) changed between the two opsets, so the
    model means the same; ``model`` itself when nothing needs to change. With ``copy=False`` the
    model is changed in place. Raises a one-line :class:`EdgekilnError` starting with ``name``
    naming the op that needs the newer opset.

    >>> from onnx import helper, TensorProto
    >>> vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1])
    >>> m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x")], [vi("y")]))
    >>> low = lower_for_ort(m)
    >>> low.ir_version <= max_ir_version() and low.opset_import[0].version <= max_opset_version()
    True
    """
    entry = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    ir_max = max_ir_version()
    opset_max = min(max_opset_version(), _newest_opset_for_ir(ir_max))
    opset = int(entry.version) if entry is not None else 0
    if model.ir_version <= ir_max and opset <= opset_max:
        return model
    if opset > opset_max:
        changed = _op_changed_since(model, opset_max, opset)
        if changed:
            raise EdgekilnError(f"{name}: uses ai.onnx opset {opset}; onnxruntime {_ort_version()} runs opsets <= "
                                f"{opset_max} and op '{changed}' changed after it: export with opset <= {opset_max} "
                                "(or convert with onnx.version_converter)")
    if copy:
        import onnx

        lowered = onnx.ModelProto()
        lowered.CopyFrom(model)
        model = lowered
    entry = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if entry is not None and entry.version > opset_max:
        entry.version = opset_max
    try:
        return lower_ir_version(model, ir_max, copy=False)
    except EdgekilnError as exc:
        raise EdgekilnError(f"{name}: {exc}") from None


def readable_file(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """``path`` itself when the installed onnxruntime opens it as it is, else a copy written in
    ``out_dir`` (default: a new temporary folder) lowered by :func:`lower_for_ort`: for tools that
    open model files themselves (onnxruntime's quantization tools, OpenVINO). External weights
    stay in a side file.

    >>> readable_file("model.onnx", "work/")      # doctest: +SKIP
    PosixPath('work/model.ir13.onnx')
    """
    import tempfile

    import onnx

    path = Path(path)
    head = onnx.load(str(path), load_external_data=False)
    if lower_for_ort(head, name=str(path)) is head:
        return path
    external = any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in head.graph.initializer)
    model = lower_for_ort(onnx.load(str(path)) if external else head, copy=False, name=str(path))
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="edgekiln-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{path.stem}.ir{model.ir_version}.onnx"
    if external:  # keep the weights in a side file, as the source model does
        onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{out.name}.data", size_threshold=1024)
    else:
        onnx.save(model, str(out))
    return out


@functools.cache
def max_opset_version() -> int:
    """The newest ai.onnx opset the installed onnxruntime opens (it refuses opsets newer than its
    official support, even ones it knows); probed once with a one-node model per opset."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for opset in range(onnx.defs.onnx_opset_version(), 13, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        probe.ir_version = min(max_ir_version(), helper.find_min_ir_version_for(probe.opset_import, True))
        try:
            ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001, S112 - onnxruntime refuses this opset: try the one before
            continue
    return 13


def _newest_opset_for_ir(ir_version: int) -> int:
    from onnx import helper

    return max((v[2] for v in helper.VERSION_TABLE if v[1] <= ir_version), default=1)


def _op_changed_since(model: Any, old: int, new: int) -> str | None:
    """An ai.onnx op of the model (subgraphs included) whose definition changed after opset
    ``old`` (up to ``new``); None when the model means the same at opset ``old``."""
    import onnx

    for node in (n for g in nested_graphs(model.graph) for n in g.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            since = onnx.defs.get_schema(node.op_type, new, "").since_version
        except Exception:  # noqa: BLE001, S112 - not an ai.onnx op onnx knows: onnxruntime will say so
            continue
        if since > old:
            return node.op_type
    return None


def node_subgraphs(node: Any) -> list[Any]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    out: list[Any] = []
    for attr in node.attribute:
        out += [attr.g] if attr.type == 5 else list(attr.graphs) if attr.type == 10 else []  # GRAPH, GRAPHS
    return out


def nested_graphs(graph: Any) -> list[Any]:
    """``graph`` and every graph nested in its nodes, at any depth."""
    return [graph, *(g for node in graph.node for sub in node_subgraphs(node) for g in nested_graphs(sub))]


def _load(source: str | bytes) -> Any:
    import onnx

    if isinstance(source, bytes):
        return onnx.load_from_string(source)
    return onnx.load(source)   # external data is read from beside the file


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def load_proto(model: ModelLike) -> Any:
    """``model`` as an ``onnx.ModelProto`` (loaded with its external data when it is a path)."""
    if isinstance(model, (str, Path, bytes)):
        return _load(str(model) if isinstance(model, Path) else model)
    return model


def expose_tensors(model: ModelLike, names: Sequence[str]) -> Any:
    """A copy of ``model`` whose graph outputs also include ``names`` (graph inputs excluded:
    they are already known to whoever feeds them)."""
    import onnx

    src = load_proto(model)
    m = onnx.ModelProto()
    m.CopyFrom(src)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for n in names:
        if n and n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
            have.add(n)
    return m


def intermediates_runner(model: ModelLike, names: Sequence[str] | None = None, *, threads: int = 1
                         ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A function ``feeds -> {name: value}`` running ``model`` unoptimized with ``names``
    (default: every node output and graph output) exposed. The session is built once, so
    call it for every batch of a dataset. A requested graph input comes back as its feed.

    >>> run = intermediates_runner("model.onnx", ["conv1_out"])     # doctest: +SKIP
    >>> acts = [run(f)["conv1_out"] for f in feeds]                   # doctest: +SKIP
    """
    proto = load_proto(model)
    if names is None:
        names = list(dict.fromkeys([o for n in proto.graph.node for o in n.output if o]
                                   + [o.name for o in proto.graph.output]))
    wanted = list(names)
    sess = ort_session(expose_tensors(proto, wanted), threads=threads, optimize=False)
    out_names = [o.name for o in sess.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(out_names, sess.run(None, dict(feeds)), strict=True))
        return {n: values[n] if n in values else feeds[n] for n in wanted if n in values or n in feeds}

    return run


def run_with_intermediates(model: ModelLike, feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
                           names: Sequence[str] | None = None, *, threads: int = 1) -> dict[str, np.ndarray]:
    """Values of ``names`` (default: every tensor) for ``feeds``, with optimizations off.

    ``feeds`` is one feed dict, or a list of them whose results are concatenated along axis 0
    (one session for all).
    """
    run = intermediates_runner(model, names, threads=threads)
    if isinstance(feeds, Mapping):
        return run(feeds)
    parts: dict[str, list[np.ndarray]] = {}
    for f in feeds:
        for k, v in run(f).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def error_line(exc: BaseException, limit: int = 300) -> str:
    """The reason in an onnxruntime or OpenVINO exception, on one line: source locations,
    C++ signatures and "Exception from ...cpp" wrappers removed.

    >>> error_line(RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\\n"
    ...     "Check 'false' failed at src/x.cpp:151:\\nModel wasn't fully converted.\\n"
    ...     "-- No conversion rule found for operations: X\\n"))
    "Model wasn't fully converted. -- No conversion rule found for operations: X"
    """
    text = str(exc).strip()
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()
             and not re.match(r"(Exception from \S+:\d+:?|Check '.*' failed at \S+:\d+:?)$", ln.strip())]
    text = " ".join(lines)
    # onnxruntime prefixes "/path/file.cc:123 ns::Fn(args...) " to the message
    text = re.sub(r"^\S+\.(cc|h|cpp|hpp):\d+ [\w:~<>]+\(.*?\)\s+(?=[A-Z\[])", "", text)
    text = re.sub(r"\s+", " ", text).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ort_open_crashes(path: Path) -> str | None:
    """None when a child process opens ``path`` in onnxruntime without dying (a load *error* is
    reported later, by the checks); else what killed it."""
    import subprocess
    import sys

    code = ("import sys, onnxruntime as ort; o = ort.SessionOptions(); o.intra_op_num_threads = 1\n"
            "try:\n    ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
            "except Exception:\n    pass")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=600)
    if proc.returncode >= 0:
        return None
    import signal

    return f"signal {signal.Signals(-proc.returncode).name}"
