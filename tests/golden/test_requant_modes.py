"""Golden: the two requantization modes of ``export --to c`` (float32-exact, fixed-point).

The fixed-point mode (:mod:`edgekiln.codegen.requant_fixed`) must be TFLite Micro's arithmetic bit for bit:

1. its primitives against independent formulas written here in Python integers (gemmlowp's
   SaturatingRoundingDoublingHighMul with the nudge and truncating division, RoundingDivideByPOT with
   the mask and threshold, QuantizeMultiplier with exact fractions), exact ties and int32 extremes;
2. the folded one-SMLAL form of ``ek_requant_fixed_pair`` (ek_kernels_dsp.h) against the two roundings;
3. the generated C (portable kernels, fast kernels on the host, Cortex-M4 under QEMU at -O2 and -Os)
   against the numpy reference, on accumulators chosen for the corner cases;
4. whole models (the small CNN, the DS-CNN KWS shape, the MobileNet-style model): the reference of the
   mode and TFLite Micro running ``export --to tflite``'s ``.tflite`` agree on every int8 output; ``verify_c``
   of a fixed-point library (host C == reference == TFLM); both modes on QEMU against their own references;
5. ops without a TFLM-identical kernel (a squeeze-excite Mul) are refused with the op named; the CLI flag
   and the report key.
"""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from edgekiln.codegen.emit import write_library
from edgekiln.codegen.export import export_c
from edgekiln.codegen.fuse import lower_for_c
from edgekiln.codegen.ir import IntGraph, Op, QTensor
from edgekiln.codegen.planner import plan_memory
from edgekiln.codegen.reference import run_graph
from edgekiln.codegen.requant_fixed import (
    FIXED_ATTR,
    apply_mode,
    mean_multiplier,
    requant_fixed,
    tflm_multiplier,
    tflm_requant_table,
)
from edgekiln.errors import EdgekilnError
from tests.c_host import host_run
from tests.mcu_tools import require_mcu_tools

SEED = 21


def _trunc_div(n: int, d: int) -> int:
    """C's integer division (toward zero)."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def _gemmlowp(acc: int, q: int, e: int) -> int:
    """TFLite's MultiplyByQuantizedMultiplier as gemmlowp writes it, in Python integers."""
    x = acc * (1 << max(e, 0))
    ab = x * q
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    hi = _trunc_div(ab + nudge, 1 << 31)
    right = max(-e, 0)
    mask = (1 << right) - 1
    rem = hi & mask
    threshold = (mask >> 1) + (1 if hi < 0 else 0)
    return (hi >> right) + (1 if rem > threshold else 0)


def _cases(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acc, q, e): random, exact ties of both roundings, int32 extremes, acc = -1 with q = 2^30."""
    n = 3000
    acc = rng.integers(-(1 << 31), 1 << 31, n, dtype=np.int64)
    acc[:1000] = rng.integers(-100000, 100000, 1000)
    q = rng.integers(1 << 30, 1 << 31, n, dtype=np.int64)
    e = rng.integers(-31, 1, n, dtype=np.int64)
    q[1000:1400] = 1 << 30                                  # 0.5: the doubling multiply rounds every odd acc
    r = rng.integers(1, 12, 400)
    acc[1000:1400] = (2 * rng.integers(-500, 500, 400) + 1) << r  # then x = odd * 2^(r-1): rounding-shift ties
    e[1000:1400] = -r
    acc[1400:1410] = [-(1 << 31), (1 << 31) - 1, -1, 1, 0, -1, -3, 3, -(1 << 31) + 1, 1 << 30]
    q[1400:1410] = [(1 << 31) - 1, (1 << 31) - 1, 1 << 30, 1 << 30, 1 << 30, 1 << 30, 1 << 30, 1 << 30, 1 << 30,
                    (1 << 31) - 1]
    e[1400:1410] = [0, 0, -1, -1, -5, 0, 0, -2, -31, -31]
    return acc, q, e


def test_requant_fixed_is_gemmlowp_two_roundings():
    acc, q, e = _cases(np.random.default_rng(SEED))
    got = requant_fixed(acc, q, e)
    want = np.array([_gemmlowp(int(a), int(m), int(s)) for a, m, s in zip(acc, q, e, strict=True)])
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (f"{bad.size}/{acc.size} differ from gemmlowp (threshold 0, seed {SEED}); first "
                           f"acc={acc[bad[:3]].tolist()} q={q[bad[:3]].tolist()} e={e[bad[:3]].tolist()}")
    assert requant_fixed(-3, 1 << 30, 0) == -1 and requant_fixed(-2, 1 << 30, -1) == -1, \
        "half up in the multiply (-1.5 -> -1), away from zero in the shift (-0.5 -> -1)"


def test_ek_requant_fixed_pair_fold_is_exact():
    """The derivation ek_requant_fixed_pair relies on: for a right shift r = s + 1 >= 1, one 64-bit sum and
    one shift give the two roundings (nested floor divisions compose)."""
    acc, q, e = _cases(np.random.default_rng(SEED + 1))
    keep = e <= -1
    acc, q, e = acc[keep], q[keep], e[keep]
    s = -e - 1
    folded = [(int(a) * int(m) + (1 << 30) + (1 << (31 + int(k))) - (1 << 31) * (a < 0)) >> (32 + int(k))
              for a, m, k in zip(acc, q, s, strict=True)]
    want = requant_fixed(acc, q, e)
    bad = np.flatnonzero(np.array(folded) != want)
    assert bad.size == 0, f"{bad.size}/{acc.size} folded results differ (threshold 0, seed {SEED})"


def test_tflm_multiplier_matches_exact_fractions():
    rng = np.random.default_rng(SEED)
    reals = np.concatenate([rng.uniform(1e-9, 0.999, 500), [0.5, 0.25, 0.75, 1 - 2.0 ** -40, 2.0 ** -31 * 0.7, 0.0],
                            (rng.integers(1, 1 << 20, 50) + 0.5) * 2.0 ** -21])
    q, e = tflm_multiplier(reals)
    for r, qi, ei in zip(reals, q, e, strict=True):
        if r == 0 or math.frexp(r)[1] < -31:
            assert (qi, ei) == (0, 0), f"{r!r} flushes to 0, got ({qi}, {ei})"
            continue
        frac, exp = math.frexp(r)
        want = Fraction(frac) * (1 << 31)
        wq = int(want) + (1 if want - int(want) >= Fraction(1, 2) else 0)   # half away from zero (want > 0)
        if wq == 1 << 31:
            wq, exp = wq // 2, exp + 1
        assert (int(qi), int(ei)) == (wq, exp), f"{r!r}: got ({qi}, {ei}), want ({wq}, {exp})"


def test_mean_multiplier_and_table_against_float_definitions():
    # TFLM's MEAN folds 1/count into the multiplier: within one LSB of count-times-smaller on this grid
    q, e = mean_multiplier(0.05, 0.02, 25)
    assert q * 2.0 ** (e - 31) == pytest.approx(0.05 / 0.02 / 25, rel=2e-7), (q, e)
    t = tflm_requant_table(0.05, 20, 0.04, -3).astype(int)
    real = np.arange(-128, 128) - 20
    ideal = np.float32(np.float32(0.05) * real.astype(np.float32)) / np.float32(0.04)
    assert np.abs(t - np.clip(np.round(ideal.astype(np.float64)) - 3, -128, 127)).max() <= 1
    assert t[20 + 128] == -3 and t[0] == -128 and t[255] == 127, "zero maps to the output zero point; saturates"


@pytest.mark.parametrize("qp", [(0.05, 20, 0.04, -3), (0.0123, -7, 0.031, 11)])
def test_requantize_table_matches_tflite_micro(qp, tmp_path):
    """A requantization onto another grid (the .tflite: DEQUANTIZE + QUANTIZE in float32) becomes one table in
    the fixed-point mode: TFLM's outputs for all 256 int8 values."""
    pytest.importorskip("tflite_micro", reason="TFLite Micro's Python interpreter (pip install tflite-micro)")
    from edgekiln.codegen.tflite.check import run_tflm_int8
    from edgekiln.codegen.tflite.writer import write_tflite
    from edgekiln.quant.fixed_point import quantize_multiplier

    sx, zx, sy, zy = qp
    t = {"x": QTensor("x", (1, 16, 16, 1), sx, zx), "y": QTensor("y", (1, 16, 16, 1), sy, zy)}
    m, sh = quantize_multiplier(sx / sy)
    op = Op("requantize", "rq", ["x"], "y", attrs={"size": 256, "input_zp": zx, "output_zp": zy, "mult": m,
                                                   "shift": sh, "act_min": -128, "act_max": 127})
    graph = IntGraph(t, [op], "x", "y", "x", (1, 1, 16, 16), (1, 1, 16, 16))
    xs = np.arange(-128, 128, dtype=np.int8).reshape(1, 1, 16, 16, 1)
    tflm = run_tflm_int8(write_tflite(graph, tmp_path / "rq.tflite"), [xs])[0].reshape(-1)
    got = run_graph(apply_mode(graph, "fixed-point"), xs[0]).reshape(-1)
    assert graph.ops[0].kind == "lut" and np.array_equal(got, tflm), _mismatch(f"requantize {qp}", got, tflm)


def _requant_graph() -> IntGraph:
    """Fully connected layers of one input with weight 1 in the fixed-point mode: output j requantizes
    bias[j] + (x - zp) with TFLM's (q[j], e[j]) chosen by _cases (ties, extremes, e = 0 and e = -1)."""
    acc, q, e = _cases(np.random.default_rng(SEED + 2))
    acc = np.clip(acc, -(1 << 31) + 200, (1 << 31) - 200)  # + (x - zp) stays within int32
    tensors = {"x": QTensor("x", (1, 1), 0.1, -3)}
    ops, outputs = [], []
    for layer, part in enumerate((slice(0, 1500), slice(1500, 3000))):
        n = len(acc[part])
        y = QTensor(f"y{layer}", (1, n), 0.1, 2)
        tensors[y.name] = y
        ops.append(Op("fully_connected", f"rq{layer}", ["x"], y.name,
                      attrs={"in_features": 1, "out_features": n, "input_zp": -3, "output_zp": 2, "act_min": -128,
                             "act_max": 127, FIXED_ATTR: 1},
                      arrays={"weights": np.ones((n, 1), np.int8), "bias": acc[part].astype(np.int32),
                              "mult": q[part].astype(np.int32), "shift": e[part].astype(np.int32)}))
        outputs.append(y.name)
    return IntGraph(tensors, ops, "x", outputs[0], "x", (1, 1), (1, 1500), extra_outputs=outputs[1:])


def _mismatch(what: str, got: np.ndarray, want: np.ndarray) -> str:
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    return f"{what}: {bad.size}/{want.size} int8 outputs differ (threshold 0, seed {SEED}); first {bad[:5].tolist()}"


def test_fixed_point_c_kernels_host_and_cortex_m4(tmp_path):
    graph = _requant_graph()
    q = np.array([[-3], [-2], [-4], [127], [-128]], np.int8)
    ref = np.stack([run_graph(graph, qi) for qi in q])
    assert not np.all(np.isin(ref, (-128, 127))), "the corner cases must not all saturate"
    for fast in (True, False):
        lib = tmp_path / f"host_{fast}"
        write_library(graph, plan_memory(graph, fast_kernels=fast), lib, "k")
        assert "#define EK_REQUANT_FIXED_POINT 1" in (lib / "ek_kernels.h").read_text()
        if shutil.which("gcc") is not None:
            got = host_run(lib, q)
            assert np.array_equal(got, ref), _mismatch(f"host, fast kernels {fast}", got, ref)
    require_mcu_tools()
    from edgekiln.codegen.mcu import run_on_qemu

    for opt in ("O2", "Os"):
        run = run_on_qemu(tmp_path / "host_True", q, cpu="cortex-m4", opt=opt, expected=ref)
        assert np.array_equal(run.outputs, ref), _mismatch(f"cortex-m4 -{opt}", run.outputs, ref)


def _seeded_npz(path: Path, shape: tuple[int, ...], n: int) -> Path:
    np.savez(path, x=np.random.default_rng(SEED).normal(0.0, 1.0, (n, *shape)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
    from edgekiln.codegen.testmodels import mobilenet_style_qdq, small_cnn_qdq
    from edgekiln.codegen.testmodels_kws import ds_cnn_kws_qdq

    d = tmp_path_factory.mktemp("anchors")
    return {"small_cnn": (small_cnn_qdq(d / "cnn.onnx"), _seeded_npz(d / "cnn.npz", (1, 28, 28), 12)),
            "ds_cnn_kws": (ds_cnn_kws_qdq(d / "kws.onnx"), _seeded_npz(d / "kws.npz", (1, 49, 10), 12)),
            "mobilenet_style": (mobilenet_style_qdq(d / "mbs.onnx"), _seeded_npz(d / "mbs.npz", (1, 16, 16), 12)),
            "mobilenet_softmax": (mobilenet_style_qdq(d / "mbs_sm.onnx", softmax=True), d / "mbs.npz")}


@pytest.mark.parametrize("name", ["small_cnn", "ds_cnn_kws", "mobilenet_style", "mobilenet_softmax"])
def test_fixed_point_reference_identical_to_tflite_micro(anchors, name, tmp_path):
    pytest.importorskip("tflite_micro", reason="TFLite Micro's Python interpreter (pip install tflite-micro)")
    from edgekiln.codegen.verify import quantize_inputs, tflm_int8_outputs

    model, data = anchors[name]
    graph = apply_mode(lower_for_c(model), "fixed-point")
    with np.load(data) as z:
        q = quantize_inputs(graph, z["x"]).reshape(len(z["x"]), -1)
    ref = np.stack([run_graph(graph, qi).reshape(-1) for qi in q])
    tflm = tflm_int8_outputs(model, {graph.onnx_input_name: (1, *graph.onnx_input_shape[1:])}, q)
    assert np.array_equal(ref, tflm), _mismatch(f"{name}, fixed-point reference vs TFLM", ref, tflm)
    exact = np.stack([run_graph(lower_for_c(model), qi).reshape(-1) for qi in q])
    assert name == "small_cnn" or not np.array_equal(exact, tflm), \
        f"{name}: float32-exact must differ from TFLM somewhere (else this test cannot fail)"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
def test_fixed_point_library_passes_verify_c(anchors, tmp_path):
    """verify-c of a fixed-point library: host C == the mode's reference == TFLite Micro, on the model with
    the most op kinds (conv, depthwise, Add, concat onto a new grid, windowed and global averages, FC)."""
    pytest.importorskip("tflite_micro", reason="TFLite Micro's Python interpreter (pip install tflite-micro)")
    from edgekiln.codegen.verify import verify_c

    model, data = anchors["mobilenet_style"]
    export_c(model, tmp_path / "c", prefix="m", requant="fixed-point")
    res = verify_c(tmp_path / "c", data, model=model, valgrind=False)
    assert res.runtime == "tflite-micro" and res.exact_vs_reference, res.to_dict()
    assert res.identical_fraction == 1.0 and res.max_abs_diff == 0, \
        f"{res.identical_fraction:.4%} identical to TFLM, max {res.max_abs_diff} LSB (threshold 100%, 0)"
    assert res.passed


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
def test_fused_conv_global_mean_on_host(anchors, tmp_path):
    """The fused conv -> global average kernel (ek_conv_pool, kept for whole-map rings with ``whole_map``)
    averages as TFLite Micro's MEAN in the fixed-point mode."""
    from edgekiln.codegen.fuse import fuse_conv_pool
    from edgekiln.codegen.ir import load_qdq
    from edgekiln.codegen.verify import quantize_inputs

    model, data = anchors["ds_cnn_kws"]
    graph = apply_mode(fuse_conv_pool(load_qdq(model), whole_map=True), "fixed-point")
    fused = [op for op in graph.ops if op.kind == "conv_pool"]
    assert fused and fused[0].attrs["pool_is_avg"] and fused[0].attrs["pool_" + FIXED_ATTR], [o.kind for o in graph.ops]
    with np.load(data) as z:
        q = quantize_inputs(graph, z["x"][:4]).reshape(4, -1)
    ref = np.stack([run_graph(graph, qi).reshape(-1) for qi in q])
    write_library(graph, plan_memory(graph), tmp_path / "lib", "k")
    got = host_run(tmp_path / "lib", q)
    assert np.array_equal(got, ref), _mismatch("fused conv + global mean, host", got, ref)


def test_both_modes_on_cortex_m4(anchors, tmp_path):
    require_mcu_tools()
    from edgekiln.codegen.mcu import run_on_qemu
    from edgekiln.codegen.verify import quantize_inputs

    outs = {}
    for name, mode in (("ds_cnn_kws", "float32-exact"), ("ds_cnn_kws", "fixed-point"), ("small_cnn", "fixed-point")):
        model, data = anchors[name]
        res = export_c(model, tmp_path / f"{name}-{mode}", prefix="m", requant=mode)
        graph = apply_mode(lower_for_c(model), mode)
        with np.load(data) as z:
            q = quantize_inputs(graph, z["x"][:3]).reshape(3, -1)
        ref = np.stack([run_graph(graph, qi).reshape(-1) for qi in q])
        run = run_on_qemu(res.out_dir, q, cpu="cortex-m4", opt="O2", expected=ref)
        assert np.array_equal(run.outputs, ref), _mismatch(f"{name} {mode}, cortex-m4 -O2", run.outputs, ref)
        outs[name, mode] = run.outputs
    assert not np.array_equal(outs["ds_cnn_kws", "float32-exact"], outs["ds_cnn_kws", "fixed-point"]), \
        "the modes must round differently somewhere on these inputs (else this test cannot tell them apart)"


def test_measure_mcu_checks_against_the_mode_reference(anchors, tmp_path):
    """measure-mcu takes the library's mode from its ek_kernels.h (no report.json here) and compares the
    device's outputs with that mode's reference."""
    require_mcu_tools()
    from edgekiln.codegen.mcu.measure import measure_mcu

    model, _ = anchors["mobilenet_style"]
    export_c(model, tmp_path / "c", prefix="m", requant="fixed-point")
    rep = measure_mcu(tmp_path / "c", model=model, limit=2)
    assert rep["requant"] == "fixed-point" and rep["outputs_match"], \
        (rep["requant"], rep["identical_fraction"], rep["mismatched_inferences"])


def test_unsupported_ops_refused_by_name(tmp_path):
    from edgekiln.codegen.testmodels import quantize_qdq, se_block_float

    model = quantize_qdq(se_block_float(), tmp_path / "se.onnx")   # the squeeze-excite scale: a Mul
    with pytest.raises(EdgekilnError, match=r"op mul \(node 'scale'\).*--requant float32-exact"):
        export_c(model, tmp_path / "c", requant="fixed-point")
    with pytest.raises(EdgekilnError, match="not a requantization mode"):
        export_c(model, tmp_path / "c", requant="fixed")
    # an op without inputs (a quantized constant, e.g. a class token) is the same in both modes
    t = {"c": QTensor("c", (1, 4), 0.1, 0)}
    const = Op("constant", "token", [], "c", attrs={"size": 4}, arrays={"values": np.arange(4, dtype=np.int8)})
    graph = apply_mode(IntGraph(t, [const], "c", "c", "x", (1, 4), (1, 4)), "fixed-point")
    assert graph.ops == [const] and FIXED_ATTR not in const.attrs


def test_cli_requant_flag_and_report(anchors, tmp_path, capsys):
    from tests.integration.cli_run import run_cli

    model, _ = anchors["small_cnn"]
    assert run_cli(["export", model, "--to", "c", "--out", tmp_path / "fx", "--requant", "fixed-point"]) == 0
    assert json.loads((tmp_path / "fx" / "report.json").read_text())["requant"] == "fixed-point"
    assert run_cli(["export", model, "--to", "c", "--out", tmp_path / "fe"]) == 0
    assert json.loads((tmp_path / "fe" / "report.json").read_text())["requant"] == "float32-exact"
    assert "#define EK_REQUANT_FIXED_POINT 0" in (tmp_path / "fe" / "ek_kernels.h").read_text()
    capsys.readouterr()
    assert run_cli(["export", model, "--to", "c", "--out", tmp_path / "x", "--requant", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--requant 'nope'" in err[0], err
