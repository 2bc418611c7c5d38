"""IR -> .tflite: structure, LiteRT and TFLM agreement with onnxruntime, per-op TFLM vs the integer reference.

Tolerances, and why:
* LiteRT (XNNPACK, single fp32 requantization rounding) vs onnxruntime: the issue's bar, >= 99% of
  int8 outputs identical, none off by more than 1 LSB, identical top-1.
* TFLM requantizes with gemmlowp's two roundings (rounding doubling high-mul, then rounding shift),
  so per op it differs from single-rounding kernels (onnxruntime, edgekiln's reference) by 1 LSB
  where the exact value lies just below a .5 tie: checked per op in isolation (<= 1 LSB, >= 99%
  identical; averages >= 80%, see the test). Through a whole model those 1-LSB steps compound, so there top-1 must agree wherever
  the reference's top-2 margin exceeds 2 LSB and no output may be off by more than 2 LSB.
* Softmax: TFLite's int8 softmax uses an exp table and a fixed 1/256 output grid (requantized
  to the model's 1/255), onnxruntime computes it in float: up to 3 LSB of 1/255.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tflite_micro", reason="tflite-micro is an optional extra (pip install tflite-micro)")
pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is an optional extra")

from edgekiln.codegen import reference  # noqa: E402
from edgekiln.codegen.ir import IntGraph, load_qdq  # noqa: E402
from edgekiln.codegen.tflite import schema  # noqa: E402
from edgekiln.codegen.tflite.check import compare_tflite, run_tflm_int8  # noqa: E402
from edgekiln.codegen.tflite.testmodels import build_qdq  # noqa: E402
from edgekiln.codegen.tflite.writer import to_tflite_bytes, write_tflite  # noqa: E402
from edgekiln.errors import EdgekilnError  # noqa: E402

SEED = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tflite_models")
    out = {}
    for kind in ("tiny", "dwres", "concat"):
        qdq, x = build_qdq(kind, d, seed=SEED, n_eval=48)
        path = write_tflite(load_qdq(qdq), d / f"{kind}.tflite")
        out[kind] = (qdq, x, path, compare_tflite(path, qdq, x))
    return out


@pytest.mark.parametrize("kind", ["tiny", "dwres"])
def test_litert_matches_onnxruntime(models, kind):
    r = models[kind][3]["litert"]
    assert r["top1_agreement"] == 1.0, f"{kind}: LiteRT top-1 agreement {r['top1_agreement']} (need 1.0), seed {SEED}"
    assert r["identical_fraction"] >= 0.99 and r["max_abs_diff_lsb"] <= 1, (
        f"{kind}: LiteRT identical {r['identical_fraction']:.4f} (need >= 0.99), max {r['max_abs_diff_lsb']} LSB "
        f"(need <= 1), histogram {r['diff_histogram_lsb']}, seed {SEED}")


@pytest.mark.parametrize("kind", ["tiny", "dwres"])
def test_tflm_whole_model_agrees_with_onnxruntime_within_compounded_rounding(models, kind):
    r = models[kind][3]["tflm"]
    assert r["top1_agreement_clear_margin"] == 1.0, (
        f"{kind}: TFLM top-1 agreement on {r['top1_clear_margin_inputs']} clear-margin inputs "
        f"{r['top1_agreement_clear_margin']} (need 1.0), seed {SEED}")
    assert r["max_abs_diff_lsb"] <= 2, f"{kind}: TFLM max {r['max_abs_diff_lsb']} LSB (need <= 2), seed {SEED}"


def test_softmax_model_top1_identical_and_within_softmax_tolerance(models):
    for rt in ("litert", "tflm"):
        r = models["concat"][3][rt]
        assert r["top1_agreement_clear_margin"] == 1.0, f"{rt}: top-1 {r}, seed {SEED}"
        assert r["max_abs_diff_lsb"] <= 3, f"{rt}: softmax max {r['max_abs_diff_lsb']} LSB (need <= 3), seed {SEED}"


def _single_op_graph(g: IntGraph, op) -> IntGraph:
    return IntGraph(tensors=g.tensors, ops=[op], input=op.inputs[0], output=op.output,
                    onnx_input_name="x", onnx_input_shape=(), onnx_output_shape=())


@pytest.mark.parametrize("kind", ["dwres", "concat"])
def test_each_op_in_tflm_is_within_1_lsb_of_the_integer_reference(models, kind, tmp_path):
    g = load_qdq(models[kind][0])
    rng = np.random.default_rng(SEED)
    checked = []
    for i, op in enumerate(g.ops):
        if len(op.inputs) != 1 or op.kind == "softmax":
            continue  # two-input ops are covered by the whole-model tests; softmax has its own tolerance
        path = write_tflite(_single_op_graph(g, op), tmp_path / f"op{i}.tflite")
        shape = g.tensors[op.inputs[0]].shape
        xq = rng.integers(-128, 128, size=(8, *shape), dtype=np.int8)
        y = run_tflm_int8(path, xq)[0].astype(np.int32)
        ref = np.stack([reference.run_op(op, [q]).reshape(g.tensors[op.output].shape) for q in xq]).astype(np.int32)
        d = np.abs(y - ref)
        # NOTE: averages hit exact .5 ties often (a 2x2 sum is 2 mod 4 a quarter of the time): TFLite
        # rounds them half away from zero, the reference half up; TFLM's MEAN also rescales in two
        # rounding steps. Measured 86-88% identical on these models, so the floor there is 0.8.
        floor = 0.8 if op.kind == "avg_pool" else 0.99
        assert d.max() <= 1 and np.mean(d == 0) >= floor, (
            f"{kind}/{op.name} ({op.kind}): max {d.max()} LSB (need <= 1), identical {np.mean(d == 0):.4f} "
            f"(need >= {floor}), seed {SEED}")
        checked.append(op.kind)
    assert "conv2d" in checked, checked


def test_layout_and_quantization_follow_tflite_conventions(models):
    qdq, _, path, _ = models["dwres"]
    g = load_qdq(qdq)
    m = schema.read_model(path.read_bytes())
    assert schema.op_names(m) == ["PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD", "MEAN", "RESHAPE",
                                  "FULLY_CONNECTED"]
    sg = m.subgraphs[0]
    by_name = {t.name.decode() if isinstance(t.name, bytes) else t.name: t for t in sg.tensors}
    inp, out = sg.tensors[sg.inputs[0]], sg.tensors[sg.outputs[0]]
    fb = schema.schema_module()
    assert list(inp.shape) == [1, 10, 10, 3] and inp.type == fb.TensorType.INT8  # NHWC
    assert inp.quantization.zeroPoint == [g.tensors[g.input].zero_point]
    assert out.type == fb.TensorType.INT8 and list(out.shape) == [1, 5]
    dw_w, dw_b = by_name["dw/weights"], by_name["dw/bias"]
    assert list(dw_w.shape) == [1, 3, 3, 8] and dw_w.quantization.quantizedDimension == 3
    assert by_name["pw/weights"].quantization.quantizedDimension == 0
    assert list(by_name["stem/weights"].shape) == [8, 3, 3, 3]  # OHWI
    assert dw_b.type == fb.TensorType.INT32
    in_scale = np.float32(g.tensors["s_r_QuantizeLinear_Output"].scale)
    np.testing.assert_allclose(dw_b.quantization.scale, in_scale * np.asarray(dw_w.quantization.scale, np.float32),
                               rtol=1e-6)
    assert len(dw_w.quantization.scale) == 8, "depthwise weights must be per-channel"


def test_an_unsupported_op_is_a_named_error(models):
    g = load_qdq(models["tiny"][0])
    g.ops[0].kind = "lstm"
    with pytest.raises(EdgekilnError, match=r"op lstm \(node 'conv1'\) is not supported by the TFLite writer"):
        to_tflite_bytes(g)
