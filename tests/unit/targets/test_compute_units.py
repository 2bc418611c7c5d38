"""Compute units in device profiles: YAML validation, the implicit cpu unit, sources, the targets listing."""

from __future__ import annotations

import json
import textwrap

import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.targets.compute_units import ComputeUnit, profile_units
from edgekiln.targets.profiles import list_profiles, load_profile

BASE = """
name: soc
description: test SoC
kind: linux
flash_bytes: 1GB
ram_bytes: 1GB
clock_hz: 1000000000
cores: 4
precisions: [int8, fp32]
peak_macs_per_s: {int8: 10000000000, fp32: 5000000000}
memory_bandwidth_bytes_per_s: 10000000000
efficiency: 0.3
source: test
units:
  - name: cpu
    type: cpu
    precisions: [int8, fp32]
    peak_macs_per_s: {int8: 10000000000, fp32: 5000000000}
    efficiency: 0.3
    memory_bandwidth_bytes_per_s: 10000000000
    source: test cpu
  - name: npu
    type: npu
    precisions: [int8]
    peak_macs_per_s: {int8: 1000000000000}
    efficiency: 0.3
    memory_bandwidth_bytes_per_s: 10000000000
    ops: edgetpu
    limits: {max_nonunit_dims: 3, reduce_axes: spatial}
    link: {bandwidth_bytes_per_s: 500000000, latency_us: 100}
    max_segments: 1
    source: test npu
"""


def _load(tmp_path, text):
    path = tmp_path / "soc.yaml"
    path.write_text(textwrap.dedent(text))
    return load_profile(path), path


def test_units_parse_with_op_set_limits_and_link(tmp_path):
    prof, _ = _load(tmp_path, BASE)
    cpu, npu = profile_units(prof)
    assert (cpu.name, cpu.type, cpu.ops, cpu.link) == ("cpu", "cpu", None, None)
    assert npu.ops is not None and "Conv" in npu.ops and "Erf" not in npu.ops and npu.ops_name == "the Edge TPU op list"
    assert npu.limits.max_nonunit_dims == 3 and npu.limits.reduce_axes == "spatial"
    assert npu.link is not None and npu.link.bandwidth_bytes_per_s == 5e8 and npu.link.latency_us == 100
    assert npu.max_segments == 1 and npu.peak_macs_per_s == {"int8": 1e12}


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.replace("    max_segments: 1\n", "    max_segments: 1\n    colour: red\n"),
     "unit 'npu': unknown field(s) colour"),
    (lambda s: s.replace("precisions: [int8]\n    peak_macs_per_s: {int8: 1000000000000}",
                         "precisions: [int8, fp16]\n    peak_macs_per_s: {int8: 1000000000000}"),
     "unit 'npu': field 'peak_macs_per_s' has no value for precision(s) fp16"),
    (lambda s: s.replace("link: {bandwidth_bytes_per_s: 500000000, latency_us: 100}", "link: {latency_us: 100}"),
     "unit 'npu': field 'link' needs 'bandwidth_bytes_per_s'"),
    (lambda s: s.replace("ops: edgetpu", "ops: hexagon"), "unit 'npu': field 'ops': unknown op set 'hexagon'"),
    (lambda s: s.replace("type: npu", "type: fpga"), "unit 'npu': field 'type' must be one of cpu, gpu, npu, dsp"),
    (lambda s: s.replace("reduce_axes: spatial", "reduce_axes: channels"),
     "field 'limits.reduce_axes' must be 'spatial'"),
    (lambda s: s.replace("max_segments: 1", "max_segments: 0"), "field 'max_segments' must be a positive integer"),
    (lambda s: s.replace("    source: test npu\n", ""), "unit 'npu': missing field 'source'"),
    (lambda s: s.replace("  - name: npu", "  - name: cpu"), "duplicate unit name(s) cpu"),
])
def test_bad_units_name_file_unit_and_field(tmp_path, edit, message):
    with pytest.raises(EdgekilnError) as err:
        _load(tmp_path, edit(BASE))
    assert message in str(err.value) and "soc.yaml" in str(err.value), str(err.value)


def test_profiles_without_units_get_one_implicit_cpu_unit():
    for name in ("raspberry-pi-4", "cortex-m4", "cortex-m7"):
        prof = load_profile(name)
        assert prof.units == ()
        (unit,) = profile_units(prof)
        assert (unit.name, unit.type, unit.ops, unit.link, unit.max_segments) == ("cpu", "cpu", None, None, None)
        assert unit.precisions == prof.precisions and dict(unit.peak_macs_per_s) == prof.peak_macs_per_s
        assert unit.efficiency == prof.efficiency
        assert unit.memory_bandwidth_bytes_per_s == prof.memory_bandwidth_bytes_per_s
        assert dict(unit.energy_pj_per_mac) == prof.energy_pj_per_mac


def test_builtin_units_have_sources_and_expected_shape():
    units = {p.name: profile_units(p) for p in list_profiles()}
    for prof, us in units.items():
        for u in us:
            assert isinstance(u, ComputeUnit) and u.source.strip(), f"{prof}/{u.name} has no source"
            assert all(p in u.peak_macs_per_s for p in u.precisions), f"{prof}/{u.name}"
    assert [u.name for u in units["coral-edgetpu"]] == ["tpu", "cpu"]
    tpu = units["coral-edgetpu"][0]
    assert tpu.max_segments == 1 and tpu.precisions == ("int8",) and tpu.link is not None
    assert tpu.ops is not None and "DequantizeLinear" not in tpu.ops and "QuantizeLinear" in tpu.ops
    assert [u.name for u in units["rk3588"]] == ["cpu", "gpu", "npu"]
    npu = units["rk3588"][2]
    assert npu.ops is not None and {"HardSwish", "HardSigmoid"} <= npu.ops and not {"Erf", "TopK",
                                                                                     "LayerNormalization"} & npu.ops
    assert [u.name for u in units["jetson-nano"]] == ["gpu", "cpu"]
    host = units["host"]
    assert [(u.name, u.runtime, u.link) for u in host] == [
        ("cpu-onnxruntime", "onnxruntime", None), ("cpu-openvino", "openvino", None), ("cpu-litert", "litert", None)]


def test_targets_json_lists_units(capsys):
    from edgekiln.cli.targets_cmd import targets_command

    targets_command(as_json=True)
    data = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    tpu = data["coral-edgetpu"]["units"][0]
    assert tpu["name"] == "tpu" and "Conv" in tpu["ops"] and tpu["link"]["bandwidth_bytes_per_s"] == 5e8
    assert data["raspberry-pi-4"]["units"] == []
