"""Device profiles load and validate; units parse; the roofline and budgets are exact."""

from __future__ import annotations

import json
import textwrap

import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.targets.fit import estimate_fit
from edgekiln.targets.profiles import list_profiles, load_profile
from edgekiln.targets.units import parse_bandwidth_bps, parse_bytes, parse_duration_ms


def test_builtin_profiles_load_with_sources():
    names = {p.name for p in list_profiles()}
    assert {"cortex-m4", "cortex-m7", "raspberry-pi-4", "jetson-nano", "coral-edgetpu", "host"} <= names
    for p in list_profiles():
        assert p.source, f"{p.name} has no source"
    assert load_profile("cortex-m4").ram_bytes == 128 * 1024


@pytest.mark.parametrize("text,expected", [("256KB", 262144), ("256KiB", 262144), ("1MB", 1048576), ("1.5M", 1572864),
                                           ("4096", 4096), (512, 512)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_time_and_bandwidth_and_errors():
    assert parse_duration_ms("50ms") == 50 and parse_duration_ms("1s") == 1000 and parse_duration_ms("250us") == 0.25
    assert parse_bandwidth_bps("10mbit") == 1e7 and parse_bandwidth_bps("1gbit") == 1e9
    with pytest.raises(EdgekilnError, match="'12 parsecs': unknown size unit 'parsecs'"):
        parse_bytes("12 parsecs")
    with pytest.raises(EdgekilnError, match="'fast' is not a bandwidth"):
        parse_bandwidth_bps("fast")


def _write(tmp_path, body):
    path = tmp_path / "dev.yaml"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
name: mydev
description: test device
kind: mcu
flash_bytes: 1MB
ram_bytes: 256KB
clock_hz: 100000000
cores: 1
precisions: [int8]
peak_macs_per_s: {int8: 100000000}
memory_bandwidth_bytes_per_s: 400000000
efficiency: 0.5
energy_pj_per_mac: {int8: 100}
energy_pj_per_byte: 10
source: test
"""


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.replace("kind: mcu\n", ""), "missing field 'kind'"),
    (lambda s: s.replace("cores: 1", "cores: -2"), "field 'cores' must be a positive number"),
    (lambda s: s.replace("clock_hz: 100000000", "clock_hz: fast"), "field 'clock_hz' must be a positive number"),
    (lambda s: s.replace("precisions: [int8]", "precisions: [int3]"), "field 'precisions' must list"),
    (lambda s: s + "colour: red\n", "unknown field(s) colour"),
])
def test_bad_profiles_name_file_and_field(tmp_path, edit, message):
    path = _write(tmp_path, edit(GOOD))
    with pytest.raises(EdgekilnError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_user_profile_dir_is_discovered(tmp_path, monkeypatch):
    _write(tmp_path, GOOD)
    monkeypatch.setenv("EDGEKILN_PROFILES_DIR", str(tmp_path))
    assert load_profile("mydev").ram_bytes == 262144
    with pytest.raises(EdgekilnError, match="unknown target 'nope'; known: .*mydev"):
        load_profile("nope")


def test_roofline_and_energy_by_hand(tmp_path):
    prof = load_profile(_write(tmp_path, GOOD))
    r = estimate_fit(prof, weight_bytes=200_000, peak_activation_bytes=50_000, io_bytes=1_000, macs=10_000_000,
                     precision="int8", max_latency_ms=150.0)
    # compute: 10e6 / (100e6 * 0.5) = 0.2 s = 200 ms; memory: (200000 + 2*50000) / 400e6 = 0.75 ms -> 200 ms
    assert r.metrics["latency_ms"].value == pytest.approx(200.0)
    # energy: (10e6 * 100 pJ + 300000 B * 10 pJ) = 1.003e9 pJ = 1.003 mJ
    assert r.metrics["energy_mj"].value == pytest.approx(1.003)
    # mcu: RAM = activations + io (weights stay in flash)
    assert r.metrics["ram"].value == 51_000 and r.metrics["flash"].value == 200_000
    assert not r.fits
    assert r.exceeded == ["latency: needs 200 ms, budget 150 ms, over by 50 ms (33%)"]


def test_exceeded_ram_says_by_how_much_and_linux_counts_weights_in_ram():
    r = estimate_fit(load_profile("cortex-m4"), weight_bytes=10_000, peak_activation_bytes=200_000, io_bytes=0,
                     macs=1, precision="int8")
    over = 200_000 + 8 * 1024 - 128 * 1024
    assert r.exceeded[0].startswith("RAM: needs ") and f"over by {over / 1024:.1f} KB" in r.exceeded[0]
    pi = estimate_fit(load_profile("raspberry-pi-4"), weight_bytes=10_000, peak_activation_bytes=5_000, io_bytes=0,
                      macs=1, precision="int8")
    assert pi.metrics["ram"].value == 10_000 + 5_000 + 64 * 1024 * 1024


def test_unsupported_precision_falls_back_and_says_so():
    r = estimate_fit(load_profile("coral-edgetpu"), weight_bytes=1, peak_activation_bytes=1, io_bytes=0, macs=1,
                     precision="fp32")
    assert r.precision == "int8" and "does not run fp32" in r.notes[0]
    assert estimate_fit(load_profile("raspberry-pi-4"), weight_bytes=1, peak_activation_bytes=1, io_bytes=0, macs=1,
                        precision="int8").metrics["energy_mj"].value is None  # unknown, not invented


def test_cli_targets_json_and_fits_exit_codes(tmp_path, capsys):
    from edgekiln.cli.app import main
    from edgekiln.testing.tiny import tiny_conv_onnx

    main(["targets", "--json"])
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"cortex-m4", "cortex-m7", "raspberry-pi-4", "jetson-nano", "coral-edgetpu", "host"} <= names
    model = tiny_conv_onnx(tmp_path / "m.onnx")
    main(["fits", str(model), "--target", "cortex-m4", "--json"])
    assert json.loads(capsys.readouterr().out)["fits"] is True
    with pytest.raises(SystemExit) as exc:
        main(["fits", str(model), "--target", "cortex-m4", "--max-ram", "1KB", "--json"])
    assert exc.value.code == 3
    assert "RAM: needs" in json.loads(capsys.readouterr().out)["exceeded"][0]
