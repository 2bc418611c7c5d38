"""One suite over every registered pass: config round-trip, frozen configs, input untouched,
provenance recorded, and the same output for the same seed."""

from __future__ import annotations

import dataclasses

import pytest

from edgekiln.fileio import sha256_file
from edgekiln.models.artifact import ModelArtifact, TorchSource
from edgekiln.models.intake import load_model
from edgekiln.passes.base import PassContext
from edgekiln.passes.registry import registry
from edgekiln.pipeline import Step, check_chain
from edgekiln.testing.tiny import random_npz

# Per-pass options that keep the contract run small; every other option is the default.
SMALL = {
    "prune": {"finetune_epochs": 1},
    "distill": {"epochs": 1, "student": "self"},
    # NOTE: the int8 form (speed rule on/off, int8/uint8 activations) is chosen by timing on this
    # machine: the one input of the pass that is not the seed. Pinned here; the choice given the
    # timings is tested in tests/unit/passes/test_quantize_forms.py and tests/unit/quant/test_speed.py.
    "quantize": {"calib_samples": 16, "speed_rule": "on", "activations": "int8"},
    "qat": {"epochs": 1, "calib_samples": 16},
}
PASSES = sorted(registry())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A torch-backed tiny CNN (8x8 input) exported to ONNX, with calibration/eval data."""
    d = tmp_path_factory.mktemp("tiny")
    src = TorchSource(factory="edgekiln.testing.tiny:tiny_torch_cnn")
    art = load_model(src.factory, input_shapes=(1, 1, 8, 8), work_dir=d / "model")
    data = {"calib": random_npz(d / "calib.npz", (1, 1, 8, 8), n=32, seed=1),
            "eval": random_npz(d / "eval.npz", (1, 1, 8, 8), n=32, seed=2)}
    return art, data


def _config(name):
    spec = registry()[name]
    fields = {f.name for f in dataclasses.fields(spec.config_type)}
    return spec.config_type.from_dict({k: v for k, v in SMALL.get(name, {}).items() if k in fields})


def _run(name, art: ModelArtifact, data, work, seed=0):
    spec = registry()[name]
    ctx = PassContext(work_dir=work, calib_path=data["calib"], eval_path=data["eval"], seed=seed, quiet=True)
    work.mkdir(parents=True, exist_ok=True)
    return spec.run(art, _config(name), ctx)


@pytest.mark.parametrize("name", PASSES)
def test_config_round_trips_and_is_frozen(name):
    cfg = _config(name)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    field = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, getattr(cfg, field))


@pytest.mark.parametrize("name", PASSES)
def test_spec_declares_a_chainable_contract(name):
    spec = registry()[name]
    assert spec.consumes and spec.produces and spec.summary
    start = sorted(spec.consumes)[0]
    check_chain(start, [Step(name, _config(name))], has_torch_source=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSES)
def test_run_leaves_input_untouched_records_provenance_and_is_deterministic(name, tiny, tmp_path):
    art, data = tiny
    if "onnx" not in registry()[name].consumes:
        pytest.skip(f"{name} consumes {sorted(registry()[name].consumes)}; the tiny fixture is a float ONNX model")
    before = sha256_file(art.path)
    first = _run(name, art, data, tmp_path / "a")
    second = _run(name, art, data, tmp_path / "b")
    assert sha256_file(art.path) == before, f"{name} modified its input model"
    assert first.path != art.path and first.path.is_file()
    assert len(first.provenance) == len(art.provenance) + 1 and first.provenance[-1]["pass"] == name
    assert first.provenance[-1]["input_sha256"] == before
    assert sha256_file(first.path) == sha256_file(second.path), f"{name}: two runs with seed 0 differ"
