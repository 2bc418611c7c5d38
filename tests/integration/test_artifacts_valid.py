"""Every model file a command writes passes the full ONNX check and runs where it is reported.

Per quantization scheme, on small corpus models (real weights: CREPE tiny, MTCNN P-Net with
dynamic height/width, magika with int32 inputs): `edgekiln.quantize` as a user calls it, then
the written model is checked independently of the product's own check (RunFolder.write) —
``onnx.checker`` full check, and one run in every runtime the report gives a latency for. And
the check in RunFolder.write itself: a model the checker refuses is not written, and the
one-line error names the node (the fp16 converter once appended its input Casts at the end of
the graph: `quantize --scheme fp16` exited 0 with a model onnx.checker rejects).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.execution.runtimes import load_session
from edgekiln.models.run_folder import RunFolder

pytest.importorskip("torch")

CASES = [  # (corpus model, scheme, per_channel)
    ("crepe_tiny", "int8", True),
    ("mtcnn_pnet", "int8", False),
    ("crepe_tiny", "int8-dynamic", True),
    ("crepe_tiny", "fp16", True),
    ("mtcnn_pnet", "fp16", True),   # once "internal error (negative dimensions)": dynamic H/W, no calib feeds
    ("magika", "int4-weight", True),
    ("magika", "fp16", True),
]


@pytest.mark.parametrize(("name", "scheme", "per_channel"), CASES)
def test_quantized_model_passes_the_full_check_and_runs_where_reported(name, scheme, per_channel, tmp_path):
    from edgekiln.api import quantize
    from edgekiln.passes.quantize import QuantizeConfig
    from edgekiln.testing.corpus import ensure

    m = ensure(name)
    run = quantize(m.path, scheme, out=tmp_path / "q", calib=m.calib, config=QuantizeConfig(per_channel=per_channel),
                   input_shapes=m.entry.input_shapes or None, bench_runs=3)
    art = run.read()
    onnx.checker.check_model(onnx.load(str(art.path)), full_check=True)
    # a row naming another "file" times another form (quantize's LiteRT row: a .tflite export)
    reported = [r["runtime"] for r in run.report()["latency_by_runtime"] if "p50" in r and "file" not in r]
    assert "onnxruntime" in reported, run.report()["latency_by_runtime"]
    held_out = dict(np.load(m.eval))
    for runtime in reported:
        session = load_session(art.path, runtime, threads=1, input_shapes=art.input_shapes)
        feeds = {s.name: held_out[s.name][:1].astype(s.dtype) for s in art.inputs}
        outputs = session.run(feeds)
        finite = all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")
        assert finite, f"{name} {scheme} on {runtime}: non-finite outputs on held-out sample 0"


def _unsorted_fp16_model(path):
    """The fp16 converter's output before edgekiln sorted it: input Casts appended after their users."""
    from onnx import TensorProto, helper

    cast = helper.make_node("Cast", ["x"], ["x16"], name="graph_input_cast_0", to=TensorProto.FLOAT16)
    relu = helper.make_node("Relu", ["x16"], ["y16"], name="relu_0")
    back = helper.make_node("Cast", ["y16"], ["y"], name="graph_output_cast_0", to=TensorProto.FLOAT)
    g = helper.make_graph([relu, back, cast], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_model_the_checker_refuses_is_not_written_and_the_error_names_the_node(tmp_path):
    from edgekiln.execution.specs import TensorSpec
    from edgekiln.models.artifact import ONNX_FP16, ModelArtifact

    bad = _unsorted_fp16_model(tmp_path / "bad.onnx")
    art = ModelArtifact(kind=ONNX_FP16, path=bad, inputs=(TensorSpec("x", (1, 4)),))
    run = RunFolder(tmp_path / "run")
    with pytest.raises(EdgekilnError) as err:
        run.write(command="quantize", model=art, measurements={}, markdown="# q")
    message = str(err.value)
    assert "\n" not in message and "'relu_0' (Relu)" in message and "onnx.checker" in message, message
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "model.onnx").exists()


def test_a_model_a_reported_runtime_cannot_run_is_not_written(tmp_path):
    """A custom-domain op onnxruntime does not implement passes the checker but not the run."""
    from onnx import TensorProto, helper

    from edgekiln.execution.specs import TensorSpec
    from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact

    node = helper.make_node("Frobnicate", ["x"], ["y"], name="frob_0", domain="com.example")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]),
              path)
    art = ModelArtifact(kind=ONNX_FLOAT, path=path, inputs=(TensorSpec("x", (1, 4)),))
    with pytest.raises(EdgekilnError, match=r"inspect \(nothing written\): custom\.onnx does not load in onnxruntime") as err:
        RunFolder(tmp_path / "run").write(command="inspect", model=art, measurements={}, markdown="# i")
    assert "Frobnicate" in str(err.value), str(err.value)
    assert not (tmp_path / "run" / "report.json").exists()
