"""A man in the middle for the fleet tests: an HTTP proxy on 127.0.0.1 that forwards to the real
update server and can rewrite any answer, or answer a path with an endless stream of zeros.

    with MitmProxy(upstream_url) as proxy:
        proxy.rewrite = lambda path, status, headers, body: (status, headers, body.replace(b"a", b"b"))
        agent = Agent(AgentConfig(server=proxy.url, ...))
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

Rewrite = Callable[[str, int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
ENDLESS_CAP = 64 << 20   # NOTE: a test must fail, not hang, if the client never hangs up


class MitmProxy:
    """``rewrite(path, status, headers, body) -> (status, headers, body)`` sees every answer;
    ``endless(path)`` true answers 200 with zeros until the client hangs up (``endless_sent``
    counts them). ``paths`` lists every request path, in order."""

    def __init__(self, upstream: str) -> None:
        self.upstream = httpx.Client(base_url=upstream, timeout=30)
        self.rewrite: Rewrite | None = None
        self.endless: Callable[[str], bool] = lambda path: False
        self.endless_sent = 0
        self.paths: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, "GET")

            def do_POST(self) -> None:
                proxy._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="mitm-proxy", daemon=True)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path
        self.paths.append(path.split("?", 1)[0])
        if self.endless(path):
            self._send_endless(h)
            return
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        resp = self.upstream.request(method, path, headers=headers, content=body)
        status, out_headers, data = resp.status_code, {k: v for k, v in resp.headers.items()
                                                         if k.lower() not in HOP_BY_HOP}, resp.content
        if self.rewrite is not None:
            status, out_headers, data = self.rewrite(path, status, out_headers, data)
        h.send_response(status)
        for k, v in out_headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _send_endless(self, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        chunk = b"0" * (64 << 10)
        try:
            while self.endless_sent < ENDLESS_CAP:
                h.wfile.write(chunk)
                self.endless_sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def __enter__(self) -> MitmProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


class TcpRelay:
    """A passive man in the middle: relays raw TCP to ``127.0.0.1:target_port`` and keeps a copy of
    every byte in both directions (``captured``), as a network tap would."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        self.captured = bytearray()
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._accept, name="tcp-relay", daemon=True)

    def _accept(self) -> None:
        import socket

        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        import socket

        try:
            while data := src.recv(65536):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> TcpRelay:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self.listener.close()
