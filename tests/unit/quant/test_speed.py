"""Speed-aware int8 (quant/speed.py): HardSwish re-fused after onnxruntime's pre-processing
splits it, activations and squeeze-excite gates kept float, the reason recorded, SQNR not lower."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekiln.fileio import atomic_save_npz
from edgekiln.passes.quantize import QuantizeConfig, quantize_model
from edgekiln.quant.speed import fuse_hardswish, sqnr_db

SEED = 0


def _mbv3_block(path):
    """Conv -> HardSwish -> squeeze-excite (GlobalAveragePool, Conv, Relu, Conv, HardSigmoid, Mul)
    -> Conv, opset 17, batch 1: the MobileNetV3 pattern, a few thousand parameters."""
    rng = np.random.default_rng(SEED)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [w("w1", 16, 3, 3, 3), w("b1", 16), w("w2", 4, 16, 1, 1), w("b2", 4), w("w3", 16, 4, 1, 1), w("b3", 16),
             w("w4", 8, 16, 1, 1), w("b4", 8)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c1"], ["a1"], name="hswish1"),
             helper.make_node("GlobalAveragePool", ["a1"], ["p"], name="pool"),
             helper.make_node("Conv", ["p", "w2", "b2"], ["s1"], name="se_reduce"),
             helper.make_node("Relu", ["s1"], ["s2"], name="se_relu"),
             helper.make_node("Conv", ["s2", "w3", "b3"], ["s3"], name="se_expand"),
             helper.make_node("HardSigmoid", ["s3"], ["gate"], name="se_gate", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["a1", "gate"], ["se"], name="se_scale"),
             helper.make_node("Conv", ["se", "w4", "b4"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "mbv3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    d = tmp_path_factory.mktemp("mbv3")
    rng = np.random.default_rng(SEED)
    atomic_save_npz(d / "calib.npz", x=rng.standard_normal((24, 3, 12, 12)).astype(np.float32))
    return _mbv3_block(d / "model.onnx"), d / "calib.npz"


def _quantize(block, tmp_path, rule):
    src, calib = block
    return quantize_model(src, QuantizeConfig(speed_rule=rule), tmp_path / rule, calib=calib)


def _consumers(model):
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n.op_type)
    return out


def test_rule_refuses_hardswish_and_keeps_gates_float(block, tmp_path):
    off, on = _quantize(block, tmp_path, "off"), _quantize(block, tmp_path, "on")
    m_off, m_on = onnx.load(str(off.path)), onnx.load(str(on.path))
    ops_off, ops_on = [n.op_type for n in m_off.graph.node], [n.op_type for n in m_on.graph.node]
    # onnxruntime's pre-processing splits HardSwish; without the rule it stays split
    assert ops_off.count("HardSwish") == 0 and ops_off.count("HardSigmoid") == 2, ops_off
    assert ops_on.count("HardSwish") == 1 and ops_on.count("HardSigmoid") == 1, ops_on
    # kept float: no QuantizeLinear on the gate between the SE HardSigmoid and its Mul, and the
    # HardSwish reads straight from the Conv's DequantizeLinear into a float op (no QLinear form)
    cons = _consumers(m_on)
    gate = next(n for n in m_on.graph.node if n.op_type == "HardSigmoid")
    assert cons[gate.output[0]] == ["Mul"], cons[gate.output[0]]
    assert ops_on.count("QuantizeLinear") < ops_off.count("QuantizeLinear"), \
        (ops_on.count("QuantizeLinear"), ops_off.count("QuantizeLinear"))
    why = on.speed["float_for_speed"]
    assert {"se_gate", "se_scale"} <= set(why) and all("DQ/Q" in r for r in why.values()), why
    assert on.speed["fused_hardswish"] and on.speed["rule"] == "on"


def test_rule_does_not_lower_sqnr(block, tmp_path):
    src, _ = block
    rng = np.random.default_rng(SEED + 1)
    held = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(16)]
    off, on = _quantize(block, tmp_path, "off"), _quantize(block, tmp_path, "on")
    s_off, s_on = sqnr_db(src, off.path, held), sqnr_db(src, on.path, held)
    assert s_on >= s_off - 0.1, f"SQNR with the rule {s_on:.2f} dB < without {s_off:.2f} dB (seed {SEED})"


def test_auto_measures_and_records(block, tmp_path):
    res = _quantize(block, tmp_path, "auto")
    sp = res.speed
    assert sp["decided_by"] == "measured on onnxruntime", sp
    assert set(sp["p50_ms"]) == {"on", "off"} and set(sp["sqnr_db"]) == {"on", "off"}, sp
    kept = "on" if sp["applied"] else "off"
    other = "off" if kept == "on" else "on"
    # the kept form is the faster one unless it costs more than 1 dB of SQNR
    assert sp["p50_ms"][kept] <= sp["p50_ms"][other] or sp["sqnr_db"][kept] > sp["sqnr_db"][other] + 1.0, sp


def test_fuse_hardswish_needs_the_hardswish_constants():
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], name="hs"),    # default alpha 0.2: not HardSwish
             helper.make_node("Mul", ["x", "h"], ["y"], name="mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    assert fuse_hardswish(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])) == []
    nodes[0] = helper.make_node("HardSigmoid", ["x"], ["h"], name="hs", alpha=1 / 6, beta=0.5)
    g = helper.make_graph(nodes, "g", g.input, g.output)
    assert fuse_hardswish(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])) == [], "opset 13"
