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

    client = SplitClient(head, full, "http://127.0.0.1:9")
    client.client = TestClient(create_app(tail, token_hashes=None), base_url="http://split")  # the real app
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

    client = SplitClient(head, full, "http://split", transport=httpx.MockTransport(handler))  # no URL check
    res = client(_x(1))
    assert res.path == "local" and reason in res.reason, res.reason
    np.testing.assert_allclose(res.output, client.full.run(None, {"input": _x(1)})[0], atol=0)


def test_server_rejects_wrong_tensors(parts):
    from fastapi.testclient import TestClient

    _, _, tail = parts
    api = TestClient(create_app(tail, token_hashes=None))
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
    api = TestClient(create_app(tail, token_hashes=None))
    assert api.post("/v1/probe", content=b"\0" * 1234).json() == {"bytes": 1234}


TOKEN = "split-device-token-0123456789"


def test_split_server_needs_a_known_bearer_token(parts):
    from fastapi.testclient import TestClient

    from edgekiln.runtime.split_server import token_hash

    _, _, tail = parts
    api = TestClient(create_app(tail, token_hashes=frozenset({token_hash(TOKEN)})))
    body = pack({"r1": np.zeros((1, 4, 8, 8), np.float32)})
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        for path in ("/v1/tail", "/v1/probe"):
            r = api.post(path, content=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code, r.text)
    assert api.post("/v1/probe", content=b"\0" * 10, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_refused_plain_http_to_another_host(parts):
    from edgekiln.errors import EdgekilnError

    full, head, _ = parts
    with pytest.raises(EdgekilnError, match="refusing plain http:// to 10.0.0.2"):
        SplitClient(head, full, "http://10.0.0.2:8090", token=TOKEN)


def test_a_body_over_the_limit_is_refused_after_at_most_one_more_chunk(parts):
    """At the ASGI level: the body streams in 64 KiB chunks with no Content-Length; the 413 comes
    after at most limit + one chunk was pulled, not after the whole 8 MiB."""
    import asyncio

    _, _, tail = parts
    app = create_app(tail, token_hashes=None, max_body=1024 * 1024)
    chunk, total, pulled = 64 * 1024, 8 * 1024 * 1024, [0]

    async def receive():
        pulled[0] += chunk
        return {"type": "http.request", "body": b"\0" * chunk, "more_body": pulled[0] < total}

    sent = []

    async def send(message):
        sent.append(message)

    for path in ("/v1/tail", "/v1/probe"):
        pulled[0], sent[:] = 0, []
        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [], "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
                 "root_path": ""}
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] == 413, (path, sent[0])
        assert pulled[0] <= 1024 * 1024 + chunk, f"{path}: pulled {pulled[0]} bytes, limit 1 MiB + one {chunk} chunk"


def _npy(shape, data: bytes, descr: str = "<f4") -> bytes:
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _zip(name: str, member: bytes, declare: int | None = None) -> bytes:
    """A one-member stored zip; ``declare`` rewrites its central directory's sizes (a lying zip)."""
    import io
    import struct
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, member)
    data = bytearray(buf.getvalue())
    if declare is not None:
        at = data.rindex(b"PK\x01\x02")   # the central directory entry: sizes at +20 (compressed) and +24
        data[at + 20:at + 28] = struct.pack("<II", declare, declare)
    return bytes(data)


@pytest.mark.parametrize("case", ["huge shape", "huge zip size"])
def test_npz_declared_sizes_are_checked_before_reading(parts, case):
    import time

    from fastapi.testclient import TestClient

    _, _, tail = parts
    api = TestClient(create_app(tail, token_hashes=None))
    if case == "huge shape":   # (10**9,) float32 = 4 GB declared over 16 bytes of data
        body = _zip("r1.npy", _npy((10**9,), b"\0" * 16))
    else:                      # a central directory declaring a 4 GB member in a 200-byte body
        body = _zip("r1.npy", _npy((2,), b"\0" * 8), declare=0xFFFFFFF0)
    start = time.perf_counter()
    r = api.post("/v1/tail", content=body)
    took = time.perf_counter() - start
    assert r.status_code == 400 and "declared size" in r.json()["detail"], (case, r.status_code, r.text)
    assert took < 0.5, f"{case}: refusing took {took:.2f} s (limit 0.5 s: nothing may be allocated first)"


def test_split_serve_refuses_to_start_unprotected(parts, monkeypatch, capsys):
    from edgekiln.cli.app import main
    from edgekiln.cli.split_cmd import serve_command
    from edgekiln.errors import EdgekilnError

    _, _, tail = parts
    monkeypatch.delenv("EDGEKILN_SPLIT_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["split", "serve", str(tail)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "no split tokens: pass --token-file FILE" in err and len(err.splitlines()) == 1, err
    defaults = {"host": "127.0.0.1", "port": 0, "threads": 1, "token_file": None, "no_auth": False, "tls_cert": None,
                "tls_key": None, "insecure_http": False}
    for env, options, message in [
        ("", {"no_auth": True, "host": "0.0.0.0", "insecure_http": True}, "--no-auth is allowed only on a loopback"),
        (TOKEN, {"host": "0.0.0.0"}, "refusing to serve plain http on 0.0.0.0"),
        ("short", {}, "split token of 5 characters refused"),
    ]:
        monkeypatch.setenv("EDGEKILN_SPLIT_TOKEN", env)
        with pytest.raises(EdgekilnError, match=message):
            serve_command(tail, **{**defaults, **options})
