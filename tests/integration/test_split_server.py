"""The device keeps answering when the real tail server (uvicorn on loopback) is down, slow,
failing or answering garbage; and takes the split path (over https, with its token) when the
server is healthy."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from edgekiln.runtime.split_exec import SplitClient, cut_model
from edgekiln.runtime.split_server import create_app
from edgekiln.testing.tiny import tiny_conv_onnx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Served:
    """uvicorn serving ``app`` on a loopback port in a thread, stopped on exit."""

    def __init__(self, app, **tls) -> None:
        import uvicorn

        self.port = _free_port()
        self.scheme = "https" if tls else "http"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **tls))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
            time.sleep(0.02)
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _slow(app, seconds):
    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            await asyncio.sleep(seconds)
        await app(scope, receive, send)
    return wrapped


def _garbage(app, body: bytes):
    """The real app runs; its answer's body is replaced by ``body`` (a broken proxy, a bad disk)."""
    async def wrapped(scope, receive, send):
        async def corrupting(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(k, v) for k, v in message["headers"] if k != b"content-length"]
                           + [(b"content-length", str(len(body)).encode())]}
            elif message["type"] == "http.response.body":
                message = {**message, "body": body if not message.get("more_body") else b""}
            await send(message)
        await app(scope, receive, corrupting)
    return wrapped


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    full = tiny_conv_onnx(d / "full.onnx")
    head, tail = cut_model(full, ["r1"], d / "cut")
    other = tiny_conv_onnx(d / "other.onnx", seed=5)
    _, wrong_tail = cut_model(other, ["f1"], d / "other-cut")   # expects 'f1', the device sends 'r1'
    return full, head, tail, wrong_tail


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 1, 8, 8)).astype(np.float32)


def _local(client, x):
    return client.full.run(None, {"input": x})[0]


def test_healthy_server_takes_the_split_path_and_matches_the_device(parts, tmp_path):
    from edgekiln.fleet.tls_testing import make_test_ca
    from edgekiln.runtime.split_server import token_hash

    full, head, tail, _ = parts
    ca, cert, key = make_test_ca(tmp_path)
    token = "split-device-token-0123456789"
    app = create_app(tail, token_hashes=frozenset({token_hash(token)}))
    with _Served(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
        client, anonymous = (SplitClient(head, full, url, timeout_s=5.0, token=t, ca=ca) for t in (token, None))
        res, refused = client(_x()), anonymous(_x())
        client.client.close()
        anonymous.client.close()
    assert url.startswith("https://") and res.path == "split", res.reason
    assert refused.path == "local" and refused.reason == "server answered 401", refused.reason
    scale = float(np.abs(_local(client, _x())).max())
    err = float(np.abs(res.output - _local(client, _x())).max())
    assert err <= 1e-6 * scale, f"split output differs from on-device by {err} (output scale {scale})"


def test_server_down_falls_back_to_the_device(parts):
    full, head, _, _ = parts
    client = SplitClient(head, full, f"http://127.0.0.1:{_free_port()}", timeout_s=2.0)  # nothing listens
    res = client(_x(1))
    assert res.path == "local" and "ConnectError" in res.reason, res.reason
    np.testing.assert_array_equal(res.output, _local(client, _x(1)))
    assert client.paths == {"split": 0, "local": 1}


def test_slow_server_times_out_and_the_device_answers_in_time(parts):
    full, head, tail, _ = parts
    with _Served(_slow(create_app(tail, token_hashes=None), 2.0)) as url:
        client = SplitClient(head, full, url, timeout_s=0.3)
        res = client(_x(2))
    assert res.path == "local" and "Timeout" in res.reason, res.reason
    assert res.latency_ms < 1500, f"the fallback took {res.latency_ms:.0f} ms with a 300 ms timeout"
    np.testing.assert_array_equal(res.output, _local(client, _x(2)))


@pytest.mark.parametrize("body,reason", [
    (b"\x00garbage, not an npz", "not an npz of arrays"),
    (None, "not the expected output"),          # a valid npz holding the wrong array
])
def test_garbage_answers_fall_back(parts, body, reason):
    from edgekiln.runtime.split_exec import pack

    full, head, tail, _ = parts
    if body is None:
        body = pack({"logits": np.zeros((1, 3), np.float32)})   # right name, wrong shape
    with _Served(_garbage(create_app(tail, token_hashes=None), body)) as url:
        client = SplitClient(head, full, url, timeout_s=5.0)
        res = client(_x(3))
    assert res.path == "local" and reason in res.reason, res.reason
    np.testing.assert_array_equal(res.output, _local(client, _x(3)))


def test_server_serving_the_wrong_tail_is_refused_and_the_device_answers(parts):
    full, head, _, wrong_tail = parts
    with _Served(create_app(wrong_tail, token_hashes=None)) as url:
        client = SplitClient(head, full, url, timeout_s=5.0)
        res = client(_x(4))
    assert res.path == "local" and res.reason == "server answered 400", res.reason
    np.testing.assert_array_equal(res.output, _local(client, _x(4)))
