"""The flatbuffer layer and the TFLM arena search, on .tflite files built directly (no IR, no ONNX)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tflite_micro", reason="tflite-micro is an optional extra (pip install tflite-micro)")

from edgekiln.codegen.tflite import schema  # noqa: E402
from edgekiln.codegen.tflite.check import run_litert, run_tflm  # noqa: E402
from edgekiln.codegen.tflite.tflm import parse_allocations, probe_arena, tflm_arena  # noqa: E402

SEED = 7


def _fc_model(tmp_path, relu: bool = True):
    """x(1,16) int8 -> FULLY_CONNECTED (per-channel int8 weights, int32 bias) -> y(1,6) int8."""
    rng = np.random.default_rng(SEED)
    in_s, in_zp, out_s, out_zp = 0.05, -10, 0.08, 4  # awkward zero points on purpose
    w = rng.integers(-127, 128, size=(6, 16)).astype(np.int8)
    w_s = rng.uniform(0.002, 0.02, size=6).astype(np.float32)
    b = rng.integers(-2000, 2000, size=6).astype(np.int32)
    g = schema.TFLiteGraph("fc")
    x = g.add_tensor("x", (1, 16), np.int8, scale=in_s, zero_point=in_zp)
    wt = g.add_tensor("w", (6, 16), np.int8, data=w, scale=w_s, zero_point=0, quantized_dimension=0)
    bt = g.add_tensor("b", (6,), np.int32, data=b, scale=(np.float32(in_s) * w_s), zero_point=0)
    y = g.add_tensor("y", (1, 6), np.int8, scale=out_s, zero_point=out_zp)
    g.add_op("FULLY_CONNECTED", [x, wt, bt], [y],
             schema.options("FullyConnectedOptions", fusedActivationFunction=schema.activation_code(
                 "RELU" if relu else None)))
    path = tmp_path / "fc.tflite"
    path.write_bytes(g.to_bytes(inputs=[x], outputs=[y]))
    params = dict(w=w, w_s=w_s, b=b, in_s=in_s, in_zp=in_zp, out_s=out_s, out_zp=out_zp)
    return path, params


def _fc_reference(xq: np.ndarray, p: dict, relu: bool) -> np.ndarray:
    acc = (xq.astype(np.int64) - p["in_zp"]) @ p["w"].astype(np.int64).T + p["b"]
    y = np.rint(acc * (np.float64(np.float32(p["in_s"])) * p["w_s"].astype(np.float64) / p["out_s"])) + p["out_zp"]
    lo = p["out_zp"] if relu else -128
    return np.clip(y, lo, 127).astype(np.int8)


def test_written_fc_runs_in_litert_and_tflm_like_an_integer_reference(tmp_path):
    path, p = _fc_model(tmp_path)
    rng = np.random.default_rng(SEED + 1)
    x = rng.uniform(-6, 6, size=(40, 16)).astype(np.float32)
    (y_tflm,), (oq,) = run_tflm(path, x)
    (y_lite,), _ = run_litert(path, x)
    xq = np.clip(np.rint(x / np.float32(p["in_s"])) + p["in_zp"], -128, 127).astype(np.int8)
    ref = _fc_reference(xq, p, relu=True)
    assert oq == {"scale": pytest.approx(p["out_s"]), "zero_point": p["out_zp"]}
    d_tflm = np.abs(y_tflm.astype(int) - ref)
    # NOTE: the float64 reference rounds once; TFLM's fixed-point multiplier may differ at .5 ties.
    assert d_tflm.max() <= 1 and np.mean(d_tflm == 0) >= 0.99, (
        f"TFLM vs integer reference: max {d_tflm.max()} LSB, identical {np.mean(d_tflm == 0):.3f} "
        f"(need <=1, >=0.99), seed {SEED}")
    d_lite = np.abs(y_lite.astype(int) - y_tflm.astype(int))
    assert d_lite.max() <= 1, f"LiteRT vs TFLM max {d_lite.max()} LSB (need <= 1), seed {SEED}"
    assert (y_tflm >= p["out_zp"]).all(), "fused RELU must clamp at the output zero point"


def test_constant_buffers_are_16_byte_aligned_and_round_trip(tmp_path):
    import flatbuffers

    path, p = _fc_model(tmp_path)
    data = path.read_bytes()
    assert data[4:8] == b"TFL3"
    fb = schema.schema_module()
    root = fb.Model.GetRootAsModel(bytearray(data), 0)
    starts = []
    for i in range(root.BuffersLength()):
        buf = root.Buffers(i)
        off = flatbuffers.number_types.UOffsetTFlags.py_type(buf._tab.Offset(4))
        if off:
            starts.append(buf._tab.Vector(off))
    assert len(starts) == 2, f"expected 2 constant buffers (weights, bias), found {len(starts)}"
    assert all(s % schema.BUFFER_ALIGNMENT == 0 for s in starts), f"buffer starts {starts} not 16-aligned"
    model = schema.read_model(data)
    assert schema.op_names(model) == ["FULLY_CONNECTED"]
    w_t = model.subgraphs[0].tensors[1]
    assert w_t.quantization.quantizedDimension == 0
    np.testing.assert_allclose(w_t.quantization.scale, p["w_s"], rtol=0)
    stored = np.frombuffer(bytes(model.buffers[w_t.buffer].data), dtype=np.int8).reshape(6, 16)
    np.testing.assert_array_equal(stored, p["w"])


def test_unknown_builtin_op_name_fails_early():
    g = schema.TFLiteGraph("bad")
    with pytest.raises(AttributeError):
        g.add_op("NOT_AN_OP", [], [])


def test_parse_allocations_reads_total_head_and_tail():
    text = ("[RecordingMicroAllocator] Arena allocation total 19872 bytes\n"
            "[RecordingMicroAllocator] Arena allocation head 15680 bytes\n"
            "[RecordingMicroAllocator] Arena allocation tail 4192 bytes\n")
    assert parse_allocations(text) == {"total": 19872, "head": 15680, "tail": 4192}


def test_arena_search_finds_a_running_size_not_below_the_reported_one(tmp_path):
    path, _ = _fc_model(tmp_path)
    info = tflm_arena(path, time_budget_s=60)
    assert info["reported_bytes"] == info["persistent_bytes"] + info["nonpersistent_bytes"]
    assert info["smallest_running_bytes"] >= info["reported_bytes"], info
    assert probe_arena(path, info["smallest_running_bytes"], 30)[0], "the reported smallest arena must run"
    below = info["smallest_running_bytes"] - 2 * info["resolution_bytes"]
    assert not probe_arena(path, below, 30)[0], f"{below} B should not run: the search is not tight ({info})"
