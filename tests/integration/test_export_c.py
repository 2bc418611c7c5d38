"""`edgekiln export --to c` and `edgekiln verify-c` end to end on tiny seeded QDQ models."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from cli_run import run_cli as _run

from edgekiln.codegen import testmodels as tm

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="verify-c needs a host C compiler (gcc)")
SEED = 1




def _eval_npz(path, shape, n=64):
    np.savez(path, x=tm.random_inputs(shape, n, seed=SEED))
    return path


def test_export_and_verify_small_cnn(tmp_path, capsys):
    model = tm.small_cnn_qdq(tmp_path / "cnn_int8.onnx")
    out = tmp_path / "c"
    assert _run(["export", str(model), "--to", "c", "--out", str(out), "--prefix", "mnist"]) == 0
    for name in ("mnist.h", "mnist.c", "ek_kernels.c", "ek_kernels.h", "CMakeLists.txt", "main.c", "report.json",
                 "report.md", "memory.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    # fused conv->pool (default): the 28x28x8 conv1 map never exists; the peak is conv2_pool's step:
    # pool1 out (14*14*8) + pool2 out (7*7*16) + the fast kernel's scratch: 2 im2col rows of 72 int16
    # (3*3*8) and 16 int32 partial maxima = 2704 B
    assert report["fused"] is True
    assert report["arena_bytes"] == 14 * 14 * 8 + 7 * 7 * 16 + 2 * 72 * 2 + 16 * 4, report["arena_bytes"]
    assert report["memory_plan"]["scratch_bytes_max"] == 2 * 72 * 2 + 16 * 4, report["memory_plan"]
    assert report["flash"]["weights"] > 9000 and report["flash_bytes"] > report["flash"]["weights"]
    header = (out / "mnist.h").read_text()
    assert "int mnist_invoke(const int8_t *input, int8_t *output);" in header
    assert "#define MNIST_INPUT_ZERO_POINT" in header and "#define MNIST_OUTPUT_SIZE 10" in header
    assert "malloc" not in (out / "mnist.c").read_text() and "float" not in (out / "mnist.c").read_text()

    data = _eval_npz(tmp_path / "eval.npz", (1, 1, 28, 28))
    capsys.readouterr()
    assert _run(["verify-c", str(out), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text
    res = json.loads((out / "verify.json").read_text())
    assert res["top1_agree"] == res["n_inputs"] == 64
    assert res["identical_fraction"] >= 0.99 and res["max_abs_diff"] <= 1, res
    assert res["exact_vs_numpy_reference"] is True
    if shutil.which("valgrind"):
        assert res["valgrind"].startswith("clean"), res["valgrind"]
    if shutil.which("arm-none-eabi-gcc"):
        assert res["arm_sizes"][".rodata"] >= report["flash"]["weights"]
        assert res["arm_sizes"][".bss"] == report["arena_bytes"]
    else:
        assert res["arm_note"].startswith("skipped")


def test_no_fuse_keeps_the_unfused_kernels_and_passes_verify(tmp_path):
    model = tm.small_cnn_qdq(tmp_path / "cnn_int8.onnx")
    out = tmp_path / "c"
    assert _run(["export", str(model), "--to", "c", "--out", str(out), "--no-fuse"]) == 0
    report = json.loads((out / "report.json").read_text())
    unfused = 28 * 28 * 8 + 14 * 14 * 8  # conv1 out + pool1 out, live together
    assert report["fused"] is False and report["arena_bytes"] == unfused, report["arena_bytes"]
    assert "ek_conv_pool(" not in (out / "model.c").read_text()
    fused_arena = 2800  # measured in test_export_and_verify_small_cnn
    assert fused_arena < report["arena_bytes"], (f"fused arena {fused_arena} B must be strictly below the unfused "
                                                 f"{report['arena_bytes']} B")
    data = _eval_npz(tmp_path / "eval.npz", (1, 1, 28, 28), n=16)
    assert _run(["verify-c", str(out), "--data", str(data), "--no-valgrind"]) == 0
    assert json.loads((out / "verify.json").read_text())["passed"]


def test_export_and_verify_mobilenet_style(tmp_path):
    model = tm.mobilenet_style_qdq(tmp_path / "mb_int8.onnx")
    out = tmp_path / "c"
    assert _run(["export", str(model), "--to", "c", "--out", str(out)]) == 0
    data = _eval_npz(tmp_path / "eval.npz", (1, 1, 16, 16))
    assert _run(["verify-c", str(out), "--data", str(data), "--no-valgrind"]) == 0
    res = json.loads((out / "verify.json").read_text())
    assert res["passed"], res


def test_float_model_gets_a_one_line_hint(tmp_path, capsys):
    import onnx

    path = tmp_path / "float.onnx"
    onnx.save(tm.small_cnn_float(size=8), str(path))
    assert _run(["export", str(path), "--to", "c", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "edgekiln quantize --scheme int8" in err and len(err.strip().splitlines()) == 1


def test_unknown_target_and_bad_prefix_are_user_errors(tmp_path, capsys):
    model = tm.tiny_qdq_model(tmp_path / "t.onnx")
    assert _run(["export", str(model), "--to", "onnx2", "--out", str(tmp_path / "o")]) == 2
    assert "not a known target" in capsys.readouterr().err
    assert _run(["export", str(model), "--to", "c", "--out", str(tmp_path / "o"), "--prefix", "9bad"]) == 2
    assert "C identifier" in capsys.readouterr().err


def test_verify_c_fails_on_a_tampered_library(tmp_path, capsys):
    model = tm.tiny_qdq_model(tmp_path / "t.onnx")
    out = tmp_path / "c"
    assert _run(["export", str(model), "--to", "c", "--out", str(out), "--prefix", "tiny"]) == 0
    src = (out / "tiny.c").read_text()
    # break the first conv's bias (its first channel shifts by thousands of accumulator units)
    tampered = re.sub(r"(op0_bias\[\d+\] = \{\s*)(-?\d+)", lambda m: f"{m.group(1)}{int(m.group(2)) + 5000}", src,
                      count=1)
    assert tampered != src, "found no op0_bias array to tamper with"
    (out / "tiny.c").write_text(tampered)
    data = _eval_npz(tmp_path / "eval.npz", (1, 1, 8, 8), n=16)
    assert _run(["verify-c", str(out), "--data", str(data), "--no-valgrind"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_fits_uses_the_c_backend_arena_and_flash_for_mcu_targets(tmp_path, capsys):
    """`fits --target cortex-m4` on an int8 model reports exactly what `export --to c` writes."""
    model = tm.small_cnn_qdq(tmp_path / "cnn_int8.onnx")
    out = tmp_path / "c"
    assert _run(["export", str(model), "--to", "c", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    assert _run(["fits", str(model), "--target", "cortex-m4", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    from edgekiln.targets.profiles import load_profile

    overhead = load_profile("cortex-m4").runtime_overhead_bytes
    ram, flash = fit["ram"]["value"], fit["flash"]["value"]
    assert fit["ram_source"].startswith("C backend") and fit["flash_source"].startswith("C backend"), fit
    assert ram == report["ram_bytes"] + overhead, f"fits RAM {ram} != export arena+I/O {report['ram_bytes']} + " \
                                                  f"runtime overhead {overhead}"
    assert flash == report["flash_bytes"], f"fits flash {flash} != export flash {report['flash_bytes']}"
