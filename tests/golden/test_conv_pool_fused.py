"""Golden: the fused conv -> max/avg pool kernel is bit-exact with the unfused kernels.

Each case is a conv -> pool graph built directly as IR with awkward zero points (-10, 4, 13),
odd map sizes, strides, paddings, overlapping (3x3 s2) and gapped (2x2 s3) pool windows. The
unfused numpy reference is the source of truth; the fused reference, the fused C and the
unfused C must all reproduce it exactly.
"""

from __future__ import annotations

import copy
import shutil
import subprocess

import numpy as np
import pytest

from edgekiln.codegen.binary32 import binary32_multiplier
from edgekiln.codegen.emit import write_library
from edgekiln.codegen.fuse import SCRATCH_SUFFIX, fuse_conv_pool
from edgekiln.codegen.ir import IntGraph, Op, QTensor
from edgekiln.codegen.planner import plan_memory
from edgekiln.codegen.reference import run_graph
from edgekiln.codegen.verify import HOST_CFLAGS
from edgekiln.quant.fixed_point import quantize_multiplier

SEED = 0
N_INPUTS = 24

# name: (h, w, cin, cout, conv k, conv stride, conv pad, groups, pool kind, pool k, pool stride, pool pad,
#        count_include_pad, input zp, conv out zp, pool out zp, clamp)
CASES = {
    "k3s1p1_max2s2_odd": (9, 9, 3, 5, 3, 1, 1, 1, "max", 2, 2, 0, 0, -10, 4, 4, (4, 127)),
    "k3s2p1_max3s2_overlap": (11, 13, 2, 4, 3, 2, 1, 1, "max", 3, 2, 0, 0, 13, -10, -10, (-128, 127)),
    "k3s1p0_max3s2p1_padded": (10, 7, 2, 3, 3, 1, 0, 1, "max", 3, 2, 1, 0, 4, 13, 13, (13, 100)),
    "k1s1_max2s3_gaps": (11, 11, 3, 4, 1, 1, 0, 1, "max", 2, 3, 0, 0, -10, -128, -128, (-128, 127)),
    "depthwise_k3s1p1_max2s2": (8, 9, 6, 6, 3, 1, 1, 6, "max", 2, 2, 0, 0, 4, -10, -10, (-10, 127)),
    "k3s1p1_avg2s2_rescale": (9, 8, 2, 4, 3, 1, 1, 1, "avg", 2, 2, 0, 0, -10, 4, 13, (-128, 127)),
    "k3s2p1_avg3s2p1_exclude_pad": (13, 11, 3, 4, 3, 2, 1, 1, "avg", 3, 2, 1, 0, 13, -10, 4, (-128, 127)),
    "k3s1p1_avg3s1p1_include_pad": (5, 6, 2, 3, 3, 1, 1, 1, "avg", 3, 1, 1, 1, 4, 13, 13, (13, 127)),
    "one_row_map_max3s1p1": (1, 7, 2, 3, 1, 1, 0, 1, "max", 3, 1, 1, 0, -10, 4, 4, (-128, 127)),
}


def _case_graph(case: str, *, tail: bool) -> IntGraph:
    (h, w, cin, cout, k, s, p, groups, kind, pk, ps, pp, inc, in_zp, c_zp, p_zp, act) = CASES[case]
    rng = np.random.default_rng(SEED)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    ph, pw = (oh + 2 * pp - pk) // ps + 1, (ow + 2 * pp - pk) // ps + 1
    mult, shift = binary32_multiplier(rng.uniform(0.002, 0.02, cout))  # conv: float32 scale
    conv = Op("conv2d", "conv", ["x"], "c",
              attrs=dict(in_h=h, in_w=w, in_c=cin, out_h=oh, out_w=ow, out_c=cout, k_h=k, k_w=k, stride_h=s,
                         stride_w=s, dil_h=1, dil_w=1, pad_top=p, pad_left=p, groups=groups, input_zp=in_zp,
                         output_zp=c_zp, act_min=act[0], act_max=act[1]),
              arrays=dict(weights=rng.integers(-127, 128, (cout, k, k, cin // groups)).astype(np.int8),
                          bias=rng.integers(-3000, 3000, cout).astype(np.int32), mult=mult, shift=shift),
              macs=oh * ow * cout * k * k * cin // groups)
    geo = dict(in_h=oh, in_w=ow, channels=cout, out_h=ph, out_w=pw, k_h=pk, k_w=pk, stride_h=ps, stride_w=ps,
               pad_top=pp, pad_left=pp)
    if kind == "max":
        pool = Op("max_pool", "pool", ["c"], "p", attrs=geo)
    else:
        m, sh = quantize_multiplier(0.7 if p_zp != c_zp else 1.0)
        pool = Op("avg_pool", "pool", ["c"], "p", attrs=dict(geo, count_include_pad=inc, input_zp=c_zp,
                                                             output_zp=p_zp, mult=m, shift=sh))
    tensors = {"x": QTensor("x", (1, h, w, cin), 0.05, in_zp), "c": QTensor("c", (1, oh, ow, cout), 0.1, c_zp),
               "p": QTensor("p", (1, ph, pw, cout), 0.1, p_zp)}
    ops = [conv, pool]
    out = "p"
    if tail:  # a consumer after the pool puts the pooled map in the arena, not the caller's buffer
        m, sh = quantize_multiplier(0.9)
        size = ph * pw * cout
        ops.append(Op("requantize", "rq", ["p"], "q", attrs=dict(size=size, input_zp=p_zp, output_zp=-3, mult=m,
                                                                 shift=sh, act_min=-128, act_max=127)))
        tensors["q"] = QTensor("q", (1, ph, pw, cout), 0.1, -3)
        out = "q"
    return IntGraph(tensors, ops, "x", out, "input", (), ())


def _inputs(graph: IntGraph) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    x = rng.integers(-128, 128, (N_INPUTS, *graph.tensors["x"].shape[1:])).astype(np.int8)
    x[0], x[1] = -128, 127  # saturating extremes
    return x


def _run_c(tmp_path, graph: IntGraph, x: np.ndarray) -> np.ndarray:
    plan = plan_memory(graph)
    write_library(graph, plan, tmp_path, "k")
    exe = tmp_path / "k_test"
    subprocess.run(["gcc", *HOST_CFLAGS, "-o", str(exe), str(tmp_path / "k.c"), str(tmp_path / "ek_kernels.c"),
                    str(tmp_path / "main.c")], check=True, capture_output=True, text=True)
    x.tofile(tmp_path / "in.bin")
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, capture_output=True)
    return np.fromfile(tmp_path / "out.bin", np.int8).reshape(len(x), -1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_reference_equals_unfused(case):
    unfused = _case_graph(case, tail=True)
    fused = fuse_conv_pool(copy.deepcopy(unfused), whole_map=True)
    assert [op.kind for op in fused.ops] == ["conv_pool", "requantize"], case
    for xi in _inputs(unfused):
        a, b = run_graph(unfused, xi[None]), run_graph(fused, xi[None])
        assert np.array_equal(a, b), f"{case}: fused reference differs on {int((a != b).sum())} values (seed {SEED})"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_c_is_bit_exact(tmp_path, case):
    tail = case < "k3s1"  # half the cases write the pooled map to the caller's buffer, half to the arena
    unfused = _case_graph(case, tail=tail)
    fused = fuse_conv_pool(copy.deepcopy(unfused), whole_map=True)
    x = _inputs(unfused)
    ref = np.stack([run_graph(unfused, xi[None]).reshape(-1) for xi in x])
    out = _run_c(tmp_path, fused, x)
    bad = int((out != ref).sum())
    assert bad == 0, f"{case}: fused C differs from the unfused reference on {bad}/{out.size} values " \
                     f"(threshold 0, seed {SEED})"


def test_no_fusion_when_conv_output_has_another_reader():
    g = _case_graph("k3s1p1_max2s2_odd", tail=False)
    m, sh = quantize_multiplier(1.0)
    g.ops.append(Op("requantize", "side", ["c"], "side_out",
                    attrs=dict(size=g.tensors["c"].size, input_zp=4, output_zp=4, mult=m, shift=sh, act_min=-128,
                               act_max=127)))
    g.tensors["side_out"] = QTensor("side_out", g.tensors["c"].shape, 0.1, 4)
    kinds = [op.kind for op in fuse_conv_pool(g).ops]
    assert kinds == ["conv2d", "max_pool", "requantize"], kinds


def test_no_fusion_when_the_ring_holds_the_whole_conv_output():
    # a pool window as tall as the conv output (a global pool, a one-row map) saves no memory fused, and
    # the fused kernel is the portable one (DS-CNN: 9.4 instructions/MAC fused, 2.0 unfused on a Cortex-M4)
    whole = [c for c in sorted(CASES) if _case_graph(c, tail=True).ops[0].attrs["out_h"]
             <= _case_graph(c, tail=True).ops[1].attrs["k_h"]]
    assert whole, "no case with a pool window as tall as the conv output"
    for case in whole:
        kinds = [op.kind for op in fuse_conv_pool(_case_graph(case, tail=True)).ops]
        assert kinds[:2] == [_case_graph(case, tail=True).ops[0].kind, _case_graph(case, tail=True).ops[1].kind], \
            (case, kinds)


def test_planner_places_scratch_rows_for_one_step_without_overlap():
    g = fuse_conv_pool(_case_graph("k3s2p1_max3s2_overlap", tail=True))
    op = g.ops[0]
    scratch = g.tensors[op.scratch]
    assert op.scratch == "p" + SCRATCH_SUFFIX and scratch.shape == (3, 7, 4), scratch.shape  # 3 pool rows x 7 conv cols x 4 ch
    plan = plan_memory(g, reorder=False)
    where, off = plan.location[op.scratch]
    assert where == "arena"
    # the pooled output (arena) and the scratch rows are live at step 0 together: disjoint ranges
    _, p_off = plan.location["p"]
    p_size = g.tensors["p"].size
    assert off + scratch.size <= p_off or p_off + p_size <= off, (off, scratch.size, p_off, p_size)
    assert plan.arena_bytes >= scratch.size + p_size
    assert plan.live_bytes[0] == scratch.size + p_size and plan.live_bytes[1] == p_size, plan.live_bytes
