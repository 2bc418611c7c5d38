"""`edgekiln measure-mcu` and `run_on_qemu`: a tiny seeded QDQ model exported to C, cross-compiled with
arm-none-eabi-gcc and run under qemu-system-arm (mps2-an386 / mps2-an500) with edgekiln's
instruction-counting plugin.

The tools come from Debian packages (scripts/system-deps.sh); where they are missing the module runs
that script when it can (root and apt-get) and skips only when it cannot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli as _run

from edgekiln.codegen import testmodels as tm
from edgekiln.codegen.mcu import run_on_qemu
from edgekiln.codegen.mcu.harness import instrument_steps
from tests.mcu_tools import require_mcu_tools

SEED = 3


@pytest.fixture(scope="module")
def tools():
    require_mcu_tools()


@pytest.fixture(scope="module")
def tiny_lib(tmp_path_factory):
    """The golden-snapshot model (two fused conv->pool steps, a view, a fully connected step) as a C export."""
    tmp = tmp_path_factory.mktemp("mcu")
    model = tm.tiny_qdq_model(tmp / "tiny_int8.onnx", seed=SEED)
    assert _run(["export", str(model), "--to", "c", "--out", str(tmp / "c"), "--prefix", "tiny"]) == 0
    np.savez(tmp / "eval.npz", x=tm.random_inputs((1, 1, 8, 8), 4, seed=SEED))
    return tmp


def _reference(lib: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from edgekiln.codegen.fuse import lower_for_c
    from edgekiln.codegen.reference import run_graph
    from edgekiln.codegen.verify import quantize_inputs

    graph = lower_for_c(lib / "c" / "model.onnx")
    q = quantize_inputs(graph, x).reshape(len(x), -1)
    return q, np.stack([run_graph(graph, qi).reshape(-1) for qi in q])


def test_measure_mcu_cli_end_to_end(tools, tiny_lib, monkeypatch):
    # NOTE: relative paths, as users type them (QEMU runs in the build folder: a relative ELF path failed)
    monkeypatch.chdir(tiny_lib)
    out = tiny_lib / "m4"
    code = _run(["measure-mcu", "c", "--cpu", "cortex-m4", "--opt", "O2", "--data", "eval.npz", "--limit", "4",
                 "--out", "m4"])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"] == "measure-mcu" and (out / "report.md").is_file() and (out / "build" / "run" / "prog.elf").is_file()
    assert rep["outputs_match"] and rep["identical_fraction"] == 1.0 and rep["inputs"]["n"] == 4, rep["inputs"]
    total = rep["instructions_per_inference"]
    kinds = [r["kind"] for r in rep["layers"]]
    assert kinds == ["conv_pool", "conv_pool", "reshape", "fully_connected"], kinds
    for r in rep["layers"]:
        assert (r["instructions"] == 0) == (r["kind"] == "reshape"), r
    # the per-step build adds one marker call (bl + bx lr, and at most as many moves) per marked step
    marked = sum(r["instructions"] > 0 for r in rep["layers"])
    assert 0 <= rep["harness_overhead"] <= 4 * marked, \
        f"layers sum {rep['layers_total']} + return vs total {total}: overhead {rep['harness_overhead']}, max {4 * marked}"
    assert rep["layers_total"] <= total + 4 * marked
    # the library as linked: its bss is the static arena; the stack of one inference is small but not 0
    assert rep["sizes"]["bss"] >= rep["arena_bytes"] > 0, rep["sizes"]
    assert rep["sizes"]["text"] > rep["objects"]["tiny.o"]["rodata"] > 0, rep["objects"]
    assert 0 < rep["stack_bytes"] < 4096, rep["stack_bytes"]


def test_counts_are_deterministic_and_outputs_checked_on_the_device(tools, tiny_lib):
    x = tm.random_inputs((1, 1, 8, 8), 3, seed=SEED + 1)
    q, ref = _reference(tiny_lib, x)
    first = run_on_qemu(tiny_lib / "c", q, cpu="cortex-m4", opt="Os", expected=ref, per_layer=True)
    again = run_on_qemu(tiny_lib / "c", q, cpu="cortex-m4", opt="Os", expected=ref, per_layer=True)
    assert first.instructions == again.instructions and first.per_step == again.per_step, \
        f"run 1 {first.instructions} {first.per_step}, run 2 {again.instructions} {again.per_step}"
    assert np.array_equal(first.outputs, ref) and first.mismatched == 0
    # one wrong expected byte in inference 1: the device reports exactly that inference
    bad = ref.copy()
    bad[1, 0] = np.int8(int(bad[1, 0]) ^ 1)
    m7 = run_on_qemu(tiny_lib / "c", q, cpu="cortex-m7", opt="O2", expected=bad)
    assert m7.mismatched == 1 and np.array_equal(m7.outputs, ref), (m7.mismatched, m7.outputs, ref)
    assert m7.board == "mps2-an500" and "-mcpu=cortex-m7" in m7.cflags and len(m7.instructions) == 3


def test_missing_toolchain_is_a_one_line_error(tiny_lib, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler, no QEMU
    code = _run(["measure-mcu", str(tiny_lib / "c"), "--cpu", "cortex-m4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    assert "qemu-system-arm" in err and "apt-get install" in err and "gcc-arm-none-eabi" in err, err


def test_bad_cpu_is_a_one_line_error(tools, tiny_lib, capsys):
    code = _run(["measure-mcu", str(tiny_lib / "c"), "--cpu", "cortex-m0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cortex-m4" in err and len(err.splitlines()) == 1, (code, err)


def test_every_step_with_code_gets_one_marker():
    src = ("#include \"m.h\"\nint m_invoke(const int8_t *input, int8_t *output) {\n"
           "    int8_t *const arena = m_arena.bytes;\n    ek_a(&op0_params, input, arena);\n"
           "    /* step 1: flat: reshape is a view (no code) */\n"
           "    {\n        const int8_t *const ins[2] = { arena, input };\n        ek_concat(&op2_params, ins, output);\n    }\n"
           "    { int32_t k; for (k = 0; k < 4; ++k) { (output)[k] = op3_values[k]; } } /* step 3: constant */\n"
           "    return 0;\n}\n")
    text, steps = instrument_steps(src, "m")
    assert steps == [0, 2, 3], steps
    assert text.count("ek_mcu_mark();") == 3 and "void ek_mcu_mark(void);" in text, text
    body = text[text.index("{\n"):]
    assert body.index("ek_a(") < body.index("ek_mcu_mark()") < body.index("ek_concat(")
