"""MCU int8 latency from measured instructions per MAC: the profile fields, the MAC split by kernel kind, the
estimate by hand, and the built-in Cortex-M profiles' figures."""

from __future__ import annotations

import textwrap

import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.targets.fit import estimate_fit
from edgekiln.targets.kernel_kinds import KERNEL_KINDS, macs_by_kernel_kind, mcu_instructions
from edgekiln.targets.profiles import load_profile

MEASURED = """
name: mcu-measured
description: test device with measured kernels
kind: mcu
flash_bytes: 1MB
ram_bytes: 256KB
clock_hz: 100000000
cores: 1
precisions: [int8, fp32]
peak_macs_per_s: {int8: 200000000, fp32: 100000000}
memory_bandwidth_bytes_per_s: 400000000
efficiency: 0.5
instructions_per_mac: {conv: 2.0, depthwise: 8.0, pointwise: 1.5, fc: 2.5, add: 100, model: 3.0}
cycles_per_instruction: 1.25
energy_pj_per_mac: {int8: 100}
source: test
"""


def _profile(tmp_path, body=MEASURED):
    path = tmp_path / "dev.yaml"
    path.write_text(textwrap.dedent(body))
    return load_profile(path)


def test_int8_latency_is_measured_instructions_times_cpi_over_clock(tmp_path):
    prof = _profile(tmp_path)
    split = {"conv": 400_000, "depthwise": 100_000, "pointwise": 300_000, "fc": 10_000, "add": 1_000}
    r = estimate_fit(prof, weight_bytes=1_000, peak_activation_bytes=1_000, io_bytes=0, macs=1_000_000,
                     precision="int8", macs_by_kind=split)
    # 400k*2 + 100k*8 + 300k*1.5 + 10k*2.5 + (1M - 810k)*3 (the rest at 'model') = 2,645,000 instructions,
    # + 1,000 added elements * 100 = 2,745,000; x 1.25 cycles / 100 MHz = 34.3125 ms (the efficiency
    # roofline would say 1M / (200M * 0.5) = 10 ms)
    assert r.metrics["latency_ms"].value == pytest.approx(34.3125), r.metrics["latency_ms"].value
    assert r.latency_source == "estimate from measured instructions"
    assert "2,745,000 instructions" in r.notes[-1] and "1.25 cycles per instruction (assumed)" in r.notes[-1]
    whole = estimate_fit(prof, weight_bytes=1_000, peak_activation_bytes=1_000, io_bytes=0, macs=1_000_000,
                         precision="int8")
    assert whole.metrics["latency_ms"].value == pytest.approx(1_000_000 * 3.0 * 1.25 / 1e5)  # 'model' figure: 37.5 ms
    fp32 = estimate_fit(prof, weight_bytes=1_000, peak_activation_bytes=1_000, io_bytes=0, macs=1_000_000,
                        precision="fp32")
    assert fp32.metrics["latency_ms"].value == pytest.approx(20.0) and fp32.latency_source == "estimate"


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.replace("fc: 2.5,", "attention: 2.5,"), "unknown kind(s) attention"),
    (lambda s: s.replace(", model: 3.0", ""), "needs 'model'"),
    (lambda s: s.replace("depthwise: 8.0", "depthwise: -1"), "'instructions_per_mac.depthwise' must be a positive"),
    (lambda s: s.replace("cycles_per_instruction: 1.25\n", ""), "needs 'cycles_per_instruction'"),
])
def test_bad_instruction_figures_name_the_field(tmp_path, edit, message):
    with pytest.raises(EdgekilnError, match="dev.yaml") as err:
        _profile(tmp_path, edit(MEASURED))
    assert message in str(err.value)


def test_ds_cnn_macs_split_by_kernel_kind():
    from edgekiln.codegen.testmodels_kws import KWS_INPUT_SHAPE, ds_cnn_kws_float
    from edgekiln.models.analysis import analyze

    model = ds_cnn_kws_float(seed=0)
    info = analyze(model, {"input": KWS_INPUT_SHAPE})
    split = macs_by_kernel_kind(model, info.layers)
    assert split == {"conv": 320_000, "depthwise": 4 * 72_000, "pointwise": 4 * 512_000, "fc": 768}, split
    assert sum(split.values()) == info.macs
    assert mcu_instructions({"model": 2.0}, info.macs, split) == 2.0 * info.macs


def test_qdq_weights_behind_dequantize_are_classified(tmp_path):
    from edgekiln.codegen.testmodels import mobilenet_style_qdq
    from edgekiln.models.analysis import analyze

    path = mobilenet_style_qdq(tmp_path / "mb.onnx")
    info = analyze(path)
    split = macs_by_kernel_kind(path, info.layers)
    # stem 3x3 s2 8x8x8x9; expand/project/branches 1x1; dw1 16ch 8x8 + dw2 8ch 4x4 (x9); FC 12 -> 10;
    # the residual Add of two 1x8x8x8 activations: 512 elements
    assert split == {"conv": 4_608, "pointwise": 8_192 + 8_192 + 1_024 + 512, "depthwise": 9_216 + 1_152,
                     "fc": 120, "add": 512}, split


@pytest.mark.parametrize("name", ["cortex-m4", "cortex-m7"])
def test_builtin_cortex_m_profiles_carry_measured_figures(name):
    prof = load_profile(name)
    assert set(KERNEL_KINDS) | {"model"} == set(prof.instructions_per_mac), prof.instructions_per_mac
    # per MAC: between SMLAD's 0.5 and the portable C's ~10; an added element: tens to a few hundred
    ipm = prof.instructions_per_mac
    assert all(0.5 <= v <= 12 for k, v in ipm.items() if k != "add") and 10 <= ipm["add"] <= 300, ipm
    assert prof.cycles_per_instruction is not None and 0.5 <= prof.cycles_per_instruction <= 2.0


@pytest.mark.parametrize("name,config", [("cortex-m4", "cortex-m4 -O2"), ("cortex-m7", "cortex-m7 -O2")])
def test_builtin_figures_are_the_benchmarks_measured_ones(name, config):
    """The profiles carry what `python -m benchmarks.suite --only mcu_kernels` measured last (checked-in JSON):
    re-running the case after a kernel change fails this test until the profiles are updated."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[3] / "bench" / "results" / "mcu_kernels.json"
    measured = json.loads(results.read_text())["profile_figures"][config]
    carried = load_profile(name).instructions_per_mac
    assert carried == pytest.approx(measured, abs=0.0015), f"{name}: profile {carried}, measured {measured} ({results})"
