"""Model intake: whatever the user has, a validated ONNX artifact with every input resolved.

Accepted:
- an ONNX file of any IR version the installed ``onnx`` writes (a copy with the IR version
  lowered to what onnxruntime reads is written when needed), with weights inline or in external
  data files, with one or several inputs of any tensor type (float, int tokens, bytes, scalars),
  with ``If``/``Loop``/``Scan`` subgraphs;
- a PyTorch factory ``path/to/file.py:factory`` or ``pkg.module:factory`` (+ ``weights``, a
  state_dict checkpoint);
- a TorchScript file (``torch.jit.save``) or a ``torch.export`` program (``.pt2``);
- a run folder written by an edgekiln command (``edgekiln example``, ``quantize``, ...).

Dynamic input dimensions (symbolic, ``?``, ``0`` or ``-1``) are resolved from, in order: the
shapes given (``input_shapes``, ``--input-shape NAME=d0,d1``), the calibration/evaluation data
(one sample, batch 1), the shapes stored in the run folder; dimensions that share a symbolic
name with a resolved one take its value; a leading dynamic dimension left over is the batch (1).

PyTorch models are exported to ONNX (opset 17) and checked against PyTorch on random inputs.
Every problem a user can cause becomes a one-line :class:`EdgekilnError` naming the file.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.execution.ort import nested_graphs
from edgekiln.execution.specs import TensorSpec, onnx_elem_dtype
from edgekiln.models.artifact import ONNX_FLOAT, ONNX_QDQ, ModelArtifact, TorchSource
from edgekiln.models.onnx_compat import readable_copy, symbolic_declared_dims
from edgekiln.models.torch_source import build_module, is_factory_spec

Shape = tuple[int, ...]
InputShapes = Shape | Mapping[str, Shape] | None
DATA_KEYS = ("calib", "eval", "train")


def load_model(
    spec: str | Path,
    *,
    input_shapes: InputShapes = None,
    data: Mapping[str, str | Path | None] | None = None,
    weights: str | Path | None = None,
    work_dir: str | Path | None = None,
) -> ModelArtifact:
    """Load ``spec`` into a validated ONNX :class:`ModelArtifact` with every input resolved.

    ``input_shapes`` is ``{input_name: shape}`` or one shape (the primary input), as
    :func:`parse_shapes` returns; ``data`` names ``.npz`` files (``{"calib": path, "eval": ...}``)
    whose samples fix dynamic dimensions and which the artifact carries in ``data``. Converted
    models (PyTorch exports, IR-lowered copies) are written into ``work_dir`` (a new temporary
    folder by default).

    >>> import onnx, tempfile
    >>> from onnx import helper, TensorProto
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    >>> p = tempfile.mkdtemp() + "/m.onnx"; onnx.save(helper.make_model(g), p)
    >>> load_model(p).inputs
    (TensorSpec(name='x', shape=(1, 4), dtype='float32'),)
    >>> load_model(p, input_shapes={"x": (8, 4)}).input_shape
    (8, 4)
    """
    text = str(spec)
    path = Path(text)
    given_data = {k: Path(v) for k, v in (data or {}).items() if v is not None}
    if path.is_dir():
        return _load_run_folder(path, input_shapes, given_data, work_dir)
    if is_factory_spec(text) and not path.exists():
        source = TorchSource(factory=text, state_dict=Path(weights) if weights else None)
        return _from_torch_source(source, input_shapes, given_data, work_dir)
    if not path.exists():
        raise EdgekilnError(f"{text}: file not found")
    if weights is not None:
        raise EdgekilnError(f"{text}: --weights applies only to a PyTorch factory (file.py:factory)")
    suffix = path.suffix.lower()
    if suffix in {".pt", ".pth", ".pt2", ".ts", ".torchscript"}:
        return _from_torch_file(path, input_shapes, given_data, work_dir)
    return _from_onnx_file(path, input_shapes, given_data, work_dir=work_dir)


def parse_shapes(values: Sequence[str] | str | None) -> dict[str, Shape] | Shape | None:
    """Parse repeatable ``--input-shape`` values: ``NAME=d0,d1,...`` names an input (``NAME:dims``
    too), a bare ``d0,d1,...`` is the only (primary) input, ``NAME=`` is a scalar (rank 0).

    >>> parse_shapes(["1,3,224,224"])
    (1, 3, 224, 224)
    >>> parse_shapes(["image=1,3,32,32", "aux=1,4", "sr="])
    {'image': (1, 3, 32, 32), 'aux': (1, 4), 'sr': ()}
    >>> parse_shapes([]) is None
    True
    """
    if isinstance(values, str):
        values = [values]
    parts = [p.strip() for v in (values or ()) for p in v.split(";") if p.strip()]
    if not parts:
        return None
    named: dict[str, Shape] = {}
    bare: list[Shape] = []
    for part in parts:
        name, sep, dims = part.rpartition("=") if "=" in part else part.rpartition(":")
        shape = _parse_dims(part, dims, allow_empty=bool(sep))
        if sep and not name:
            raise EdgekilnError(f"input shape '{part}': the input name before '{sep}' is empty")
        if not sep:
            bare.append(shape)
        elif name in named:
            raise EdgekilnError(f"input shape '{part}': input '{name}' is given twice")
        else:
            named[name] = shape
    if bare and (named or len(bare) > 1):
        raise EdgekilnError(f"input shapes {', '.join(parts)}: name each input (NAME=d0,d1,...) when giving several")
    return bare[0] if bare else named


def _parse_dims(part: str, dims: str, *, allow_empty: bool) -> Shape:
    if not dims.strip() and allow_empty:
        return ()
    try:
        shape = tuple(int(d) for d in re.split(r"[,x]", dims.strip()))
    except ValueError:
        raise EdgekilnError(f"input shape '{part}': expected integers like 1,3,224,224 or NAME=1,3,224,224") from None
    if any(d <= 0 for d in shape):
        raise EdgekilnError(f"input shape '{part}': dimensions must be positive integers")
    return shape


# --- ONNX files -----------------------------------------------------------------------------

def load_onnx(path: str | Path) -> Any:
    """Load and check an ONNX file (with its external data); one-line errors for missing,
    foreign or corrupt files and missing weight files. Dimensions declared ``-1``/``0`` (Paddle's
    "any size") come back symbolic (:func:`~edgekiln.models.onnx_compat.symbolic_declared_dims`)."""
    return _load_onnx(path)[0]


def _load_onnx(path: str | Path) -> tuple[Any, list[str]]:
    """(the checked model, the tensors whose -1/0 dimensions were made symbolic)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise EdgekilnError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise EdgekilnError(f"{path}: not a valid ONNX model (truncated or corrupt?): {_short(exc)}") from exc
    if not model.graph.node and not model.graph.output:
        raise EdgekilnError(f"{path}: not an ONNX model (no graph found)")
    external = sorted({e.value for g in nested_graphs(model.graph) for t in g.initializer if uses_external_data(t)
                       for e in t.external_data if e.key == "location"})
    missing = [loc for loc in external if not (path.parent / loc).is_file()]
    if missing:
        raise EdgekilnError(f"{path}: its weights file '{missing[0]}' is not beside the model "
                            f"(external data is read from {path.parent})")
    symbolic = symbolic_declared_dims(model)
    # NOTE: with external data the checker gets the path: it reads the weights itself and also
    # handles models over protobuf's 2 GB limit.
    check_onnx(model, str(path), checker_input=str(path) if external else None)
    if external:
        load_external_data_for_model(model, str(path.parent))
    return model, symbolic


def check_onnx(model: Any, name: str, *, checker_input: str | None = None) -> None:
    """Known ops + onnx.checker (full: with strict shape inference), mapping failures to one line.
    With ``checker_input`` (the path of a model with external data) the checker reads the file for
    the structure and weights, and shape inference runs on ``model`` as loaded (whose declared
    ``-1`` dimensions may have been made symbolic; the file still says ``-1``)."""
    import onnx

    unknown = _unknown_ops(model)
    if unknown:
        raise EdgekilnError(f"{name}: unsupported op {unknown[0]}")
    try:
        if checker_input is None:
            onnx.checker.check_model(model, full_check=True)
        else:
            onnx.checker.check_model(checker_input, full_check=False)
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise EdgekilnError(f"{name}: invalid ONNX model: {_short(exc)}") from exc


def graph_inputs(model: Any) -> list[Any]:
    """Graph inputs that are real inputs (not initializers, which old exporters list too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _from_onnx_file(path: Path, input_shapes: InputShapes, data: Mapping[str, Path], *,
                    stored: Mapping[str, Shape] | None = None, work_dir: str | Path | None = None,
                    provenance: tuple[Mapping[str, Any], ...] = (), torch: TorchSource | None = None
                    ) -> ModelArtifact:
    model, symbolic = _load_onnx(path)
    inputs = resolve_inputs(model, input_shapes, data, str(path), stored=stored)
    kind = ONNX_QDQ if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else ONNX_FLOAT
    path, record = readable_copy(model, path, _work_dir(work_dir) if work_dir else None, symbolic=symbolic)
    prov = (*provenance, record) if record else tuple(provenance)
    return ModelArtifact(kind=kind, path=path, inputs=inputs, torch=torch, provenance=prov, data=dict(data))


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


# --- input shapes ---------------------------------------------------------------------------

def resolve_inputs(model: Any, input_shapes: InputShapes, data: Mapping[str, Path] | None, label: str, *,
                   stored: Mapping[str, Shape] | None = None) -> tuple[TensorSpec, ...]:
    """Every graph input of ``model`` as a :class:`TensorSpec` with a fixed shape (see the module
    docstring for where dynamic dimensions come from)."""
    inputs = graph_inputs(model)
    if not inputs:
        raise EdgekilnError(f"{label}: the model has no inputs")
    names = [i.name for i in inputs]
    given = _given_by_name(input_shapes, names, label)
    samples = _data_shapes(data or {}, names)
    declared = {i.name: _declared(i, label) for i in inputs}
    resolved: dict[str, list[int | None]] = {}
    for name in names:
        dims, syms = declared[name]
        if name in given:
            resolved[name] = _apply_given(name, dims, given[name], label)
        elif dims is None:
            resolved[name] = _unknown_rank(name, samples, stored, label)
        else:
            resolved[name] = list(dims)
            kept = {k: (v, "the run folder's stored shape") for k, v in (stored or {}).items()}
            for shapes in (samples, kept):   # NOTE: data is checked against fixed dims too
                if name in shapes and (shapes is samples or None in resolved[name]):
                    _fill(resolved[name], shapes[name][0], name, shapes[name][1], label)
    _share_symbols(resolved, {n: declared[n][1] for n in names})
    specs = []
    for inp in inputs:
        dims = resolved[inp.name]
        shown = ["?" if d is None else d for d in dims]
        if dims and dims[0] is None:
            dims[0] = 1  # NOTE: a leading dimension nothing fixes is the batch: batch 1.
        if any(d is None for d in dims):
            raise EdgekilnError(
                f"{label}: input '{inp.name}' has dynamic shape {shown}; give a shape with --input-shape "
                f"{inp.name}=d0,d1,... (e.g. 1,3,224,224) or calibration data (--calib)")
        dtype = onnx_elem_dtype(inp.type.tensor_type.elem_type).name
        specs.append(TensorSpec(inp.name, tuple(int(d) for d in dims), dtype))
    return tuple(specs)


def _given_by_name(input_shapes: InputShapes, names: list[str], label: str) -> dict[str, Shape]:
    if input_shapes is None:
        return {}
    if isinstance(input_shapes, Mapping):
        for key in input_shapes:
            if key not in names:
                raise EdgekilnError(f"{label}: unknown input name '{key}'; the model's inputs are: {', '.join(names)}")
        return {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    return {names[0]: tuple(int(d) for d in input_shapes)}


def _declared(inp: Any, label: str) -> tuple[list[int | None] | None, list[str | None]]:
    """(dims with None for dynamic ones, or None for an unknown rank; symbolic names per dim)."""
    if not inp.type.HasField("tensor_type"):
        kind = inp.type.WhichOneof("value") or "unknown"
        raise EdgekilnError(f"{label}: input '{inp.name}' is a {kind.replace('_type', '')}, not a tensor; "
                            "only tensor inputs are supported")
    tt = inp.type.tensor_type
    if not tt.HasField("shape"):
        return None, []
    dims: list[int | None] = []
    syms: list[str | None] = []
    for d in tt.shape.dim:
        fixed = d.HasField("dim_value") and d.dim_value > 0  # NOTE: Paddle writes -1, some exporters 0
        dims.append(int(d.dim_value) if fixed else None)
        syms.append(d.dim_param if d.HasField("dim_param") and d.dim_param not in ("", "?") else None)
    return dims, syms


def _apply_given(name: str, dims: list[int | None] | None, shape: Shape, label: str) -> list[int | None]:
    if dims is None:
        return list(shape)
    if len(shape) != len(dims):
        raise EdgekilnError(f"{label}: input '{name}' has rank {len(dims)}, the given shape {list(shape)} "
                            f"has rank {len(shape)}")
    for i, (want, have) in enumerate(zip(dims, shape, strict=True)):
        # NOTE: the batch (dimension 0) may differ: analysis and C sizing at another batch.
        if want is not None and i > 0 and want != have:
            raise EdgekilnError(f"{label}: input '{name}' dimension {i} is {want}, the given shape says {have}")
    return list(shape)


def _fill(dims: list[int | None], sample: Shape, name: str, where: str, label: str) -> None:
    """Fill the dynamic entries of ``dims`` from a sample shape (batch 1) of the same rank."""
    if len(sample) != len(dims):
        if len(sample) - 1 == len(dims):   # data stored without the batch dimension the model lacks
            sample = sample[1:]
        else:
            return
    for i, (want, have) in enumerate(zip(dims, sample, strict=True)):
        if want is None:
            dims[i] = have
        elif i > 0 and want != have:
            raise EdgekilnError(f"{label}: input '{name}' dimension {i} is {want}, but {where} has {have} "
                                f"(sample shape {list(sample)})")


def _unknown_rank(name: str, samples: Mapping[str, tuple[Shape, str]], stored: Mapping[str, Shape] | None,
                  label: str) -> list[int | None]:
    if name in samples:
        return list(samples[name][0])
    if stored and name in stored:
        return list(stored[name])
    raise EdgekilnError(f"{label}: input '{name}' has no shape (unknown rank); give it with --input-shape "
                        f"{name}=d0,d1,...")


def _share_symbols(resolved: dict[str, list[int | None]], syms: Mapping[str, list[str | None]]) -> None:
    """Dimensions with the same symbolic name (``seq`` on input_ids and attention_mask) get the
    value one of them was given."""
    values: dict[str, int] = {}
    for name, dims in resolved.items():
        for d, s in zip(dims, syms[name], strict=False):
            if s and d is not None:
                values.setdefault(s, d)
    for name, dims in resolved.items():
        for i, s in enumerate(syms[name][:len(dims)]):
            if dims[i] is None and s in values:
                dims[i] = values[s]


def _data_shapes(data: Mapping[str, Path], names: list[str]) -> dict[str, tuple[Shape, str]]:
    """{input: (shape of one sample with batch 1, file)} from the first data file that has it:
    key ``x`` is the only/first input, other keys are named like the inputs."""
    found: dict[str, tuple[Shape, str]] = {}
    for key in ("calib", "eval", *sorted(k for k in data if k not in ("calib", "eval"))):
        if key not in data:
            continue
        arrays = npz_shapes(data[key])
        for arr_name, shape in arrays.items():
            target = names[0] if arr_name == "x" and names[0] not in arrays else arr_name
            if target in names and target not in found and shape:
                found[target] = ((1, *shape[1:]), f"{data[key]} ('{arr_name}')")
    return found


def npz_shapes(path: str | Path) -> dict[str, Shape]:
    """Array shapes in an ``.npz`` file, read from the headers (the arrays are not loaded)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: data file not found")
    shapes: dict[str, Shape] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, _ = read(f)
                shapes[info.filename[:-4]] = tuple(int(d) for d in shape)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise EdgekilnError(f"{path}: not an .npz of arrays ({_short(exc)})") from None
    return shapes


# --- PyTorch --------------------------------------------------------------------------------

def _torch_shape(input_shapes: InputShapes, data: Mapping[str, Path], module: Any, name: str) -> Shape:
    if isinstance(input_shapes, Mapping):
        if len(input_shapes) != 1:
            raise EdgekilnError(f"{name}: PyTorch models take one input shape")
        return tuple(next(iter(input_shapes.values())))
    if input_shapes is not None:
        return tuple(input_shapes)
    shape = getattr(module, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    samples = _data_shapes(data, ["x"])
    if "x" in samples:
        return samples["x"][0]
    raise EdgekilnError(f"{name}: a PyTorch model needs an input shape (--input-shape 1,3,224,224)")


def _work_dir(work_dir: str | Path | None) -> Path:
    path = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="edgekiln-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _from_torch_source(source: TorchSource, input_shapes: InputShapes, data: Mapping[str, Path],
                       work_dir: str | Path | None, input_name: str = "input",
                       output_name: str = "output") -> ModelArtifact:
    from edgekiln.models.torch_export import export_to_onnx

    module = build_module(source)
    shape = _torch_shape(input_shapes, data, module, source.factory)
    out = _work_dir(work_dir) / "model.onnx"
    info = export_to_onnx(module, shape, out, input_name=input_name, output_name=output_name)
    record = {"pass": "export", "config": {"opset": info["opset"], "exporter": info["exporter"]},
              "max_abs_error": info["max_abs_error"]}
    return ModelArtifact(kind=ONNX_FLOAT, path=out, inputs=(TensorSpec(input_name, shape),),
                         torch=source, provenance=(record,), data=dict(data))


def _from_torch_file(path: Path, input_shapes: InputShapes, data: Mapping[str, Path],
                     work_dir: str | Path | None) -> ModelArtifact:
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
    shape = _torch_shape(input_shapes, data, None, str(path))
    out = _work_dir(work_dir) / "model.onnx"
    info = export_to_onnx(module, shape, out)
    record = {"pass": "export", "config": {"opset": info["opset"], "exporter": info["exporter"]},
              "source": str(path), "max_abs_error": info["max_abs_error"]}
    return ModelArtifact(kind=ONNX_FLOAT, path=out, inputs=(TensorSpec("input", shape),), provenance=(record,),
                         data=dict(data))


# --- run folders ----------------------------------------------------------------------------

def _load_run_folder(path: Path, input_shapes: InputShapes, data: Mapping[str, Path],
                     work_dir: str | Path | None) -> ModelArtifact:
    """A folder written by an edgekiln command (:class:`~edgekiln.models.run_folder.RunFolder`):
    its model, validated like any ONNX file; its stored input specs resolve what nothing else does."""
    from dataclasses import replace

    from edgekiln.models.run_folder import RunFolder

    stored = RunFolder(path).read()
    art = _from_onnx_file(stored.path, input_shapes, {**stored.data, **data},
                          stored={s.name: s.shape for s in stored.inputs}, work_dir=work_dir,
                          provenance=stored.provenance, torch=stored.torch)
    return replace(art, kind=stored.kind)


def run_folder_data(path: str | Path) -> dict[str, Path]:
    """The data files (``calib``, ``eval``, ``train``) a run folder's model was made or evaluated
    with; empty for anything but a folder."""
    from edgekiln.models.run_folder import RunFolder

    return dict(RunFolder(path).read().data) if Path(path).is_dir() else {}


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:240]
