"""The agent's fetcher: device token on every request, resumable target downloads with Range."""

from __future__ import annotations

import httpx
import pytest
from tuf.api import exceptions as tuf_errors

from edgekiln.errors import EdgekilnError
from edgekiln.fleet.fetcher import DeviceApi, ServerUnreachable, TokenFetcher, make_client

BLOB = bytes(range(256)) * 40          # 10,240 bytes
URL = "http://srv/tuf/targets/digits/2/bundle.tar"


class FakeServer:
    """Serves BLOB with Range support; can ignore Range, or cut the body after ``cut`` bytes."""

    def __init__(self, *, honour_range: bool = True, cut: int | None = None) -> None:
        self.honour_range, self.cut = honour_range, cut
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if "/tuf/metadata/" in request.url.path:
            if request.url.path.endswith("2.root.json"):
                return httpx.Response(404)
            return httpx.Response(200, content=b'{"signed": {}}')
        start, status, headers = 0, 200, {}
        rng = request.headers.get("range")
        if rng and self.honour_range:
            start = int(rng.split("=")[1].rstrip("-"))
            status, headers = 206, {"content-range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"}
        body = BLOB[start:]
        if self.cut is not None:
            cut = self.cut

            def cut_stream():
                yield body[:cut]
                raise httpx.ReadError("connection reset by peer")

            return httpx.Response(status, headers=headers, stream=_Stream(cut_stream()))
        return httpx.Response(status, headers=headers, content=body)


class _Stream(httpx.SyncByteStream):
    def __init__(self, gen):
        self.gen = gen

    def __iter__(self):
        yield from self.gen


def _fetcher(tmp_path, server, chunk=1024):
    client = make_client("http://srv", "device-token", transport=httpx.MockTransport(server))
    return TokenFetcher(client, tmp_path / "download", chunk_size=chunk)


def _download(fetcher):
    with fetcher.download_file(URL, len(BLOB)) as fh:
        return fh.read()


def test_every_request_carries_the_device_token(tmp_path):
    server = FakeServer()
    f = _fetcher(tmp_path, server)
    assert f.download_bytes("http://srv/tuf/metadata/timestamp.json", 1000) == b'{"signed": {}}'
    assert _download(f) == BLOB
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer device-token"] * 2


def test_a_cut_download_keeps_its_bytes_and_resumes_with_range(tmp_path):
    cut = FakeServer(cut=4096)
    f = _fetcher(tmp_path, cut)
    with pytest.raises(tuf_errors.DownloadError, match="resumes on the next attempt"):
        _download(f)
    part = f.partial_path("digits/2/bundle.tar")
    assert part.read_bytes() == BLOB[:4096]
    whole = FakeServer()
    f2 = _fetcher(tmp_path, whole)
    assert _download(f2) == BLOB
    assert whole.requests[0].headers["range"] == "bytes=4096-"
    assert f2.bytes_received == len(BLOB) - 4096, f"received {f2.bytes_received}, expected only the missing bytes"


def test_a_complete_partial_file_is_not_downloaded_again(tmp_path):
    server = FakeServer()
    f = _fetcher(tmp_path, server)
    f.download_dir.mkdir(parents=True)
    f.partial_path("digits/2/bundle.tar").write_bytes(BLOB)
    assert _download(f) == BLOB
    assert server.requests == []


def test_a_server_that_ignores_range_restarts_the_file_cleanly(tmp_path):
    server = FakeServer(honour_range=False)
    f = _fetcher(tmp_path, server)
    f.download_dir.mkdir(parents=True)
    f.partial_path("digits/2/bundle.tar").write_bytes(b"\xff" * 3000)   # junk that must not survive
    assert _download(f) == BLOB


def test_more_bytes_than_the_signed_length_are_refused_and_discarded(tmp_path):
    f = _fetcher(tmp_path, FakeServer())
    with pytest.raises(tuf_errors.DownloadLengthMismatchError), f.download_file(URL, len(BLOB) - 10):
        pass
    assert not f.partial_path("digits/2/bundle.tar").exists()


def test_checkpoint_is_called_after_every_chunk(tmp_path):
    names: list[str] = []
    client = make_client("http://srv", "t", transport=httpx.MockTransport(FakeServer()))
    f = TokenFetcher(client, tmp_path / "d", chunk_size=1024, checkpoint=names.append)
    _download(f)
    assert names == [f"chunk:{i}" for i in range(1, 11)]


def test_http_errors_keep_their_status_for_tuf(tmp_path):
    f = _fetcher(tmp_path, FakeServer())
    with pytest.raises(tuf_errors.DownloadHTTPError) as err:
        f.download_bytes("http://srv/tuf/metadata/2.root.json", 1000)
    assert err.value.status_code == 404


def test_device_api_turns_network_and_auth_failures_into_one_line_errors():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    api = DeviceApi(make_client("http://srv", "t", transport=httpx.MockTransport(refuse)))
    with pytest.raises(ServerUnreachable, match="unreachable") as err:
        api.assignment()
    assert err.value.exit_code == 4 and "\n" not in str(err.value)
    api = DeviceApi(make_client("http://srv", "t", transport=httpx.MockTransport(lambda r: httpx.Response(401))))
    with pytest.raises(EdgekilnError, match="refused the device token"):
        api.assignment()


class _Endless(httpx.SyncByteStream):
    """An answer that does not end (the endless-data attack); counts what it produced. It stops at
    ``give_up`` bytes only so that a fetcher that reads everything fails the test instead of hanging."""

    def __init__(self, piece: int = 4096, give_up: int = 8 << 20) -> None:
        self.piece, self.give_up, self.sent, self.closed = piece, give_up, 0, False

    def __iter__(self):
        while self.sent < self.give_up:
            self.sent += self.piece
            yield b"\0" * self.piece

    def close(self) -> None:
        self.closed = True


def test_an_endless_metadata_answer_is_cut_one_chunk_past_the_limit(tmp_path):
    endless = _Endless()
    f = _fetcher(tmp_path, lambda request: httpx.Response(200, stream=endless), chunk=1 << 16)
    limit = 16384
    with pytest.raises(tuf_errors.DownloadLengthMismatchError, match="larger than the 16384-byte limit"):
        f.download_bytes("http://srv/tuf/metadata/timestamp.json", limit)
    bound = limit + 2 * f.chunk_size
    assert endless.sent <= bound, f"the fetcher pulled {endless.sent} bytes for a {limit}-byte limit (bound {bound})"
    assert endless.closed, "the response must be closed (the connection hung up) when the limit is hit"


def test_metadata_cut_mid_stream_or_compressed_is_a_download_error(tmp_path):
    def cut(request):
        def body():
            yield b"{" * 100
            raise httpx.ReadError("connection reset by peer")

        return httpx.Response(200, stream=_Stream(body()))

    f = _fetcher(tmp_path, cut)
    with pytest.raises(tuf_errors.DownloadError, match="ReadError: connection reset"):
        f.download_bytes("http://srv/tuf/metadata/timestamp.json", 1000)
    gz = _fetcher(tmp_path, lambda r: httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"x"))
    with pytest.raises(tuf_errors.DownloadError, match="'gzip'-encoded answer"):
        gz.download_bytes("http://srv/tuf/metadata/timestamp.json", 1000)
    assert gz.client.headers["accept-encoding"] == "identity"


def test_a_full_disk_during_a_download_deletes_the_part_and_says_so(tmp_path, monkeypatch):
    import errno

    from edgekiln.fleet import fetcher as fetcher_mod
    from edgekiln.fleet.slots import NoSpace

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetcher_mod.os, "fsync", full)
    f = _fetcher(tmp_path, FakeServer())
    with pytest.raises(NoSpace, match=r"need 10240 bytes, \d+ free.*partial file was deleted") as err:
        _download(f)
    assert err.value.needed == len(BLOB) and not f.partial_path("digits/2/bundle.tar").exists()


def test_make_client_refuses_plain_http_off_this_machine_unless_told(tmp_path):
    with pytest.raises(EdgekilnError, match="refusing plain http:// to 10.0.0.2"):
        make_client("http://10.0.0.2:8080", "t")
    assert make_client("http://10.0.0.2:8080", "t", insecure_http=True).base_url.host == "10.0.0.2"
    assert make_client("http://localhost:8080", "t").base_url.host == "localhost"
    assert make_client("http://10.0.0.2", "t", transport=httpx.MockTransport(FakeServer())).base_url.host == "10.0.0.2"
    with pytest.raises(EdgekilnError, match="CA certificate file not found"):
        make_client("https://fleet.example", "t", ca=tmp_path / "missing.pem")


def test_tls_is_verified_against_the_given_ca_and_an_untrusted_certificate_says_so(tmp_path):
    """A real TLS server on loopback (stdlib), certificate from the shipped test CA."""
    import http.server
    import ssl
    import threading

    from edgekiln.fleet.tls_testing import make_test_ca

    ca, cert, key = make_test_ca(tmp_path / "tls")

    class Json(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Json)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert DeviceApi(make_client(url, "t", ca=ca)).assignment() == {}
        with pytest.raises(ServerUnreachable, match=r"TLS certificate of 127.0.0.1 not trusted \(give --ca FILE\)"):
            DeviceApi(make_client(url, "t")).assignment()
        f = TokenFetcher(make_client(url, "t"), tmp_path / "d")
        with pytest.raises(tuf_errors.DownloadError, match="TLS certificate of 127.0.0.1 not trusted"):
            f.download_bytes(f"{url}/tuf/metadata/timestamp.json", 1000)
    finally:
        httpd.shutdown()
        httpd.server_close()
