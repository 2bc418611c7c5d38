"""Pipeline: the chain is checked before anything runs; steps are validated and recorded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_save_onnx
from edgekiln.models.intake import load_model
from edgekiln.passes import registry as reg
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, provenance_record
from edgekiln.pipeline import Step, check_chain, run_pipeline
from edgekiln.testing.tiny import tiny_conv_onnx


@dataclass(frozen=True, kw_only=True)
class ScaleConfig(PassConfig):
    factor: float = 0.5


def _scale(artifact, config, ctx):
    """Scales every initializer: a real transformation with a known effect."""
    model = onnx.load(str(artifact.path))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * config.factor, init.name))
    out = atomic_save_onnx(ctx.work_dir / "model.onnx", model)
    return artifact.with_pass(kind="onnx", path=out, record=provenance_record("scale", config, artifact))


def _broken(artifact, config, ctx):
    model = onnx.load(str(artifact.path))
    model.graph.node[-1].attribute[0].i = 0  # Gemm transB=0: the shapes no longer agree
    out = atomic_save_onnx(ctx.work_dir / "model.onnx", model)
    return artifact.with_pass(kind="onnx", path=out, record=provenance_record("broken", config, artifact))


@pytest.fixture
def fake_passes(monkeypatch):
    specs = dict(reg.registry())
    specs["scale"] = PassSpec("scale", ScaleConfig, _scale, frozenset({"onnx"}), "onnx", "test")
    specs["broken"] = PassSpec("broken", ScaleConfig, _broken, frozenset({"onnx"}), "onnx", "test")
    specs["to-c"] = PassSpec("to-c", ScaleConfig, _scale, frozenset({"onnx-qdq"}), "c-library", "test")
    specs["liar"] = PassSpec("liar", ScaleConfig, _scale, frozenset({"onnx"}), "onnx-qdq", "test")
    monkeypatch.setattr(reg, "_REGISTRY", specs)
    return specs


def test_chain_mismatch_fails_before_running(fake_passes):
    with pytest.raises(EdgekilnError, match="step 2 'to-c' takes onnx-qdq models, but receives 'onnx'"):
        check_chain("onnx", [Step("scale", ScaleConfig()), Step("to-c", ScaleConfig())], has_torch_source=False)


def test_unknown_pass_lists_known(fake_passes):
    with pytest.raises(EdgekilnError, match="unknown pass 'nope'; known passes: .*scale"):
        check_chain("onnx", [Step("nope", ScaleConfig())], has_torch_source=False)


def test_steps_run_in_order_record_provenance_and_leave_input_untouched(fake_passes, tmp_path):
    art = load_model(tiny_conv_onnx(tmp_path / "m.onnx"))
    before = art.path.read_bytes()
    out = run_pipeline(art, [Step("scale", ScaleConfig(factor=0.5)), Step("scale", ScaleConfig(factor=4.0))],
                       PassContext(work_dir=tmp_path / "w"))
    assert art.path.read_bytes() == before
    added = out.provenance[len(art.provenance):]   # the intake may record a conversion first
    assert [p["pass"] for p in added] == ["scale", "scale"]
    assert added[1]["config"] == {"version": 1, "factor": 4.0}
    w_in = numpy_helper.to_array(onnx.load(str(art.path)).graph.initializer[0])
    w_out = numpy_helper.to_array(onnx.load(str(out.path)).graph.initializer[0])
    np.testing.assert_allclose(w_out, w_in * 2.0, rtol=1e-6)


def test_strict_mode_catches_a_step_that_breaks_the_model(fake_passes, tmp_path):
    art = load_model(tiny_conv_onnx(tmp_path / "m.onnx"))
    with pytest.raises(EdgekilnError, match="does not run in onnxruntime|invalid ONNX model"):
        run_pipeline(art, [Step("broken", ScaleConfig())], PassContext(work_dir=tmp_path / "w"))


def test_a_pass_that_returns_another_kind_than_it_declares_is_caught(fake_passes, tmp_path):
    art = load_model(tiny_conv_onnx(tmp_path / "m.onnx"))
    with pytest.raises(EdgekilnError, match="step 1 'liar' produced a 'onnx' model, but its pass declares 'onnx-qdq'"):
        run_pipeline(art, [Step("liar", ScaleConfig())], PassContext(work_dir=tmp_path / "w"))


def test_config_round_trip_and_rejections():
    cfg = ScaleConfig(factor=2.0)
    assert ScaleConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(EdgekilnError, match="unknown option"):
        ScaleConfig.from_dict({"factor": 1.0, "bogus": 3})
    with pytest.raises(EdgekilnError, match="version 9 is newer"):
        ScaleConfig.from_dict({"version": 9})
