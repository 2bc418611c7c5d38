"""The run folder: the one type every command writes its result into and reads a model from.

A run folder holds ``report.json`` (machine-readable, written last: a folder with one is
complete), ``report.md`` (the same, readable), the plots it links, the model file and the data
it was made or evaluated with. ``report.json`` is an envelope (schema version, command,
edgekiln version, time, machine), a typed ``model`` block, a ``provenance`` list and then the
command's own measurements; docs/report-schema.md documents every key.

>>> import tempfile, onnx
>>> from onnx import helper, TensorProto
>>> from edgekiln.execution.specs import TensorSpec
>>> tmp = Path(tempfile.mkdtemp())
>>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
>>> onnx.save(helper.make_model(g), tmp / "relu.onnx")
>>> art = ModelArtifact(kind="onnx", path=tmp / "relu.onnx", inputs=(TensorSpec("x", (1, 4)),))
>>> run = RunFolder(tmp / "run")
>>> _ = run.write(command="inspect", model=art, measurements={"params": 0}, markdown="# relu")
>>> back = run.read()
>>> back.path.name, back.inputs[0].shape, run.report()["model"]["precision"]
('model.onnx', (1, 4), 'fp32')
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.execution.specs import TensorSpec, onnx_elem_dtype
from edgekiln.fileio import atomic_write_json, atomic_write_text
from edgekiln.models.artifact import C_LIBRARY, ONNX_FLOAT, TFLITE, ModelArtifact, TorchSource
from edgekiln.report.writer import envelope

REPORT = "report.json"
MARKDOWN = "report.md"
DATA_KEYS = ("calib", "eval", "train")
# Keys RunFolder.write owns; a command's measurements may not set them.
RESERVED = ("schema_version", "command", "edgekiln_version", "created", "machine", "model", "provenance")
# The precision names of device profiles (edgekiln.targets.profiles.PRECISIONS).
PRECISION = {"onnx-qdq": "int8", "onnx-fp16": "fp16", "onnx-int4w": "int4", C_LIBRARY: "int8", TFLITE: "int8"}


def precision_of(kind: str) -> str:
    """The number format of a model kind: ``fp32`` unless the kind says otherwise.

    >>> precision_of("onnx-qdq"), precision_of("onnx")
    ('int8', 'fp32')
    """
    return PRECISION.get(kind, "fp32")


class RunFolder:
    """A folder an edgekiln command writes (``write``) and any command reads a model from (``read``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def work_dir(self) -> Path:
        """``RUN/work/``: scratch files of the command (exported inputs, trial models), never beside the model."""
        path = self.path / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def is_run_folder(self) -> bool:
        return (self.path / REPORT).is_file()

    # --- writing -----------------------------------------------------------------------------

    def write(self, *, command: str, model: ModelArtifact | None, measurements: Mapping[str, Any], markdown: str,
              provenance: Sequence[Mapping[str, Any]] | None = None, runtimes: Sequence[str] | None = None) -> Path:
        """Write ``report.md`` and then ``report.json`` (atomically, in that order); return the JSON path.

        The model file is checked first (:func:`~edgekiln.models.artifact_check.check_model_file`:
        full ``onnx.checker``, one run in onnxruntime and in each of ``runtimes``, by default
        those the measurements report for it); a model that fails is not written (one-line
        error). The model file, its torch state_dict and its data files are then linked (or
        copied) into the folder when they lie outside it or in ``work/``, so the folder stands on
        its own. ``provenance`` defaults to the model's.
        """
        from edgekiln.models.artifact_check import check_model_file, reported_runtimes

        clash = sorted(set(measurements) & set(RESERVED))
        if clash:
            raise ValueError(f"measurements may not set {clash}: RunFolder.write owns them")
        if model is not None:
            check_model_file(model.path, inputs=model.inputs, label=f"{command} (nothing written)",
                             runtimes=reported_runtimes(command, measurements) if runtimes is None else runtimes)
        self.path.mkdir(parents=True, exist_ok=True)
        records = [dict(p) for p in (provenance if provenance is not None else (model.provenance if model else ()))]
        for r in records:
            if "pass" not in r:
                raise ValueError(f"a provenance record needs a 'pass' name: {r}")
        report = {**envelope(command), "model": self._model_block(model) if model else None,
                  "provenance": records, **measurements}
        atomic_write_text(self.path / MARKDOWN, markdown.rstrip() + "\n")
        return atomic_write_json(self.path / REPORT, report)

    def _model_block(self, art: ModelArtifact) -> dict[str, Any]:
        path = self._adopt(Path(art.path), "model" + Path(art.path).suffix, companions=True)
        torch = None
        if art.torch is not None:
            sd = art.torch.state_dict
            rel = self._adopt(Path(sd), "model" + Path(sd).suffix) if sd else None
            # NOTE: a pruned model's factory (compress.structured:rebuild) takes the state_dict path
            # as a keyword too; it is stored relative like the state_dict and resolved again on read.
            kwargs = {k: rel if sd and k == "state_dict" and str(v) == str(sd) else v
                      for k, v in art.torch.factory_kwargs.items()}
            torch = {"factory": art.torch.factory, "factory_kwargs": kwargs, "state_dict": rel}
        data = {key: self._adopt(Path(p), f"{key}.npz") for key, p in sorted(art.data.items())}
        return {"path": path, "kind": art.kind, "precision": precision_of(art.kind),
                "inputs": [s.to_dict() for s in art.inputs], "data": data, "torch": torch}

    def _adopt(self, src: Path, name: str, *, companions: bool = False) -> str:
        """``src`` relative to the folder; linked or copied in as ``name`` when outside it or in work/."""
        root = self.path.resolve()
        here = src.resolve()
        if here.is_relative_to(root) and not here.is_relative_to(root / "work"):
            return here.relative_to(root).as_posix()
        if not here.exists():
            raise EdgekilnError(f"{src}: file not found (writing the run folder {self.path})")
        dest = root / name
        if here.is_dir():  # a C library or OpenVINO folder: copied whole
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(here, dest)
            return name
        _link_or_copy(here, dest)
        # NOTE: onnx refuses external data files with several hard links ("hardlink attack"): copied.
        for rel in _companion_files(here) if companions else ():
            _link_or_copy(here.parent / rel, root / rel, link=False)
        return name

    # --- reading -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The parsed ``report.json``; one-line errors when it is missing or not JSON."""
        path = self.path / REPORT
        if not self.path.is_dir():
            raise EdgekilnError(f"{self.path}: not a folder")
        if not path.is_file():
            raise EdgekilnError(f"{self.path}: not an edgekiln run folder (no {REPORT})")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgekilnError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise EdgekilnError(f"{path}: not an edgekiln report (expected a JSON object)")
        return data

    def read(self) -> ModelArtifact:
        """The model the folder holds, with its input specs, data, torch source and provenance.

        Reads every folder an edgekiln command writes (schema 2), and folders of schema 1 where
        the model can be found (``model.onnx``, ``artifact``, an optimize run's ``selected``).
        """
        report = self.report()
        version = report.get("schema_version", 1)
        if isinstance(version, int) and version >= 2:
            return self._read_v2(report)
        return self._read_v1(report)

    def _read_v2(self, report: dict[str, Any]) -> ModelArtifact:
        block = report.get("model")
        if not isinstance(block, dict) or not block.get("path"):
            why = {"optimize": ": no candidate was selected"}.get(str(report.get("command")), "")
            raise EdgekilnError(f"{self.path}: the run folder holds no model (written by "
                                f"`{report.get('command', '?')}`{why})")
        path = self._existing(block["path"])
        torch = None
        if isinstance(block.get("torch"), dict) and block["torch"].get("factory"):
            t = block["torch"]
            sd = self._existing(t["state_dict"]) if t.get("state_dict") else None
            kwargs = dict(t.get("factory_kwargs") or {})
            if sd is not None and kwargs.get("state_dict") == t["state_dict"]:
                kwargs["state_dict"] = str(sd)
            torch = TorchSource(factory=t["factory"], factory_kwargs=kwargs, state_dict=sd)
        try:
            inputs = tuple(TensorSpec.from_dict(s) for s in block.get("inputs") or ())
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgekilnError(f"{self.path / REPORT}: model.inputs is malformed ({exc})") from None
        data = {k: self._existing(v) for k, v in (block.get("data") or {}).items()}
        return ModelArtifact(kind=str(block.get("kind") or ONNX_FLOAT), path=path, inputs=inputs, torch=torch,
                             provenance=tuple(report.get("provenance") or ()), data=data)

    def _read_v1(self, report: dict[str, Any]) -> ModelArtifact:
        """Folders written before schema 2: the model was named in one of four places."""
        block = report.get("model") if isinstance(report.get("model"), dict) else {}
        selected = report.get("selected") if isinstance(report.get("selected"), dict) else {}
        artifact = report.get("artifact")
        if isinstance(artifact, dict):
            artifact = artifact.get("path")
        rel = (selected.get("artifact") or block.get("onnx") or artifact
               or (report["model"] if isinstance(report.get("model"), str) else None))
        if not rel:
            raise EdgekilnError(f"{self.path}: the run folder names no model ({REPORT} of schema 1 has no "
                                "'model', 'artifact' or 'selected' entry)")
        path = self._existing(rel)
        torch = None
        if block.get("torch_factory"):
            sd = block.get("state_dict")
            torch = TorchSource(factory=block["torch_factory"], factory_kwargs=dict(block.get("factory_kwargs") or {}),
                                state_dict=self._existing(sd) if sd else None)
        provenance = tuple(report.get("provenance") or ())
        if not provenance and selected.get("passes"):
            provenance = tuple(selected["passes"])
        shape = tuple(int(d) for d in block["input_shape"]) if block.get("input_shape") else None
        if path.suffix != ".onnx":
            raise EdgekilnError(f"{self.path}: schema-1 run folder names {rel}, not an ONNX model")
        kind, inputs = _onnx_kind_and_inputs(path, shape, self.path)
        data = {k: self.path / f"{k}.npz" for k in DATA_KEYS if (self.path / f"{k}.npz").is_file()}
        return ModelArtifact(kind=kind, path=path, inputs=inputs, torch=torch, provenance=provenance, data=data)

    def _existing(self, rel: str) -> Path:
        path = self.path / rel
        if not path.exists():
            raise EdgekilnError(f"{self.path}: {rel} named in {REPORT} is missing")
        return path


def _link_or_copy(src: Path, dest: Path, *, link: bool = True) -> None:
    """Hard-link ``src`` to ``dest`` (same file system), else copy it; ``dest`` is replaced."""
    if dest.exists() and dest.resolve() == src.resolve():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if not link:
            raise OSError("copy asked for")
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _companion_files(path: Path) -> list[str]:
    """Files a model needs beside it: ONNX external data, OpenVINO's ``.bin``."""
    if path.suffix == ".xml":
        return [path.with_suffix(".bin").name] if path.with_suffix(".bin").is_file() else []
    if path.suffix != ".onnx":
        return []
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")
    return sorted(found)


def _onnx_kind_and_inputs(path: Path, first_shape: tuple[int, ...] | None,
                          folder: Path) -> tuple[str, tuple[TensorSpec, ...]]:
    """Kind and input specs of a schema-1 folder's ONNX file (a dynamic batch dimension becomes 1)."""
    import onnx

    from edgekiln.models.artifact import ONNX_FP16, ONNX_INT4W, ONNX_QDQ

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise EdgekilnError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0][:200]})") from None
    ops = {n.op_type for n in model.graph.node}
    kind = (ONNX_QDQ if ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"} else
            ONNX_INT4W if "MatMulNBits" in ops else
            ONNX_FP16 if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) else ONNX_FLOAT)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for n, value in enumerate(v for v in model.graph.input if v.name not in inits):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if n == 0 and first_shape is not None and len(first_shape) == len(dims):
            dims = list(first_shape)
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            shown = ["?" if d is None else d for d in dims]
            raise EdgekilnError(f"{folder}: schema-1 run folder: input '{value.name}' has dynamic shape {shown} and "
                                f"{REPORT} stores none; run the command that wrote it again")
        specs.append(TensorSpec(value.name, tuple(int(d) for d in dims), str(onnx_elem_dtype(t.elem_type))))
    return kind, tuple(specs)
