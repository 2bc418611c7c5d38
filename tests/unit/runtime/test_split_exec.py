"""Split execution: head + tail equal the full model; the device always answers."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from edgekiln.runtime.split_exec import SplitClient, cut_model, pack
from edgekiln.runtime.split_server import create_app
from edgekiln.testing.tiny import tiny_conv_onnx


@pytest.fixture
def parts(tmp_path):
    full = tiny_conv_onnx(tmp_path / "full.onnx")
    head, tail = cut_model(full, ["r1"], tmp_path / "split")
    return full, head, tail


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 1, 8, 8)).astype(np.float32)


def test_split_equals_full_model(parts):
    full, head, tail = parts
    from fastapi.testclient import TestClient

    client = SplitClient(head, full, "http://split")
    client.client = TestClient(create_app(tail), base_url="http://split")  # the real app, in-process
    res = client(_x())
    local = client.full.run(None, {"input": _x()})[0]
    assert res.path == "split", res.reason
    np.testing.assert_allclose(res.output, local, atol=1e-5)


@pytest.mark.parametrize("server,reason", [
    ("down", "ConnectError"),
    ("error", "server answered 500"),
    ("garbage", "not the expected output"),
    ("slow", "Timeout"),
])
def test_device_falls_back_and_says_why(parts, server, reason):
    full, head, _ = parts

    def handler(request: httpx.Request) -> httpx.Response:
        if server == "down":
            raise httpx.ConnectError("connection refused")
        if server == "error":
            return httpx.Response(500)
        if server == "slow":
            raise httpx.ReadTimeout("timed out")
        return httpx.Response(200, content=pack({"logits": np.full((1, 10), np.nan, np.float32)}))

    client = SplitClient(head, full, "http://split", transport=httpx.MockTransport(handler))
    res = client(_x(1))
    assert res.path == "local" and reason in res.reason, res.reason
    np.testing.assert_allclose(res.output, client.full.run(None, {"input": _x(1)})[0], atol=0)


def test_server_rejects_wrong_tensors(parts):
    from fastapi.testclient import TestClient

    _, _, tail = parts
    api = TestClient(create_app(tail))
    assert api.post("/v1/tail", content=b"not an npz").status_code == 400
    bad = api.post("/v1/tail", content=pack({"wrong": np.zeros(3, np.float32)}))
    assert bad.status_code == 400 and "expected tensors" in bad.json()["detail"]


def test_probe_link_recovers_rtt_and_bandwidth():
    """A fake clock that a request advances by 4 ms + bytes / (20 Mbit/s): the fit returns both."""
    import edgekiln.runtime.split_exec as se

    clock = [0]   # nanoseconds

    def handler(request: httpx.Request) -> httpx.Response:
        clock[0] += round(4e6 + len(request.content) * 8 / 20e6 * 1e9)
        return httpx.Response(200, json={"bytes": len(request.content)})

    link = se.probe_link(httpx.Client(base_url="http://s", transport=httpx.MockTransport(handler)), repeats=3,
                         clock=lambda: clock[0])
    assert link["rtt_ms"] == pytest.approx(4.0, rel=1e-6) and link["bandwidth_bps"] == pytest.approx(20e6, rel=1e-6)


def test_server_probe_endpoint_reads_the_body(parts):
    from fastapi.testclient import TestClient

    _, _, tail = parts
    api = TestClient(create_app(tail))
    assert api.post("/v1/probe", content=b"\0" * 1234).json() == {"bytes": 1234}
