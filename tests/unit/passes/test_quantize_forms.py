"""The quantize pass's latency side: when the int8 form it kept is still not faster than FP32, the
costliest int8 layers are tried float and kept float only if the model gets faster (timings faked
here so the decision logic is tested exactly; the timing itself is tested in tests/unit/quant)."""

from __future__ import annotations

import onnx
import pytest

from edgekiln.passes import quantize_forms
from edgekiln.passes.quantize import QuantizeConfig, layer_names, quantize_once
from edgekiln.quant import speed as speed_mod
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx


@pytest.fixture()
def quantized(tmp_path):
    import numpy as np

    from edgekiln.execution.ort import readable_file

    # NOTE: the pass hands quantize_once a file onnxruntime's tools read (quantize_model does this)
    src = readable_file(tiny_conv_onnx(tmp_path / "m.onnx", batch=1), tmp_path / "readable")

    x = np.load(random_npz(tmp_path / "c.npz", (1, 1, 8, 8), n=16))["x"]
    feeds = [{"input": x[i:i + 1]} for i in range(len(x))]
    dst = tmp_path / "q" / "model.onnx"
    (dst.parent / "scratch").mkdir(parents=True)
    cfg = QuantizeConfig(activations="int8", speed_rule="off")
    methods = quantize_once(src, dst, cfg, feeds, [])
    return src, dst, cfg, feeds, methods


def _fake(monkeypatch, layers, p50_of, others=("a", "b", "c", "d")):
    """Fake timings; ``others``: extra layer names so the model counts 6 layers (at most a third float)."""
    import edgekiln.passes.quantize as pq

    real = pq.layer_names
    monkeypatch.setattr(pq, "layer_names", lambda path: [*real(path), *others])
    monkeypatch.setattr(speed_mod, "costly_layers", lambda path, rt, feed, names, k=3: [(n, 1.0) for n in layers])

    def choose(src, forms, runtime, feeds):
        p50 = {f: p50_of(f, path) for f, path in forms.items()}
        return {"p50_ms": p50, "sqnr_db": {f: 30.0 for f in forms}}
    monkeypatch.setattr(speed_mod, "choose_form", choose)


def _float_nodes(path):
    m = onnx.load(str(path))
    produced_by_dq = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] not in produced_by_dq}


def test_a_layer_that_makes_the_model_faster_stays_float(quantized, monkeypatch):
    src, dst, cfg, feeds, methods = quantized
    conv, fc = layer_names(src)
    # float conv: 20% faster; float fc: slower
    _fake(monkeypatch, [conv, fc], lambda form, path: {"kept": 1.0, conv: 0.8, fc: 1.1}[form])
    exclude, speed = [], {"fastest_runtime": "onnxruntime"}
    quantize_forms._float_costly_layers(src, dst, cfg, feeds, exclude, 0, speed, methods, {}, {})
    assert exclude == [conv], exclude
    assert set(speed["float_for_latency"]) == {conv}, speed
    assert speed["layers_tried_float"][fc]["p50_ms"] == 1.1, speed
    assert _float_nodes(dst) == {conv}, _float_nodes(dst)


def test_no_layer_stays_float_when_none_saves_enough(quantized, monkeypatch):
    src, dst, cfg, feeds, methods = quantized
    conv, fc = layer_names(src)
    # 2% is within MIN_GAIN (3%): noise, not a gain
    _fake(monkeypatch, [conv, fc], lambda form, path: {"kept": 1.0, conv: 0.98, fc: 1.2}[form])
    exclude, speed = [], {"fastest_runtime": "onnxruntime"}
    before = dst.read_bytes()
    quantize_forms._float_costly_layers(src, dst, cfg, feeds, exclude, 0, speed, methods, {}, {})
    assert exclude == [] and "float_for_latency" not in speed, (exclude, speed)
    assert dst.read_bytes() == before, "the kept model was rewritten although no layer helped"


def test_a_small_model_never_loses_its_quantized_layers(quantized, monkeypatch):
    """2 layers (call-overhead bound, int8 never faster): floating both would be the FP32 model."""
    src, dst, cfg, feeds, methods = quantized
    conv, fc = layer_names(src)
    _fake(monkeypatch, [conv, fc], lambda form, path: {"kept": 1.0, conv: 0.5, fc: 0.5}[form], others=())
    exclude, speed = [], {"fastest_runtime": "onnxruntime"}
    quantize_forms._float_costly_layers(src, dst, cfg, feeds, exclude, 0, speed, methods, {}, {})
    assert exclude == [] and _float_nodes(dst) == set(), (exclude, _float_nodes(dst))
