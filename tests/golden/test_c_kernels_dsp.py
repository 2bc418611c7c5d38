"""Golden: the fast kernels of ek_kernels_dsp.h, bit-exact three ways on awkward shapes.

One hand-built graph holds one layer per case (each its own input and output, packed): convs with 1, 3, 5
and 64 input channels (value-by-value im2col, the C loop past the assembly's offset range), stride 2,
asymmetric and no padding, odd output channel and pixel counts; a conv -> 2x2 max pool fused; depthwise
with 5 and 6 channels (channel tails), 3x3 and 5x5 (odd tap counts); pointwise with 5 input channels
(k tail) and an odd pixel count; fully connected with 13 and 16 inputs. Awkward zero points (-10, 4, 13)
and a ReLU-clamped output. Compared:

1. the numpy reference (:mod:`edgekiln.codegen.reference`), the source of truth;
2. the portable kernels of ek_kernels.c on the host (``plan_memory(..., fast_kernels=False)``), the oracle;
3. the fast kernels' portable C emulation on the host (what a non-DSP target runs);
4. the fast kernels compiled for Cortex-M4 (``-O2``: the DSP intrinsics and the inline assembly loop;
   ``-Os``; ``EK_NO_ASM``; ``EK_NO_DSP``) and run under QEMU (mps2-an386).

The requantization fast path (``ek_requant_b32_packed``) is checked apart on accumulators chosen to hit
its slow path: products within 2^-15 of a .5 tie, exact ties, |acc| >= 2^24, saturation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekiln.codegen.binary32 import binary32_multiplier, requant_binary32
from edgekiln.codegen.emit import write_library
from edgekiln.codegen.fast_kernels import choose
from edgekiln.codegen.fuse import fuse_conv_pool
from edgekiln.codegen.ir import IntGraph, Op, QTensor
from edgekiln.codegen.planner import plan_memory
from edgekiln.codegen.reference import run_graph
from tests.c_host import host_run
from tests.mcu_tools import require_mcu_tools

SEED = 7
N_INPUTS = 6


class _Builder:
    """Layers, each reading its own graph input, for one IntGraph with every layer's output."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, QTensor] = {}
        self.ops: list[Op] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    def _input(self, shape: tuple[int, ...], zp: int) -> QTensor:
        t = QTensor(f"x{len(self.inputs)}", shape, 0.05, zp)
        self.tensors[t.name] = t
        self.inputs.append(t.name)
        return t

    def _requant(self, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        # per-channel float32 scales that spread the outputs over the int8 range (and past it)
        s = (self.rng.uniform(0.5, 2.0, n) * 90.0 / (np.sqrt(k) * 70.0 * 60.0)).astype(np.float32)
        return binary32_multiplier(s)

    def conv(self, hw: tuple[int, int], cin: int, cout: int, k: int, stride: int, pads: tuple[int, int, int, int],
             *, groups: int = 1, zp: int = -10, out_zp: int = 4, relu: bool = False, pool: bool = False) -> Op:
        x = self._input((1, *hw, cin), zp)
        oh = (hw[0] + pads[0] + pads[2] - k) // stride + 1
        ow = (hw[1] + pads[1] + pads[3] - k) // stride + 1
        y = QTensor(f"y{len(self.ops)}", (1, oh, ow, cout), 0.1, out_zp)
        self.tensors[y.name] = y
        w = self.rng.integers(-127, 128, (cout, k, k, cin // groups)).astype(np.int8)
        mult, shift = self._requant(k * k * cin // groups, cout)
        op = Op("conv2d", f"conv{len(self.ops)}", [x.name], y.name,
                attrs=dict(in_h=hw[0], in_w=hw[1], in_c=cin, out_h=oh, out_w=ow, out_c=cout, k_h=k, k_w=k,
                           stride_h=stride, stride_w=stride, dil_h=1, dil_w=1, pad_top=pads[0], pad_left=pads[1],
                           groups=groups, input_zp=zp, output_zp=out_zp, act_min=out_zp if relu else -128,
                           act_max=127),
                arrays=dict(weights=w, bias=self.rng.integers(-3000, 3000, cout).astype(np.int32), mult=mult,
                            shift=shift))
        self.ops.append(op)
        if not pool:
            self.outputs.append(y.name)
            return op
        p = QTensor(f"p{len(self.ops)}", (1, oh // 2, ow // 2, cout), 0.1, out_zp)
        self.tensors[p.name] = p
        self.ops.append(Op("max_pool", f"pool{len(self.ops)}", [y.name], p.name,
                           attrs=dict(in_h=oh, in_w=ow, channels=cout, out_h=oh // 2, out_w=ow // 2, k_h=2, k_w=2,
                                      stride_h=2, stride_w=2, pad_top=0, pad_left=0)))
        self.outputs.append(p.name)
        return op

    def fc(self, n_in: int, n_out: int, *, zp: int = 13, out_zp: int = -5) -> Op:
        x = self._input((1, n_in), zp)
        y = QTensor(f"y{len(self.ops)}", (1, n_out), 0.1, out_zp)
        self.tensors[y.name] = y
        mult, shift = self._requant(n_in, n_out)
        op = Op("fully_connected", f"fc{len(self.ops)}", [x.name], y.name,
                attrs=dict(in_features=n_in, out_features=n_out, input_zp=zp, output_zp=out_zp, act_min=-128,
                           act_max=127),
                arrays=dict(weights=self.rng.integers(-127, 128, (n_out, n_in)).astype(np.int8),
                            bias=self.rng.integers(-3000, 3000, n_out).astype(np.int32), mult=mult, shift=shift))
        self.ops.append(op)
        self.outputs.append(y.name)
        return op

    def graph(self) -> IntGraph:
        g = IntGraph(dict(self.tensors), list(self.ops), self.inputs[0], self.outputs[0], "x0",
                     self.tensors[self.inputs[0]].shape, self.tensors[self.outputs[0]].shape,
                     extra_outputs=self.outputs[1:], extra_inputs=self.inputs[1:],
                     extra_onnx_inputs=[(n, self.tensors[n].shape) for n in self.inputs[1:]])
        return fuse_conv_pool(g)


def _odd_shapes_graph() -> IntGraph:
    b = _Builder(SEED)
    b.conv((9, 9), 3, 5, 3, 2, (1, 1, 1, 1))                 # RGB-like, stride 2, odd channels, 25 pixels
    b.conv((6, 7), 1, 3, 3, 1, (1, 0, 0, 1), relu=True)      # 1 channel, asymmetric padding, ReLU clamp
    b.conv((5, 5), 5, 6, 3, 1, (0, 0, 0, 0), zp=13)          # 5 channels (pairs across taps), no padding
    b.conv((7, 6), 8, 7, 3, 2, (1, 1, 0, 0))                 # SIMD im2col, odd out_c, stride 2
    b.conv((3, 3), 64, 3, 3, 1, (1, 1, 1, 1), zp=4)          # kp 576: the C loop (past the ldrd offset range)
    b.conv((7, 7), 5, 7, 3, 1, (1, 1, 1, 1), pool=True)      # conv -> 2x2 max pool, floor mode (7 -> 3)
    b.conv((8, 6), 4, 4, 3, 1, (1, 1, 1, 1), out_zp=-128, relu=True, pool=True)
    b.conv((7, 7), 6, 6, 3, 2, (1, 1, 1, 1), groups=6)       # depthwise, channel tail 2
    b.conv((5, 6), 5, 5, 5, 1, (2, 2, 2, 2), groups=5, zp=4)  # depthwise 5x5 (25 taps), tail 1
    b.conv((3, 5), 5, 3, 1, 1, (0, 0, 0, 0))                 # pointwise, k tail, 15 pixels
    b.conv((3, 3), 8, 4, 1, 1, (0, 0, 0, 0), zp=-128)        # pointwise, 9 pixels
    b.fc(13, 7)
    b.fc(16, 8, zp=-128)
    return b.graph()


def _requant_graph() -> IntGraph:
    """Fully connected layers of one input and weight 1: output j requantizes bias[j] + (x - zp), so the
    accumulators and scales are chosen here: within s/2 of a .5 tie (for s <= 2^-16 inside the fast path's
    2^-15 window), exact ties, |acc| >= 2^24, saturation; the second layer has a shift the packed form
    cannot take (rshift 24) and runs the unpacked requantization."""
    rng = np.random.default_rng(SEED + 1)
    n = 1024
    mant = rng.integers(1 << 23, 1 << 24, n)
    rshift = rng.integers(30, 51, n)
    s = mant * 2.0 ** -rshift
    k = np.floor(rng.uniform(0, 1, n) * np.minimum(300, np.floor(2.0 ** 30 * s) - 1))
    acc = np.rint(rng.choice([-1, 1], n) * (k + 0.5) / s).astype(np.int64)
    mant[:64] = 1 << 23                      # s = 2^-(t+1), acc = odd * 2^t: exact ties
    acc[:64] = (2 * rng.integers(-200, 200, 64) + 1) << (rshift[:64] - 24)
    acc[64:160] = rng.integers(1 << 24, 1 << 30, 96) * rng.choice([-1, 1], 96)   # float(acc) rounds
    rshift[64:160] = 36 + rng.integers(0, 8, 96)
    b = _Builder(SEED + 1)
    for layer, (m, t) in enumerate([(mant, rshift), (mant[:8], np.r_[24, rshift[1:8]])]):
        x = b._input((1, 1), -3)
        y = QTensor(f"r{layer}", (1, len(m)), 0.1, 2)
        b.tensors[y.name] = y
        b.ops.append(Op("fully_connected", f"rq{layer}", [x.name], y.name,
                        attrs=dict(in_features=1, out_features=len(m), input_zp=-3, output_zp=2, act_min=-128,
                                   act_max=127),
                        arrays=dict(weights=np.ones((len(m), 1), np.int8), bias=acc[:len(m)].astype(np.int32),
                                    mult=m.astype(np.int32), shift=t.astype(np.int32))))
        b.outputs.append(y.name)
    return b.graph()


def _write(graph: IntGraph, out: Path, *, fast: bool = True) -> Path:
    write_library(graph, plan_memory(graph, fast_kernels=fast), out, "k")
    return out


def _inputs(graph: IntGraph, n: int, seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).integers(-128, 128, (n, graph.input_bytes)).astype(np.int8)
    q[0], q[1] = -128, 127   # every input at the extremes
    return q


def _mismatch(got: np.ndarray, want: np.ndarray) -> str:
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    return f"{bad.size}/{want.size} differ (threshold 0, seed {SEED}); first at flat index {bad[:5].tolist()}"


@pytest.fixture(scope="module")
def odd_case(tmp_path_factory):
    graph = _odd_shapes_graph()
    q = _inputs(graph, N_INPUTS, SEED)
    ref = np.stack([run_graph(graph, qi) for qi in q])
    return graph, q, ref, tmp_path_factory.mktemp("dsp")


def test_every_fast_kernel_is_chosen(odd_case):
    graph = odd_case[0]
    kinds = sorted({choose(op).name for op in graph.ops})
    assert kinds == ["conv", "conv_maxpool2", "depthwise", "fc", "pointwise"], kinds


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
def test_host_fast_and_portable_match_reference(odd_case):
    graph, q, ref, tmp = odd_case
    fast = host_run(_write(graph, tmp / "host_fast"), q)
    assert np.array_equal(fast, ref), "host, fast kernels (portable emulation): " + _mismatch(fast, ref)
    portable = host_run(_write(graph, tmp / "host_portable", fast=False), q)
    assert np.array_equal(portable, ref), "host, portable ek_kernels.c: " + _mismatch(portable, ref)


@pytest.mark.parametrize("opt,defines", [("O2", ()), ("Os", ()), ("O2", ("EK_NO_ASM",)), ("O2", ("EK_NO_DSP",))])
def test_cortex_m4_matches_reference(odd_case, opt, defines):
    require_mcu_tools()
    from edgekiln.codegen.mcu import run_on_qemu

    graph, q, ref, tmp = odd_case
    lib = tmp / "arm"
    if not lib.exists():
        _write(graph, lib)
    run = run_on_qemu(lib, q, cpu="cortex-m4", opt=opt, expected=ref, defines=defines)
    assert np.array_equal(run.outputs, ref), f"cortex-m4 -{opt} {list(defines)}: " + _mismatch(run.outputs, ref)
    assert run.mismatched == 0, f"the device counted {run.mismatched} mismatched inferences (threshold 0)"


def test_requant_fast_path_exact(tmp_path):
    graph = _requant_graph()
    zp = graph.tensors[graph.inputs[0]].zero_point
    q = np.array([[zp, zp], [zp + 1, zp - 1], [zp - 100, zp + 100], [127, -128]], np.int8)
    ref = np.stack([run_graph(graph, qi) for qi in q])
    op = graph.ops[0]
    acc, mant, rshift = (op.arrays[k].astype(np.int64) for k in ("bias", "mult", "shift"))
    # the reference against numpy's float32 arithmetic (the definition), for the first input
    f32 = acc.astype(np.float32) * (mant * 2.0 ** -rshift).astype(np.float32)
    want = np.clip(np.clip(np.rint(f32.astype(np.float64)), -(2.0 ** 31), 2.0 ** 31 - 1) + 2, -128, 127)
    assert np.array_equal(ref[0, :acc.size], want.astype(np.int8)), "reference != float32 arithmetic"
    ties = requant_binary32(acc[:64], mant[:64], rshift[:64])
    assert np.all(ties % 2 == 0), f"exact ties must round to even: {ties[ties % 2 != 0][:5]}"
    frac = np.abs(np.abs(acc * (mant * 2.0 ** -rshift)) % 1 - 0.5)
    slow = int(((frac < 2.0 ** -15) | (np.abs(acc) >= 1 << 24)).sum())
    assert slow >= 300, f"only {slow} of {acc.size} accumulators reach the slow path (want >= 300)"
    if shutil.which("gcc") is not None:
        host = host_run(_write(graph, tmp_path / "host"), q)
        assert np.array_equal(host, ref), "requant, host: " + _mismatch(host, ref)
    require_mcu_tools()
    from edgekiln.codegen.mcu import run_on_qemu

    run = run_on_qemu(_write(graph, tmp_path / "arm"), q, cpu="cortex-m4", opt="O2", expected=ref)
    assert np.array_equal(run.outputs, ref), "requant, cortex-m4: " + _mismatch(run.outputs, ref)
