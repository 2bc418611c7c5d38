"""`edgekiln inspect` end to end on tiny ONNX files (in-process, through the real entry point)."""

from __future__ import annotations

import json

import pytest
from cli_run import run_cli as _run

from edgekiln.testing.tiny import tiny_conv_onnx


def test_json_is_pure_and_has_the_keys(tmp_path, capsys):
    path = tiny_conv_onnx(tmp_path / "m.onnx")
    assert _run(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    for key in ("params", "macs", "model_bytes", "weight_bytes", "io_bytes", "peak_activation_bytes", "peak_step",
                "layers", "op_counts", "unsupported"):
        assert key in data, key
    # conv 4*6*6*1*3*3 = 1296 + gemm 144*10 = 1440
    assert (data["macs"], data["params"]) == (2736, 1490)


def test_input_shape_and_run_folder(tmp_path, capsys):
    path = tiny_conv_onnx(tmp_path / "m.onnx")
    out = tmp_path / "run"
    assert _run(["inspect", str(path), "--input-shape", "2,1,8,8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "conv1" in text and "peak activations" in text
    report = json.loads((out / "report.json").read_text())
    # batch 2 doubles the MACs: 2 * 2736
    assert report["command"] == "inspect" and report["macs"] == 5472
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Compatibility" in (out / "report.md").read_text()


@pytest.mark.parametrize("name", ["missing.onnx"])
def test_missing_file_exits_2_with_one_line(tmp_path, capsys, name):
    code = _run(["inspect", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert name in err and len(err.strip().splitlines()) == 1, err
