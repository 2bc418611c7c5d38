"""`edgekiln optimize` on the command line: the summary a user reads in an 80-column terminal."""

from __future__ import annotations

import os
import subprocess
import sys

from edgekiln.testing.tiny import random_npz, tiny_conv_onnx


def test_summary_names_the_selected_pipeline_in_full_at_80_columns(tmp_path):
    model = tiny_conv_onnx(tmp_path / "m.onnx")
    random_npz(tmp_path / "calib.npz", (1, 1, 8, 8), n=16, seed=1)
    random_npz(tmp_path / "eval.npz", (1, 1, 8, 8), n=16, seed=2)
    out = tmp_path / "opt"
    proc = subprocess.run(
        [sys.executable, "-m", "edgekiln.cli", "optimize", str(model), "--calib", str(tmp_path / "calib.npz"),
         "--eval", str(tmp_path / "eval.npz"), "--target", "cortex-m7", "--max-drop", "1.0", "--trials", "2",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    pipeline = next((line for line in lines if line.startswith("│ pipeline")), None)
    assert pipeline is not None, proc.stdout
    assert "quantize(" in pipeline and "…" not in pipeline, pipeline
    assert "report:" in proc.stdout
    # progress: one line per finished trial, printed as it finishes (also when stdout is not a terminal)
    trial_lines = [line for line in lines if line.startswith("trial #")]
    assert len(trial_lines) == 2 and any("quantize(" in line for line in trial_lines), proc.stdout
