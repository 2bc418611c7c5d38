"""Model intake: whatever the user has, a validated float ONNX artifact comes out.

Accepted:
- an ONNX file;
- a PyTorch factory ``path/to/file.py:factory`` or ``pkg.module:factory`` (+ ``weights``, a
  state_dict checkpoint) with an input shape;
- a TorchScript file (``torch.jit.save``) or a ``torch.export`` program (``.pt2``);
- a run folder written by an edgekiln command (``edgekiln example``, ``quantize``, ...).

PyTorch models are exported to ONNX (opset 17) and checked against PyTorch on random inputs.
Every problem a user can cause becomes a one-line :class:`EdgekilnError` naming the file.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import ONNX_FLOAT, ONNX_QDQ, ModelArtifact, TorchSource
from edgekiln.models.torch_source import build_module, is_factory_spec

InputShape = tuple[int, ...]
ShapeArg = InputShape | Mapping[str, InputShape] | None


def load_model(
    spec: str | Path,
    *,
    input_shape: ShapeArg = None,
    weights: str | Path | None = None,
    work_dir: str | Path | None = None,
) -> ModelArtifact:
    """Load ``spec`` into a validated ONNX :class:`ModelArtifact`.

    ``input_shape`` is one shape (single-input models) or ``{input_name: shape}``.
    PyTorch inputs are exported into ``work_dir`` (a new temporary folder by default).

    >>> import onnx, tempfile
    >>> from onnx import helper, TensorProto
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    >>> p = tempfile.mkdtemp() + "/m.onnx"; onnx.save(helper.make_model(g), p)
    >>> load_model(p).input_shape
    (1, 4)
    """
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return _load_run_folder(path, input_shape, work_dir)
    if is_factory_spec(text) and not path.exists():
        source = TorchSource(factory=text, state_dict=Path(weights) if weights else None)
        return _from_torch_source(source, _single_shape(input_shape, text), work_dir)
    if not path.exists():
        raise EdgekilnError(f"{text}: file not found")
    if weights is not None:
        raise EdgekilnError(f"{text}: --weights applies only to a PyTorch factory (file.py:factory)")
    suffix = path.suffix.lower()
    if suffix in {".pt", ".pth", ".pt2", ".ts", ".torchscript"}:
        return _from_torch_file(path, _single_shape(input_shape, text), work_dir)
    return _from_onnx_file(path, input_shape)


def load_onnx(path: str | Path) -> Any:
    """Load and check an ONNX file; one-line errors for missing, foreign or corrupt files."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise EdgekilnError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise EdgekilnError(f"{path}: not a valid ONNX model (truncated or corrupt?): {_short(exc)}") from exc
    if not model.graph.node and not model.graph.output:
        raise EdgekilnError(f"{path}: not an ONNX model (no graph found)")
    check_onnx(model, str(path))
    return model


def check_onnx(model: Any, name: str) -> None:
    """onnx.checker (full) + a session in onnxruntime, mapping failures to one line."""
    import onnx

    unknown = _unknown_ops(model)
    if unknown:
        raise EdgekilnError(f"{name}: unsupported op {unknown[0]}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise EdgekilnError(f"{name}: invalid ONNX model: {_short(exc)}") from exc


def parse_shape(text: str) -> ShapeArg:
    """Parse ``1,3,224,224`` or ``input:1,3,224,224[;other:1,8]`` from the command line."""
    if not text:
        return None
    shapes: dict[str, InputShape] = {}
    for part in text.split(";"):
        name, _, dims = part.rpartition(":")
        try:
            shape = tuple(int(d) for d in re.split(r"[,x]", dims.strip()))
        except ValueError:
            raise EdgekilnError(f"input shape '{part}': expected integers like 1,1,28,28") from None
        if not shape or any(d <= 0 for d in shape):
            raise EdgekilnError(f"input shape '{part}': dimensions must be positive integers")
        if not name:
            if len(text.split(";")) > 1:
                raise EdgekilnError(f"input shape '{text}': name each input as name:dims when giving several")
            return shape
        shapes[name] = shape
    return shapes


# --- ONNX -----------------------------------------------------------------------------------

def _from_onnx_file(path: Path, input_shape: ShapeArg) -> ModelArtifact:
    model = load_onnx(path)
    name, shape = _resolve_input_shape(model, input_shape, str(path))
    kind = ONNX_QDQ if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else ONNX_FLOAT
    return ModelArtifact(kind=kind, path=path, input_name=name, input_shape=shape)


def graph_inputs(model: Any) -> list[Any]:
    """Graph inputs that are real inputs (not initializers, which old exporters list too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _resolve_input_shape(model: Any, input_shape: ShapeArg, name: str) -> tuple[str, InputShape]:
    inputs = graph_inputs(model)
    if not inputs:
        raise EdgekilnError(f"{name}: the model has no inputs")
    names = [i.name for i in inputs]
    given: dict[str, InputShape] = {}
    if isinstance(input_shape, Mapping):
        for key in input_shape:
            if key not in names:
                raise EdgekilnError(f"{name}: unknown input name '{key}'; the model's inputs are: {', '.join(names)}")
        given = dict(input_shape)
    elif input_shape is not None:
        given = {names[0]: tuple(input_shape)}
    first = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in first.type.tensor_type.shape.dim]
    if first.name in given:
        shape = given[first.name]
        if len(shape) != len(dims):
            raise EdgekilnError(
                f"{name}: input '{first.name}' has rank {len(dims)}, the given shape {list(shape)} has rank {len(shape)}")
        for i, (want, have) in enumerate(zip(dims, shape, strict=True)):
            if want is not None and i > 0 and want != have:
                raise EdgekilnError(f"{name}: input '{first.name}' dimension {i} is {want}, the given shape says {have}")
        return first.name, tuple(shape)
    if any(d is None for d in dims[1:]) or not dims:
        shown = ["?" if d is None else d for d in dims]
        raise EdgekilnError(
            f"{name}: input '{first.name}' has dynamic shape {shown}; give a shape with --input-shape (e.g. 1,3,224,224)")
    return first.name, tuple([1 if dims[0] is None else dims[0], *dims[1:]])


def _unknown_ops(model: Any) -> list[str]:
    """Ops that no registered ONNX schema (nor onnxruntime's contrib set) defines."""
    import onnx

    domains = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    known_custom = {"com.microsoft", "ai.onnx.ml", "com.microsoft.nchwc", "ai.onnx.preview.training"}
    local_functions = {(f.domain, f.name) for f in model.functions}
    missing = []
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        if (node.domain, node.op_type) in local_functions or domain in known_custom:
            continue
        version = domains.get(domain)
        try:
            onnx.defs.get_schema(node.op_type, version or 1, node.domain)
        except Exception:  # noqa: BLE001 - SchemaError
            label = node.op_type if domain == "ai.onnx" else f"{domain}.{node.op_type}"
            missing.append(f"'{label}' (node '{node.name or '?'}')")
    return missing


# --- PyTorch --------------------------------------------------------------------------------

def _single_shape(input_shape: ShapeArg, name: str) -> InputShape | None:
    if isinstance(input_shape, Mapping):
        if len(input_shape) != 1:
            raise EdgekilnError(f"{name}: PyTorch models take one input shape")
        return tuple(next(iter(input_shape.values())))
    return tuple(input_shape) if input_shape is not None else None


def _work_dir(work_dir: str | Path | None) -> Path:
    path = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="edgekiln-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _from_torch_source(source: TorchSource, shape: InputShape | None, work_dir: str | Path | None,
                       input_name: str = "input", output_name: str = "output") -> ModelArtifact:
    from edgekiln.models.torch_export import export_to_onnx

    module = build_module(source)
    if shape is None:
        shape = getattr(module, "input_shape", None)
    if shape is None:
        raise EdgekilnError(f"{source.factory}: a PyTorch model needs an input shape (--input-shape 1,3,224,224)")
    out = _work_dir(work_dir) / "model.onnx"
    info = export_to_onnx(module, tuple(shape), out, input_name=input_name, output_name=output_name)
    record = {"pass": "export", "config": {"opset": info["opset"], "exporter": info["exporter"]},
              "max_abs_error": info["max_abs_error"]}
    return ModelArtifact(kind=ONNX_FLOAT, path=out, input_name=input_name, input_shape=tuple(shape),
                         torch=source, provenance=(record,))


def _from_torch_file(path: Path, shape: InputShape | None, work_dir: str | Path | None) -> ModelArtifact:
    import torch

    from edgekiln.models.torch_export import export_to_onnx

    module = None
    if path.suffix.lower() == ".pt2":
        try:
            module = torch.export.load(str(path)).module()
        except Exception as exc:  # noqa: BLE001
            raise EdgekilnError(f"{path}: not a torch.export program (.pt2): {_short(exc)}") from exc
    else:
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception:  # noqa: BLE001 - not TorchScript; see whether it is a state_dict
            module = None
        if module is None:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise EdgekilnError(f"{path}: not a PyTorch model (neither TorchScript nor a checkpoint): {_short(exc)}") from exc
            if isinstance(obj, dict):
                raise EdgekilnError(
                    f"{path}: is a state_dict, not a model; give the architecture as file.py:factory --weights {path}")
            raise EdgekilnError(f"{path}: unsupported PyTorch file content ({type(obj).__name__})")
    if shape is None:
        raise EdgekilnError(f"{path}: a PyTorch model needs an input shape (--input-shape 1,3,224,224)")
    out = _work_dir(work_dir) / "model.onnx"
    info = export_to_onnx(module, tuple(shape), out)
    record = {"pass": "export", "config": {"opset": info["opset"], "exporter": info["exporter"]},
              "source": str(path), "max_abs_error": info["max_abs_error"]}
    return ModelArtifact(kind=ONNX_FLOAT, path=out, input_name="input", input_shape=tuple(shape), provenance=(record,))


# --- run folders ----------------------------------------------------------------------------

def _load_run_folder(path: Path, input_shape: ShapeArg, work_dir: str | Path | None) -> ModelArtifact:
    """A folder written by an edgekiln command: its report.json names the model."""
    report_path = path / "report.json"
    if not report_path.is_file():
        raise EdgekilnError(f"{path}: a folder but not an edgekiln run folder (no report.json)")
    try:
        report = json.loads(report_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekilnError(f"{report_path}: not valid JSON ({exc})") from exc
    block = report.get("model") if isinstance(report.get("model"), dict) else None
    if block and block.get("onnx"):
        onnx_path = path / block["onnx"]
        art = _from_onnx_file(onnx_path, input_shape or _shape_from(block))
        torch_src = None
        if block.get("torch_factory"):
            sd = block.get("state_dict")
            torch_src = TorchSource(factory=block["torch_factory"], factory_kwargs=block.get("factory_kwargs") or {},
                                    state_dict=(path / sd) if sd else None)
        prov = tuple(report.get("provenance") or ())
        return ModelArtifact(kind=art.kind, path=art.path, input_name=art.input_name, input_shape=art.input_shape,
                             torch=torch_src, provenance=prov)
    artifact = report.get("artifact")
    if isinstance(artifact, dict):
        artifact = artifact.get("path")
    if isinstance(artifact, str):
        art = _from_onnx_file(path / artifact, input_shape)
        return art
    raise EdgekilnError(f"{report_path}: names no model (expected a 'model' or 'artifact' entry)")


def _shape_from(block: dict[str, Any]) -> InputShape | None:
    shape = block.get("input_shape")
    return tuple(int(d) for d in shape) if shape else None


def run_folder_data(path: str | Path) -> dict[str, Path]:
    """The data files a run folder holds (``calib``, ``eval``, ``train`` keys, if present)."""
    path = Path(path)
    found = {}
    if path.is_dir():
        for key in ("calib", "eval", "train"):
            f = path / f"{key}.npz"
            if f.is_file():
                found[key] = f
    return found


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:240]
