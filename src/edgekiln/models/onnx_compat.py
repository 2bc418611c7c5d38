"""A copy of an ONNX model that the installed onnxruntime reads.

The installed ``onnx`` package writes IR version 14 and ai.onnx opset 28 by default;
onnxruntime 1.31 reads IR <= 13 and opens opsets <= 26 only. When no op of the model changed
between the two opsets the model means the same at the older ones, and :func:`readable_copy`
writes it so; otherwise one line says which op needs the newer opset.

Paddle (and some other exporters) declare "any size" as ``dim_value: -1`` (or ``0``) instead of a
symbolic dimension. onnxruntime reads that, but ONNX shape inference takes it literally (a
``Reshape`` to ``[0, 0, -1]`` then fails on a product of 0). :func:`symbolic_declared_dims` rewrites
such dimensions as symbolic ones, which is what they mean; the copy is written then too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def symbolic_declared_dims(model: Any) -> list[str]:
    """Rewrite dimensions declared as ``-1`` or ``0`` on the graph's inputs, outputs and value infos
    as symbolic ones (``<tensor>_dim<i>``), in place; the names of the tensors changed.

    >>> from onnx import helper, TensorProto
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 0])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "w"])])
    >>> m = helper.make_model(g)
    >>> symbolic_declared_dims(m)
    ['x', 'y']
    >>> [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    ['x_dim0', 3, 'x_dim2']
    >>> symbolic_declared_dims(m)
    []
    """
    changed = []
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        bad = [i for i, d in enumerate(dims) if d.HasField("dim_value") and d.dim_value <= 0]
        for i in bad:
            dims[i].dim_param = f"{info.name}_dim{i}"   # NOTE: clears dim_value (a oneof)
        if bad:
            changed.append(info.name)
    return changed


def readable_copy(model: Any, path: Path, work_dir: Path | None, *, symbolic: Sequence[str] = ()
                  ) -> tuple[Path, dict[str, Any] | None]:
    """``path`` itself, or ``model`` (``path`` as loaded, changed in place) written in ``work_dir``
    with the IR version and ai.onnx opset the installed onnxruntime reads
    (:func:`edgekiln.execution.ort.lower_for_ort`), and the provenance record saying what changed.
    The copy is written too when ``symbolic`` names tensors whose ``-1``/``0`` dimensions were made
    symbolic."""
    import tempfile

    import onnx

    from edgekiln.execution.ort import lower_for_ort

    ir_before, opset_before = int(model.ir_version), _ai_onnx_opset(model)
    lower_for_ort(model, copy=False, name=str(path))
    ir_after, opset_after = int(model.ir_version), _ai_onnx_opset(model)
    if (ir_after, opset_after) == (ir_before, opset_before) and not symbolic:
        return path, None
    out = (work_dir or Path(tempfile.mkdtemp(prefix="edgekiln-"))) / f"{path.stem}.ir{ir_after}.onnx"
    external = any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    if external:  # keep the weights in a side file, as the user's model does
        onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{out.name}.data", size_threshold=1024)
    else:
        onnx.save(model, str(out))
    record: dict[str, Any] = {"pass": "intake", "ir_version": [ir_before, ir_after], "source": str(path),
                              "note": f"a copy onnxruntime {_ort_version()} reads: IR version {ir_before} -> {ir_after}"}
    if opset_before != opset_after:
        record["opset"] = [opset_before, opset_after]
        record["note"] += f", ai.onnx opset {opset_before} -> {opset_after} (no op of the model changed in between)"
    if symbolic:
        record["symbolic_dims"] = list(symbolic)
        record["note"] += f"; -1/0 dimensions of {', '.join(symbolic)} made symbolic"
    return out, record


def _ai_onnx_opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
