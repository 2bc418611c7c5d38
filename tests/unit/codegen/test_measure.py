"""``mcu_report``: fused vs unfused arena, TFLM comparison, callgrind and ARM sizes on a tiny model."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from edgekiln.codegen import testmodels as tm
from edgekiln.codegen.fuse import lower_for_c
from edgekiln.codegen.planner import plan_memory
from edgekiln.codegen.reference import run_graph

SEED = 0


def test_fused_small_cnn_matches_unfused_reference_and_shrinks_the_arena(tmp_path):
    path = tm.small_cnn_qdq(tmp_path / "cnn.onnx", seed=SEED)
    unfused, fused = lower_for_c(path, fuse=False), lower_for_c(path)
    assert [op.kind for op in fused.ops] == ["conv_pool", "conv_pool", "reshape", "fully_connected"]
    rng = np.random.default_rng(SEED)
    for _ in range(8):
        x = rng.integers(-128, 128, unfused.tensors[unfused.input].shape).astype(np.int8)
        a, b = run_graph(unfused, x), run_graph(fused, x)
        assert np.array_equal(a, b), f"fused != unfused on {int((a != b).sum())} outputs (seed {SEED})"
    arena_u, arena_f = plan_memory(unfused).arena_bytes, plan_memory(fused).arena_bytes
    # measured: 7840 B unfused (conv1 out + pool1 out) -> 2704 B fused (pool1 out + pool2 out + conv2's scratch:
    # 2 im2col rows of 72 int16 and 16 int32 partial maxima)
    assert arena_f < arena_u, f"fused arena {arena_f} B is not below unfused {arena_u} B (seed {SEED})"
    assert arena_f == 2704, f"fused arena {arena_f} B, expected 2704 B (seed {SEED})"


@pytest.mark.slow
def test_mcu_report_on_tiny_model(tmp_path):
    from edgekiln.codegen.measure import MARKDOWN_HEADERS, markdown_row, mcu_report

    rep = mcu_report(tm.tiny_qdq_model(tmp_path / "tiny.onnx", seed=SEED), tmp_path / "work")
    assert rep["arena_bytes"] < rep["arena_bytes_unfused"], (rep["arena_bytes"], rep["arena_bytes_unfused"])
    assert rep["ram_bytes"] == rep["arena_bytes"] + rep["io_bytes"]
    assert rep["fits_ram"] is True and rep["profile"]["ram_bytes"] == 128 * 1024
    if importlib.util.find_spec("tflite_micro") is not None:
        tflm = rep["tflm"]
        assert tflm["smallest_running_bytes"] >= tflm["nonpersistent_bytes"] > 0, tflm
        assert rep["ratio_arena_vs_tflm_reported"] == round(rep["arena_bytes"] / tflm["reported_bytes"], 4)
    else:
        assert rep["tflm"]["skipped"].startswith("tflite-micro not installed")
    if shutil.which("valgrind") and shutil.which("gcc"):
        for k in ("fused", "unfused"):
            ipi = rep["callgrind"][k]["instructions_per_inference"]
            assert ipi > rep["macs"], f"{k}: {ipi} instructions per inference for {rep['macs']} MACs"
    else:
        assert "skipped" in rep["callgrind"]["fused"]
    if shutil.which("arm-none-eabi-gcc"):
        assert rep["arm_sizes"][".bss"] == rep["arena_bytes"], rep["arm_sizes"]
    else:
        assert "skipped" in rep["arm_sizes"]
    assert len(markdown_row("tiny", rep)) == len(MARKDOWN_HEADERS)
