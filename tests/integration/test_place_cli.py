"""`edgekiln place` (bullet 3 of issue 24), in process: the segment table, the fallback line, the
files of the run folder, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from test_place_outputs import mobilenet_with_erf

from edgekiln.codegen.testmodels import mobilenet_style_qdq

NPU_NONE = """\
name: npu-none
description: a board whose NPU runs no op (test)
kind: linux
flash_bytes: 32GB
ram_bytes: 1GB
clock_hz: 1500000000
cores: 4
precisions: [int8, fp32]
peak_macs_per_s: {int8: 48000000000, fp32: 24000000000}
memory_bandwidth_bytes_per_s: 4000000000
efficiency: 0.3
runtime_overhead_bytes: 0
energy_pj_per_mac: {}
energy_pj_per_byte: null
source: test profile
units:
  - {name: cpu, type: cpu, precisions: [int8, fp32], peak_macs_per_s: {int8: 48000000000, fp32: 24000000000},
     efficiency: 0.3, memory_bandwidth_bytes_per_s: 4000000000, source: test}
  - {name: npu, type: npu, precisions: [int8], peak_macs_per_s: {int8: 3000000000000}, efficiency: 0.3,
     memory_bandwidth_bytes_per_s: 4000000000, ops: [], source: test,
     link: {bandwidth_bytes_per_s: 1000000000, latency_us: 50}}
"""


@pytest.fixture(scope="module")
def qdq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mobilenet_style_qdq(tmp_path_factory.mktemp("place") / "m.onnx")


@pytest.fixture(scope="module")
def erf224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 224x224 MobileNet-style model with an Erf after its global pool, saved once for the module."""
    model = tmp_path_factory.mktemp("erf") / "erf.onnx"
    onnx.save(mobilenet_with_erf(224, after="gap"), str(model))
    return model


def segment_rows(text: str) -> list[list[str]]:
    """The rows of the printed segment table, split into columns."""
    return [line.split() for line in text.splitlines() if line[:3].strip().isdigit()]


def tensor_elements(model_path: Path, names: list[str]) -> dict[str, int]:
    """Element count of each named tensor, from ONNX shape inference."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    infos = {v.name: v.type.tensor_type for v in (*m.graph.value_info, *m.graph.input, *m.graph.output)}
    return {n: int(np.prod([d.dim_value for d in infos[n].shape.dim])) for n in names}


def test_coral_places_tpu_then_cpu(erf224: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 224x224 MobileNet-style model with an Erf (not in the Edge TPU op list) after its global pool,
    estimated as int8: a tpu row, then a cpu row; the tpu hands over exactly the cut tensor at int8."""
    model = erf224
    run = tmp_path / "run"
    assert run_cli(["place", model, "--target", "coral-edgetpu", "--precision", "int8", "--out", run]) == 0
    text = capsys.readouterr().out
    rows = segment_rows(text)
    assert [r[1] for r in rows] == ["tpu", "cpu"], f"segment rows {rows} in:\n{text}"
    assert "fallback: tpu: Erf not in the Edge TPU op list" in text, text
    record = json.loads((run / "placement.json").read_text())
    tpu, cpu = record["segments"]
    elements = tensor_elements(model, tpu["outputs"])
    assert tpu["transfer_out_bytes"] == sum(elements.values()), (
        f"tpu -> cpu transfer {tpu['transfer_out_bytes']} B; the cut tensors at 1 byte (int8): {elements}")
    assert int(rows[0][6]) == tpu["transfer_out_bytes"], f"printed out bytes {rows[0]} vs placement.json {tpu}"
    assert cpu["inputs"] == tpu["outputs"], f"cpu reads {cpu['inputs']}, tpu writes {tpu['outputs']}"
    for s in record["segments"]:
        assert (run / s["file"]).is_file(), f"{s['file']} missing"
    assert (run / "report.json").is_file() and (run / "report.md").is_file()
    assert "simulated from the profile" in (run / "report.md").read_text()


def test_npu_without_ops_falls_back_to_cpu(qdq: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = tmp_path / "npu-none.yaml"
    prof.write_text(NPU_NONE)
    assert run_cli(["place", qdq, "--target", prof]) == 0
    text = capsys.readouterr().out
    rows = segment_rows(text)
    assert [r[1] for r in rows] == ["cpu"], f"segment rows {rows} in:\n{text}"
    assert "fallback: npu: supports no op" in text, text
    assert "gain 0.0%" in text, text


@pytest.mark.parametrize(("argv", "message"), [
    (["--target", "raspberry-pi-4", "--objective", "energy"], "unknown energy"),
    (["--target", "raspberry-pi-4", "--objective", "speed"], "--objective 'speed'"),
    (["--target", "raspberry-pi-4", "--precision", "int3"], "--precision 'int3'"),
    (["--target", "no-such-board"], "no-such-board"),
])
def test_user_errors_are_one_line_exit_2(qdq: Path, argv: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["place", qdq, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code} for {argv}; stderr: {err}"
    assert message in err and len(err.splitlines()) == 1, f"stderr for {argv}: {err!r}"


def test_fits_on_a_multi_unit_profile_uses_the_placement(erf224: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`edgekiln fits` on coral-edgetpu: latency is the placement's (tpu then cpu), not the whole-model roofline."""
    model = erf224
    assert run_cli(["place", model, "--target", "coral-edgetpu", "--precision", "int8", "--json"]) == 0
    placed = json.loads(capsys.readouterr().out)
    assert run_cli(["fits", model, "--target", "coral-edgetpu", "--precision", "int8", "--json"]) in (0, 3)
    fit = json.loads(capsys.readouterr().out)
    assert fit["latency_source"].startswith("placement estimate (2 segments; fallback: Erf not in the Edge TPU"), fit
    assert fit["latency_ms"]["value"] == pytest.approx(placed["estimated_ms"], rel=1e-5), (
        f"fits latency {fit['latency_ms']['value']} ms vs place estimate {placed['estimated_ms']} ms")


def test_optimize_trials_take_the_placement_latency(erf224: Path) -> None:
    """`optimize`'s per-candidate fit (search.trial._fit) on coral-edgetpu uses the placement's latency,
    and the search's precisions are the union of the units' (the Edge TPU's int8 + its host CPU's)."""
    from edgekiln.models.analysis import analyze
    from edgekiln.search.optimize import unit_precisions
    from edgekiln.search.trial import Candidate, _fit
    from edgekiln.targets.profiles import load_profile

    model = erf224
    shapes = {"input": (1, 1, 224, 224)}
    info = analyze(model, shapes)
    profile = load_profile("coral-edgetpu")
    kwargs = dict(weight_bytes=info.weight_bytes, code_bytes=0, peak_activation_bytes=info.peak_activation_bytes,
                  io_bytes=info.io_bytes, macs=info.macs, precision="int8", macs_by_kind=None)
    cand = Candidate(number=0, label="int8", steps=[])
    fit = _fit(cand, profile, kwargs, {}, placed=(model, shapes))
    assert fit.latency_source.startswith("placement estimate (2 segments"), fit.latency_source
    roofline = _fit(Candidate(number=1, label="int8", steps=[]), profile, kwargs, {})
    assert cand.latency_ms_target_est == fit.metrics["latency_ms"].value != roofline.metrics["latency_ms"].value, (
        f"candidate {cand.latency_ms_target_est} ms, placement {fit.metrics['latency_ms'].value} ms, "
        f"roofline {roofline.metrics['latency_ms'].value} ms")
    assert unit_precisions(profile) == ("int8", "fp16", "fp32"), unit_precisions(profile)
