"""Real models to C, as a user runs it: ``edgekiln quantize --scheme int8`` with its defaults (the speed
rule leaves PRelu/Sigmoid/Mul/... float: the C lowering takes those float islands), then ``export --to c``,
then ``verify-c`` on the entry's held-out inputs: the library compiles warning-free, is bit-exact with
the numpy reference and agrees with onnxruntime (identical top-1, >= 99% of int8 outputs identical,
none more than 1 LSB off; verify.py).

MTCNN P-Net and the DS-CNN run in ``make test``; the rest with ``EDGEKILN_CORPUS=all`` (the two-input
fusion net, whose default quantization has uint8 activations, included).

verify-c compares with onnxruntime run both ways it runs int8 QDQ on a CPU (verify.py ORT_MODES): on
x86 by default it runs most Convs of SqueezeNet-1.1 and MNASNet-0.5 as float Convs (97.8% and 70.9% of
their outputs identical to the C); with int8 kept, as on ARM, 100%.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")

from benchmarks.corpus_run import cli, shape_args  # noqa: E402
from edgekiln.testing.corpus import ensure  # noqa: E402

SMALL = ("mtcnn_pnet", "ds_cnn")
LARGE = ("mtcnn_rnet", "mtcnn_onet", "shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5", "fusion_two_input")


def _to_c_and_verify(name, tmp_path):
    m = ensure(name)
    code, _, err = cli(["quantize", str(m.path), "--scheme", "int8", "--calib", str(m.calib), *shape_args(m.entry),
                        "--bench-runs", "2", "--out", str(tmp_path / "int8")])
    assert code == 0, f"{name}: quantize exited {code}: {err.strip().splitlines()[-1:]}"
    code, _, err = cli(["export", str(tmp_path / "int8" / "model.onnx"), "--to", "c", "--out", str(tmp_path / "c"),
                        *shape_args(m.entry)])
    assert code == 0, f"{name}: export --to c exited {code}: {err.strip().splitlines()[-1:]}"
    held_out = dict(np.load(m.eval))
    # one input: array x; several: one array per input name
    np.savez(tmp_path / "x.npz", **(held_out if len(held_out) > 1 else {"x": next(iter(held_out.values()))}))
    code, _, err = cli(["verify-c", str(tmp_path / "c"), "--data", str(tmp_path / "x.npz"), "--no-valgrind"])
    res = json.loads((tmp_path / "c" / "verify.json").read_text())
    print(f"\n{name}: verify-c {'PASS' if res['passed'] else 'FAIL'}: top-1 {res['top1_agree']}/{res['n_inputs']}, "
          f"identical {res['identical_fraction']:.6f} (>= {res['thresholds']['identical_fraction']}), max diff "
          f"{res['max_abs_diff']} LSB (<= {res['thresholds']['max_abs_diff']}), C == reference "
          f"{res['exact_vs_numpy_reference']}")
    assert code == 0 and res["passed"], f"{name}: verify-c failed: {res}"


@pytest.mark.parametrize("name", SMALL)
def test_small_real_model_to_c(name, tmp_path):
    _to_c_and_verify(name, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EDGEKILN_CORPUS") != "all",
                    reason="larger corpus models: EDGEKILN_CORPUS=all")
@pytest.mark.parametrize("name", LARGE)
def test_large_real_model_to_c(name, tmp_path):
    _to_c_and_verify(name, tmp_path)
