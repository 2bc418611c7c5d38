"""Every command that takes MODEL accepts every kind of run folder (issue 19, reproduction 5).

Each kind of run folder is built once (tiny digits model, fastest settings the CLI allows), then
every consuming command runs on it with ``--out``; the consumer's own run folder must hold the
very model file of the source folder (same SHA-256), or, for ``quantize``, record that file's hash
as its input and continue the source's provenance.
"""

from __future__ import annotations

import pytest
from cli_run import run_cli as _run

from edgekiln.fileio import sha256_file
from edgekiln.models.run_folder import RunFolder

pytestmark = pytest.mark.slow

# NOTE: the producer is the first parameter of every test: `make test` (pytest-xdist) runs each producer's tests
# on one worker, which builds that folder once (tests/conftest.py, work_unit).
PRODUCERS = ("example", "quantize", "optimize", "prune", "distill", "export", "federate")
CONSUMERS = ("inspect", "fits", "bench", "quantize", "export")




def _make(argv: list[str], out) -> RunFolder:  # noqa: ANN001
    code = _run([*argv, "--out", str(out)])
    assert code == 0, f"`edgekiln {' '.join(argv)}` exited {code}"
    return RunFolder(out)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def example(root):
    return _make(["example", "digits", "--epochs", "2", "--quiet"], root / "example")


@pytest.fixture(scope="module")
def quantize(root, example):
    return _make(["quantize", str(example.path), "--scheme", "int8", "--bench-runs", "5"], root / "quantize")


@pytest.fixture(scope="module")
def optimize(root, example):
    # The example's ONNX file: a quantization-only space, so the selected model is int8 and
    # `export --to c` applies to the folder too.
    e = example.path
    return _make(["optimize", str(e / "model.onnx"), "--calib", str(e / "calib.npz"), "--eval", str(e / "eval.npz"),
                  "--target", "cortex-m7", "--trials", "2", "--prefer", "size", "--quiet"], root / "optimize")


@pytest.fixture(scope="module")
def prune(root, example):
    return _make(["prune", str(example.path), "--ratio", "0.5", "--finetune-epochs", "1", "--bench-runs", "5",
                  "--quiet"], root / "prune")


@pytest.fixture(scope="module")
def distill(root, example):
    return _make(["distill", str(example.path), "--student", "ds_cnn", "--student-arg", "channels=8",
                  "--student-arg", "input_size=8", "--epochs", "1", "--bench-runs", "5", "--quiet"], root / "distill")


@pytest.fixture(scope="module")
def export(root, quantize):
    return _make(["export", str(quantize.path), "--to", "c"], root / "export")


@pytest.fixture(scope="module")
def federate(root):
    return _make(["federate", "--example", "digits", "--clients", "2", "--rounds", "1", "--local-epochs", "1",
                  "--cpus", "1", "--quiet"], root / "federate")


@pytest.mark.parametrize("producer", PRODUCERS)
def test_every_folder_reads_back_its_own_model(request, producer):
    folder: RunFolder = request.getfixturevalue(producer)
    art = folder.read()
    rep = folder.report()
    assert rep["schema_version"] == 2 and rep["command"] == producer, (rep["schema_version"], rep["command"])
    assert art.path.parent == folder.path and art.inputs[0].shape == (1, 1, 8, 8), (art.path, art.inputs)
    assert all(p.parent == folder.path and p.is_file() for p in art.data.values()), art.data
    assert all("pass" in p for p in art.provenance), art.provenance


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("producer", PRODUCERS)
def test_command_on_run_folder(request, tmp_path, producer, consumer):
    src: RunFolder = request.getfixturevalue(producer)
    model = src.read()
    digest = sha256_file(model.path)
    out = tmp_path / "out"
    argv = {"inspect": ["inspect", str(src.path)],
            "fits": ["fits", str(src.path), "--target", "cortex-m7"],
            "bench": ["bench", str(src.path), "--runs", "5", "--warmup", "1"],
            "quantize": ["quantize", str(src.path), "--scheme", "int8", "--bench-runs", "5"],
            "export": ["export", str(src.path), "--to", "c"]}[consumer]
    code = _run([*argv, "--out", str(out)])
    if consumer == "export" and model.kind != "onnx-qdq":
        # A float model is refused by name (exit 2), not misread.
        assert code == 2, f"export --to c of the float {producer} folder exited {code}"
        return
    if consumer == "quantize" and model.kind != "onnx":
        # An int8 model is refused by name (exit 2), not quantized a second time.
        assert code == 2, f"quantize of the {model.kind} {producer} folder exited {code}"
        return
    assert code in ((0, 3) if consumer == "fits" else (0,)), f"`edgekiln {consumer}` on a {producer} folder: exit {code}"
    made = RunFolder(out).read()
    if consumer == "quantize":
        record = made.provenance[-1]
        assert record["pass"] == "quantize" and record["input_sha256"] == digest, (record, digest)
        assert list(made.provenance[:-1]) == list(model.provenance), "the source's provenance does not continue"
        assert made.kind == "onnx-qdq" and made.inputs == model.inputs
        assert set(made.data) == {k for k in model.data if k in ("calib", "eval")}, (made.data, model.data)
    else:
        assert sha256_file(made.path) == digest, f"{consumer} of the {producer} folder used another model"
        assert made.inputs == model.inputs and made.kind == model.kind, (made, model)


# The commands that transform a model's PyTorch source (prune, distill) and the main job (optimize)
# on every kind of folder: a folder that holds the PyTorch source is pruned/distilled, one that
# holds only an ONNX file is refused by name (exit 2); optimize takes every folder.
TORCH_CONSUMERS = {
    "prune": ["--ratio", "0.5", "--finetune-epochs", "1", "--bench-runs", "5", "--quiet"],
    "distill": ["--student", "ds_cnn", "--student-arg", "channels=8", "--student-arg", "input_size=8",
                "--epochs", "1", "--bench-runs", "5", "--quiet"],
}


@pytest.mark.parametrize("consumer", [*TORCH_CONSUMERS, "optimize"])
@pytest.mark.parametrize("producer", PRODUCERS)
def test_transforming_command_on_run_folder(request, tmp_path, producer, consumer, capsys):
    src: RunFolder = request.getfixturevalue(producer)
    model = src.read()
    out = tmp_path / "out"
    if consumer == "optimize":
        argv = ["optimize", str(src.path), "--target", "cortex-m7", "--trials", "1", "--no-mcu-library", "--quiet"]
    else:
        argv = [consumer, str(src.path), *TORCH_CONSUMERS[consumer]]
        if "train" not in model.data:   # federate's data stays with its clients: the user names it
            argv += ["--train", str(request.getfixturevalue("example").read().data["train"])]
    code = _run([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    if consumer in TORCH_CONSUMERS and model.torch is None:
        assert code == 2 and "PyTorch source" in err and len(err.splitlines()) == 1, (code, err)
        return
    assert code == 0, f"`edgekiln {consumer}` on a {producer} folder: exit {code}: {err}"
    made = RunFolder(out).read()
    assert made.inputs == model.inputs, (made.inputs, model.inputs)
    if consumer in TORCH_CONSUMERS:
        assert made.provenance[-1]["pass"] == consumer, made.provenance[-1]
        assert list(made.provenance[:len(model.provenance)]) == list(model.provenance), "provenance does not continue"
