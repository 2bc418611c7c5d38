"""RunFolder: what one command writes, the next one reads back as the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.execution.specs import TensorSpec
from edgekiln.fileio import atomic_write_json, sha256_file
from edgekiln.models.artifact import ONNX_FLOAT, ONNX_QDQ, ModelArtifact, TorchSource
from edgekiln.models.run_folder import RESERVED, RunFolder
from edgekiln.report.writer import REPORT_SCHEMA_VERSION
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx

SPEC = TensorSpec("input", (1, 1, 8, 8))


@pytest.fixture()
def model(tmp_path) -> ModelArtifact:
    """A float model with its data and torch source outside the run folder, as a command sees its input."""
    src = tmp_path / "src"
    src.mkdir()
    tiny_conv_onnx(src / "tiny.onnx", seed=3)
    random_npz(src / "c.npz", (1, 1, 8, 8), n=4, seed=1)
    random_npz(src / "e.npz", (1, 1, 8, 8), n=4, seed=2)
    (src / "w.pt").write_bytes(b"state")
    return ModelArtifact(kind=ONNX_FLOAT, path=src / "tiny.onnx", inputs=(SPEC,),
                         torch=TorchSource(factory="edgekiln.models.zoo:digits_cnn", factory_kwargs={"width": 2},
                                           state_dict=src / "w.pt"),
                         provenance=({"pass": "export", "config": {"opset": 17}},),
                         data={"calib": src / "c.npz", "eval": src / "e.npz"})


def test_write_then_read_gives_the_same_model_with_files_inside_the_folder(tmp_path, model):
    run = RunFolder(tmp_path / "run")
    run.write(command="inspect", model=model, measurements={"params": 42}, markdown="# x")
    back = run.read()
    rep = run.report()
    assert rep["schema_version"] == REPORT_SCHEMA_VERSION == 2 and rep["command"] == "inspect"
    assert rep["model"] == {"path": "model.onnx", "kind": "onnx", "precision": "fp32",
                            "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}],
                            "data": {"calib": "calib.npz", "eval": "eval.npz"},
                            "torch": {"factory": "edgekiln.models.zoo:digits_cnn", "factory_kwargs": {"width": 2},
                                      "state_dict": "model.pt"}}
    assert rep["params"] == 42 and rep["provenance"] == [{"pass": "export", "config": {"opset": 17}}]
    # Equal except that every path now lies in the folder; the files are the same bytes.
    assert (back.kind, back.inputs, back.torch.factory, dict(back.torch.factory_kwargs), tuple(back.provenance)) == \
        (model.kind, model.inputs, model.torch.factory, dict(model.torch.factory_kwargs), tuple(model.provenance))
    assert back.path == run.path / "model.onnx" and sha256_file(back.path) == sha256_file(model.path)
    assert {k: p.name for k, p in back.data.items()} == {"calib": "calib.npz", "eval": "eval.npz"}
    assert back.torch.state_dict == run.path / "model.pt" and back.torch.state_dict.read_bytes() == b"state"
    assert (run.path / "report.md").read_text() == "# x\n"


def test_a_model_already_in_the_folder_stays_where_it_is(tmp_path):
    run = RunFolder(tmp_path / "run")
    (run.path / "int8").mkdir(parents=True)
    tiny_conv_onnx(run.path / "int8" / "q.onnx")
    art = ModelArtifact(kind=ONNX_QDQ, path=run.path / "int8" / "q.onnx", inputs=(SPEC,))
    run.write(command="quantize", model=art, measurements={}, markdown="")
    assert run.report()["model"]["path"] == "int8/q.onnx" and run.report()["model"]["precision"] == "int8"
    assert not (run.path / "model.onnx").exists()
    assert run.read().path == run.path / "int8" / "q.onnx"


def test_a_model_in_work_is_moved_out_of_the_scratch_folder(tmp_path):
    run = RunFolder(tmp_path / "run")
    tiny_conv_onnx(run.work_dir / "trial.onnx")
    art = ModelArtifact(kind=ONNX_FLOAT, path=run.work_dir / "trial.onnx", inputs=(SPEC,))
    run.write(command="prune", model=art, measurements={}, markdown="")
    assert run.report()["model"]["path"] == "model.onnx" and run.work_dir == run.path / "work"


def test_pruned_factory_state_dict_keyword_is_stored_relative(tmp_path):
    run = RunFolder(tmp_path / "run")
    tiny_conv_onnx(run.work_dir / "model.onnx")
    sd = run.work_dir / "model.pt"
    sd.write_bytes(b"pruned")
    src = TorchSource(factory="edgekiln.compress.structured:rebuild",
                      factory_kwargs={"factory": "m:f", "state_dict": str(sd), "factory_kwargs": {}}, state_dict=sd)
    run.write(command="prune", model=ModelArtifact(kind=ONNX_FLOAT, path=run.work_dir / "model.onnx", inputs=(SPEC,),
                                                   torch=src), measurements={}, markdown="")
    assert run.report()["model"]["torch"]["factory_kwargs"]["state_dict"] == "model.pt"
    back = run.read().torch
    assert back.factory_kwargs["state_dict"] == str(run.path / "model.pt") == str(back.state_dict)


def test_measurements_may_not_overwrite_the_envelope_or_model(tmp_path, model):
    for key in RESERVED:
        with pytest.raises(ValueError, match="RunFolder.write owns"):
            RunFolder(tmp_path / "r").write(command="x", model=model, measurements={key: 1}, markdown="")


def test_provenance_records_need_a_pass_name(tmp_path, model):
    with pytest.raises(ValueError, match="'pass' name"):
        RunFolder(tmp_path / "r").write(command="x", model=model, measurements={}, markdown="",
                                        provenance=[{"step": "federate"}])


@pytest.mark.parametrize("report,message", [
    (None, "not an edgekiln run folder (no report.json)"),
    ({"schema_version": 2, "command": "optimize", "model": None}, "holds no model (written by `optimize`: no candidate"),
    ({"schema_version": 2, "command": "quantize", "model": {"path": "gone.onnx"}}, "gone.onnx named in report.json is missing"),
    ({"metric": 0.9}, "names no model (report.json of schema 1 has no 'model', 'artifact' or 'selected' entry)"),
    ({"selected": {"artifact": "gone.onnx"}}, "gone.onnx named in report.json is missing"),
])
def test_a_folder_without_a_model_is_one_line_naming_the_folder(tmp_path, report, message):
    run = tmp_path / "run"
    run.mkdir()
    if report is not None:
        atomic_write_json(run / "report.json", report)
    with pytest.raises(EdgekilnError) as exc:
        RunFolder(run).read()
    text = str(exc.value)
    assert message in text and str(run) in text and "\n" not in text, text


def test_not_json_is_one_line(tmp_path):
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(EdgekilnError, match="report.json: not valid JSON"):
        RunFolder(tmp_path).read()


def _v1(tmp_path: Path, report: dict, *, batch: int | str = "N") -> RunFolder:
    run = tmp_path / "v1"
    run.mkdir()
    tiny_conv_onnx(run / "model.onnx", batch=batch)
    random_npz(run / "eval.npz", (1, 1, 8, 8), n=4, seed=2)
    (run / "model.pt").write_bytes(b"sd")
    atomic_write_json(run / "report.json", {"schema_version": 1, **report})
    return RunFolder(run)


def test_schema_1_example_folder(tmp_path):
    run = _v1(tmp_path, {"command": "example", "artifact": "model.onnx", "provenance": [{"pass": "x", "config": {}}],
                         "model": {"torch_factory": "edgekiln.models.zoo:digits_cnn", "factory_kwargs": {},
                                   "state_dict": "model.pt", "onnx": "model.onnx", "input_shape": [1, 1, 8, 8],
                                   "input_name": "input"}})
    art = run.read()
    assert (art.kind, art.inputs, art.torch.factory, art.torch.state_dict) == \
        (ONNX_FLOAT, (SPEC,), "edgekiln.models.zoo:digits_cnn", run.path / "model.pt")
    assert art.data == {"eval": run.path / "eval.npz"} and art.provenance == ({"pass": "x", "config": {}},)


def test_schema_1_optimize_folder_reads_the_selected_model_and_its_passes(tmp_path):
    passes = [{"pass": "quantize", "config": {"scheme": "int8"}}]
    art = _v1(tmp_path, {"command": "optimize", "selected": {"artifact": "model.onnx", "passes": passes}}).read()
    assert art.path.name == "model.onnx" and art.inputs == (SPEC,) and list(art.provenance) == passes


def test_schema_1_quantize_folder_with_a_fixed_batch(tmp_path):
    art = _v1(tmp_path, {"command": "quantize", "artifact": "model.onnx"}, batch=4).read()
    assert art.inputs == (TensorSpec("input", (4, 1, 8, 8)),)


def test_schema_1_folder_with_an_unresolvable_dimension_says_so(tmp_path):
    run = tmp_path / "v1"
    run.mkdir()
    m = onnx.load(str(tiny_conv_onnx(run / "model.onnx")))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    onnx.save(m, str(run / "model.onnx"))
    atomic_write_json(run / "report.json", {"artifact": "model.onnx"})
    with pytest.raises(EdgekilnError, match=r"input 'input' has dynamic shape \[1, 1, '\?', 8\]"):
        RunFolder(run).read()


def test_write_without_a_model_and_read_explains(tmp_path):
    run = RunFolder(tmp_path / "b")
    run.write(command="bench", model=None, measurements={"results": []}, markdown="")
    assert json.loads((run.path / "report.json").read_text())["model"] is None
    with pytest.raises(EdgekilnError, match=r"holds no model \(written by `bench`\)"):
        run.read()


def test_external_data_files_come_along(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    m = onnx.load(str(tiny_conv_onnx(tmp_path / "t.onnx")))
    onnx.save(m, str(src / "big.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="big.weights", size_threshold=0)
    run = RunFolder(tmp_path / "run")
    run.write(command="inspect", model=ModelArtifact(kind=ONNX_FLOAT, path=src / "big.onnx", inputs=(SPEC,)),
              measurements={}, markdown="")
    assert (run.path / "big.weights").is_file()
    loaded = onnx.load(str(run.read().path))
    w = next(t for t in loaded.graph.initializer if t.name == "w1")
    assert np.asarray(onnx.numpy_helper.to_array(w)).shape == (4, 1, 3, 3)
