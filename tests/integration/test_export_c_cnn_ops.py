"""`export --to c` + `verify-c` end to end on the issue-20 ops (BatchNormalization, lookup-table
activations, ceil_mode pooling, ReduceMean) and on a model with three graph outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cli_run import run_cli as _run

from edgekiln.codegen import testmodels as tm

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="verify-c needs a host C compiler (gcc)")
SEED = 1




@pytest.mark.parametrize("name", ["cnn_ops", "multi_head"])
def test_export_and_verify(tmp_path, capsys, name):
    if name == "cnn_ops":
        model = tm.quantize_qdq(tm.cnn_ops_float(avg_pool=False), tmp_path / "m.onnx", extra_ops=tm.CNN_OPS_EXTRA)
        shape = (1, 3, 11, 11)
    else:
        model = tm.quantize_qdq(tm.multi_head_float(), tmp_path / "m.onnx")
        shape = (1, 3, 12, 12)
    out = tmp_path / "c"
    assert _run(["export", str(model), "--to", "c", "--out", str(out), "--prefix", "net"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "float" not in (out / "net.c").read_text() and "malloc" not in (out / "net.c").read_text()
    np.savez(tmp_path / "eval.npz", x=tm.random_inputs(shape, 32, seed=SEED))
    capsys.readouterr()
    assert _run(["verify-c", str(out), "--data", str(tmp_path / "eval.npz"), "--no-valgrind"]) == 0, \
        capsys.readouterr().out
    res = json.loads((out / "verify.json").read_text())
    assert res["exact_vs_numpy_reference"] is True
    assert res["identical_fraction"] >= 0.99 and res["max_abs_diff"] <= 1, res
    if name == "multi_head":
        assert [o["offset"] for o in report["outputs"]] == [0, 72, 216] and report["io_bytes"] == 3 * 144 + 219
