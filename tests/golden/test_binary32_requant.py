"""Golden: conv/FC requantization emulates float32 exactly, in numpy and in C.

The independent formula is numpy's own IEEE float32 arithmetic, ``rint(float32(float32(acc) * s))``
(what onnxruntime's QLinearConv computes), over accumulators that include exact .5 ties,
values beyond 2**24 (where ``float(acc)`` itself rounds), saturation to int32 and awkward scales.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from edgekiln.codegen.binary32 import binary32_multiplier, onnx_qlinear_scale, requant_binary32
from edgekiln.codegen.emit import kernel_source

SEED = 0
F = np.float32


def _float32_formula(acc: np.ndarray, scale: np.float32) -> np.ndarray:
    y = np.rint((acc.astype(F) * F(scale)).astype(F)).astype(np.float64)
    return np.clip(y, -(2**31 - 1), 2**31 - 1).astype(np.int64)


def _cases() -> list[tuple[np.ndarray, np.float32]]:
    rng = np.random.default_rng(SEED)
    cases = []
    for k in (1, 2, 3, 7):  # s = 2**-k: every odd multiple of 2**(k-1) is an exact .5 tie
        cases.append((np.arange(-600, 600, dtype=np.int64), F(2.0**-k)))
    for _ in range(40):
        scale = F(rng.uniform(0.5, 1.0) * 2.0 ** int(rng.integers(-28, 4)))
        acc = np.concatenate([rng.integers(-4000, 4000, 2000), rng.integers(-(2**26), 2**26, 500),
                              rng.integers(-(2**31), 2**31, 500), [2**31 - 1, -(2**31), 2**24 + 1, -(2**24 + 3), 0]])
        cases.append((acc.astype(np.int64), scale))
    cases.append((np.array([2**31 - 1, -(2**31), 12345]), F(1000.0)))  # saturates to +-(2**31 - 1)
    cases.append((np.array([5, -5, 2**31 - 1]), F(0.0)))  # a zero scale gives 0
    return cases


def test_numpy_emulation_matches_float32_arithmetic():
    bad = total = 0
    for acc, scale in _cases():
        mant, rshift = binary32_multiplier(scale)
        got = requant_binary32(acc, mant, rshift)
        want = _float32_formula(acc, scale)
        bad += int((got != want).sum())
        total += acc.size
    assert bad == 0, f"{bad}/{total} requantized values differ from float32 arithmetic (threshold 0, seed {SEED})"


def test_ties_round_to_even_both_signs():
    mant, rshift = binary32_multiplier(F(0.5))
    got = requant_binary32(np.array([1, 3, 5, -1, -3, -5]), mant, rshift).tolist()
    assert got == [0, 2, 2, 0, -2, -2], f"0.5, 1.5, 2.5 and negatives must round half to even, got {got}"


def test_multiplier_is_the_exact_float32_scale():
    s = onnx_qlinear_scale(0.0213, np.array([0.0031, 0.00071, 0.5], np.float32), 0.047)
    mant, rshift = binary32_multiplier(s)
    back = mant.astype(np.float64) * np.exp2(-rshift.astype(np.float64))
    assert np.array_equal(back, s.astype(np.float64)), f"{back} != {s}"
    assert ((mant >= 2**23) & (mant < 2**24)).all(), mant


_HARNESS = """
#include <stdio.h>
#include <inttypes.h>
#include "ek_kernels.h"
int main(void) {
    long long acc, mant, rshift;
    while (scanf("%lld %lld %lld", &acc, &mant, &rshift) == 3) {
        printf("%" PRId32 "\\n", ek_requant_b32((int32_t)acc, (int32_t)mant, (int32_t)rshift));
    }
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
@pytest.mark.parametrize("defines", [(), ("-DEK_NO_BUILTINS",)], ids=["clz-builtin", "portable"])
def test_c_kernel_matches_numpy_emulation(tmp_path, defines):
    for name in ("ek_kernels.h", "ek_kernels.c"):
        (tmp_path / name).write_text(kernel_source(name), encoding="utf-8")
    (tmp_path / "h.c").write_text(_HARNESS, encoding="utf-8")
    exe = tmp_path / "h"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", *defines, "-o", str(exe), "h.c",
                    "ek_kernels.c"], cwd=tmp_path, check=True, capture_output=True, text=True)
    rows, want = [], []
    for acc, scale in _cases():
        mant, rshift = binary32_multiplier(scale)
        rows += [f"{int(a)} {int(mant[0])} {int(rshift[0])}" for a in acc]
        want.append(requant_binary32(acc, mant, rshift))
    out = subprocess.run([str(exe)], input="\n".join(rows) + "\n", capture_output=True, text=True, check=True)
    got = np.array(out.stdout.split(), dtype=np.int64)
    expected = np.concatenate(want)
    bad = int((got != expected).sum())
    assert got.size == expected.size and bad == 0, \
        f"C ek_requant_b32 differs from the numpy reference on {bad}/{expected.size} values (threshold 0)"


def _qlinearconv_session(w, b, xs, xz, ws, ys, yz, pad):
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    from edgekiln.execution.ort import ort_session

    inits = [nh.from_array(np.array(xs, F), "xs"), nh.from_array(np.array(xz, np.int8), "xz"), nh.from_array(w, "w"),
             nh.from_array(ws.astype(F), "ws"), nh.from_array(np.zeros(ws.shape, np.int8), "wz"),
             nh.from_array(np.array(ys, F), "ys"), nh.from_array(np.array(yz, np.int8), "yz"), nh.from_array(b, "b")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[pad] * 4, kernel_shape=list(w.shape[2:]))
    graph = helper.make_graph([node], "qlinearconv", [helper.make_tensor_value_info("x", TensorProto.INT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort_session(model, threads=1)


@pytest.mark.parametrize("case", ["power_of_two_scales_exact_ties", "random_per_channel_scales"])
def test_conv_reference_is_bit_exact_with_onnxruntime_qlinearconv(case):
    """The integer conv equals onnxruntime's QLinearConv (float32 requantization) on every output.

    Power-of-two scales make ~1/8 of the outputs exact .5 ties (round half to even: the old
    round-half-up multiplier failed these); random per-channel scales exercise float32 rounding.
    """
    from edgekiln.codegen.reference import conv2d

    rng = np.random.default_rng(SEED)
    cin, cout, k, h, xz, yz = 3, 6, 3, 12, -10, 13
    w = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    b = rng.integers(-2000, 2000, cout).astype(np.int32)
    if case.startswith("power"):
        xs, ys, ws = 0.5, 2.0, (2.0 ** -rng.integers(1, 5, cout)).astype(F)
    else:
        xs, ys, ws = 0.0213, 0.173, rng.uniform(0.002, 0.03, cout).astype(F)
    mant, rshift = binary32_multiplier(onnx_qlinear_scale(xs, ws, ys))
    attrs = dict(in_h=h, in_w=h, in_c=cin, out_h=h, out_w=h, out_c=cout, k_h=k, k_w=k, stride_h=1, stride_w=1,
                 dil_h=1, dil_w=1, pad_top=1, pad_left=1, groups=1, input_zp=xz, output_zp=yz, act_min=-128,
                 act_max=127)
    arrays = dict(weights=np.ascontiguousarray(w.transpose(0, 2, 3, 1)), bias=b, mult=mant, shift=rshift)
    sess = _qlinearconv_session(w, b, xs, xz, ws, ys, yz, pad=1)
    x = rng.integers(-128, 128, (40, 1, cin, h, h)).astype(np.int8)
    ort_y = np.stack([sess.run(None, {"x": xi})[0][0].transpose(1, 2, 0) for xi in x])
    ref_y = np.stack([conv2d(xi.transpose(0, 2, 3, 1), attrs, arrays)[0] for xi in x])
    bad = int((ort_y != ref_y).sum())
    assert bad == 0, f"{case}: {bad}/{ref_y.size} outputs differ from onnxruntime QLinearConv (threshold 0, seed {SEED})"
