"""The LiteRT runtime adapter: float NCHW feeds are quantized like pre-quantized int8 NHWC feeds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is an optional extra")

from edgekiln.codegen.ir import load_qdq  # noqa: E402
from edgekiln.codegen.tflite.check import quantize_for  # noqa: E402
from edgekiln.codegen.tflite.testmodels import build_qdq  # noqa: E402
from edgekiln.codegen.tflite.writer import write_tflite  # noqa: E402
from edgekiln.errors import EdgekilnError  # noqa: E402
from edgekiln.execution.runtimes import litert_rt  # noqa: E402


def test_litert_session_accepts_float_nchw_and_int8_nhwc_feeds(tmp_path):
    qdq, x = build_qdq("dwres", tmp_path, seed=1, n_eval=4)
    g = load_qdq(qdq)
    path = write_tflite(g, tmp_path / "m.tflite")
    assert litert_rt.available() is None
    sess = litert_rt.load(path, threads=1)
    name = sess.input_names[0]
    assert sess.input_shapes[0] == (1, 10, 10, 3) and sess.input_dtypes[0] == np.int8
    t = g.tensors[g.input]
    for i in range(len(x)):
        xf = x[i: i + 1]
        xq = quantize_for(xf.transpose(0, 2, 3, 1), t.scale, t.zero_point)
        a, b = sess.run({name: xf})[0], sess.run({name: xq})[0]
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int8 and a.shape == (1, 5)
    with pytest.raises(EdgekilnError, match="missing feed"):
        sess.run({})
    with pytest.raises(EdgekilnError, match="runs .tflite files"):
        litert_rt.load(qdq)
