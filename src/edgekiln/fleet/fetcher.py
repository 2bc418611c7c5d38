"""The agent's HTTP side: a ``tuf.ngclient`` fetcher over httpx that sends the device token and
resumes target downloads with ``Range``, plus the small JSON client for assignment and reports.

Target downloads go to ``STATE/download/<quoted target path>.part``, appended chunk by chunk;
a download that is cut (network, ``kill -9``, power) continues from the bytes already on disk
with ``Range: bytes=N-``. Whatever was resumed, ``tuf.ngclient.Updater`` verifies the complete
file against the length and SHA-256 of the signed targets metadata before the agent uses it.

>>> f = TokenFetcher("http://127.0.0.1:8080", "tok", "/var/lib/edgekiln/download")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from edgekiln.errors import EdgekilnError, ServerUnreachable
from edgekiln.fleet.slots import NO_SPACE_ERRNOS, NoSpace
from edgekiln.runtime.transport_security import check_server_url, client_ssl_context

DEFAULT_CHUNK = 1 << 16
FSYNC_EVERY = 1 << 20   # NOTE: durability of a .part only saves re-downloading; TUF checks correctness


def make_client(server: str, token: str, *, timeout_s: float = 30.0, transport: Any = None,
                ca: str | Path | None = None, insecure_http: bool = False) -> httpx.Client:
    """The device's httpx client: the token on every request, TLS verified against ``ca`` (a PEM
    file; None: the default trust store). Plain ``http://`` is refused unless the server is this
    machine or ``insecure_http`` is given; an injected ``transport`` (tests, in-process server)
    never touches the network, so its URL is not checked.

    >>> make_client("http://10.0.0.2:8080", "tok")
    Traceback (most recent call last):
    edgekiln.errors.EdgekilnError: refusing plain http:// to 10.0.0.2: tokens would travel in clear; use https:// with --ca FILE, or pass --insecure-http
    """
    verify: Any = True
    if transport is None:
        check_server_url(server, insecure_http=insecure_http)
        verify = client_ssl_context(ca) if ca is not None else True
    # NOTE: identity encoding only (see ``_body``): our server never compresses.
    return httpx.Client(base_url=server.rstrip("/"), timeout=timeout_s, transport=transport, verify=verify,
                        headers={"Authorization": f"Bearer {token}", "User-Agent": "edgekiln-agent",
                                 "Accept-Encoding": "identity"})


class TokenFetcher(FetcherInterface):
    """``FetcherInterface`` over an httpx client that carries the device token.

    Metadata is streamed and dropped one byte past python-tuf's ``max_length`` (an endless answer
    costs at most one chunk more). Targets (URLs under ``/tuf/targets/``) are resumable: see the
    module docstring. ``checkpoint("chunk:N")`` is called after every chunk is on disk. A full
    disk raises :class:`~edgekiln.fleet.slots.NoSpace` with the ``.part`` deleted.
    """

    def __init__(self, client: httpx.Client, download_dir: str | Path, *, chunk_size: int = DEFAULT_CHUNK,
                 checkpoint: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.download_dir = Path(download_dir)
        self.chunk_size = max(512, int(chunk_size))
        self.checkpoint = checkpoint or (lambda name: None)
        self.resumed_from: dict[str, int] = {}    # target path -> byte offset its last request started at
        self.bytes_received = 0                   # target bytes received by this fetcher (not metadata)

    # --- what tuf.ngclient calls --------------------------------------------------------------
    def _fetch(self, url: str) -> Iterator[bytes]:
        """Stream the body in chunks, so the caller's byte limit stops an endless answer early.

        Run it under :func:`contextlib.closing` (as :meth:`download_file` does): closing the
        generator closes the response and hangs up on the server.
        """
        try:
            with self.client.stream("GET", url) as resp:
                _raise_for_status(resp, url)
                yield from _body(resp, url, self.chunk_size)
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"{url}: {_transport_problem(exc, url)}") from exc

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        target = _target_path(url)
        if target is None:
            with tempfile.TemporaryFile() as fh:
                self._download_small(url, max_length, fh)
                yield fh
            return
        part = self.partial_path(target)
        self._download_resumable(url, target, part, max_length)
        try:
            with open(part, "rb") as fh:
                yield fh
        except OSError as exc:
            # NOTE: python-tuf copies the verified .part to its destination inside this block.
            if exc.errno not in NO_SPACE_ERRNOS:
                raise
            part.unlink(missing_ok=True)
            raise NoSpace(self.download_dir, needed=max_length) from None

    def _download_small(self, url: str, max_length: int, out: IO[bytes]) -> None:
        """Metadata: at most ``max_length`` bytes into ``out``; one byte more and we hang up."""
        received = 0
        with closing(self._fetch(url)) as chunks:
            for chunk in chunks:
                received += len(chunk)
                if received > max_length:
                    raise tuf_errors.DownloadLengthMismatchError(
                        f"{url}: larger than the {max_length}-byte limit; stopped after {received} bytes")
                out.write(chunk)
        out.seek(0)

    # --- resumable download -------------------------------------------------------------------
    def partial_path(self, target_path: str) -> Path:
        return self.download_dir / (quote(target_path, safe="") + ".part")

    def _download_resumable(self, url: str, target: str, part: Path, max_length: int) -> None:
        self.download_dir.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > max_length:
            part.unlink()
            have = 0
        if have == max_length:
            return  # complete on disk: the caller verifies it
        self.resumed_from[target] = have
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self.client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 416:
                    # The server's file is shorter than what we hold: what we hold is not it.
                    part.unlink(missing_ok=True)
                    raise tuf_errors.DownloadError(f"{url}: partial download does not match the server's file; "
                                                   "discarded")
                _raise_for_status(resp, url)
                start = _start_offset(resp, have, url)
                self._append(resp, part, start, max_length, url)
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"{url}: download cut after {_size(part)} of {max_length} bytes "
                                           f"({_transport_problem(exc, url)}); it resumes on the next attempt") from exc
        got = _size(part)
        if got < max_length:
            raise tuf_errors.DownloadError(f"{url}: the server sent {got} of {max_length} bytes; "
                                           "the download resumes on the next attempt")

    def _append(self, resp: httpx.Response, part: Path, start: int, max_length: int, url: str) -> None:
        try:
            self._write_chunks(resp, part, start, max_length, url)
        except OSError as exc:
            if exc.errno not in NO_SPACE_ERRNOS:
                raise
            # NOTE: a .part that filled the disk is worth nothing (the next try re-checks the
            # space first); keeping it would leave the device with no room for state.json.
            got = _size(part)
            part.unlink(missing_ok=True)
            raise NoSpace(self.download_dir, needed=max_length - start, note=f"after {got} of {max_length} bytes "
                          "of the download; the partial file was deleted") from None

    def _write_chunks(self, resp: httpx.Response, part: Path, start: int, max_length: int, url: str) -> None:
        mode = "r+b" if start and part.exists() else "wb"
        written, since_sync, chunk_no = start, 0, 0
        with open(part, mode) as out:
            out.seek(start)
            out.truncate()
            for chunk in _body(resp, url, self.chunk_size):
                if written + len(chunk) > max_length:
                    out.close()
                    part.unlink(missing_ok=True)
                    raise tuf_errors.DownloadLengthMismatchError(
                        f"{url}: more than the {max_length} bytes the signed metadata allows; discarded")
                out.write(chunk)
                out.flush()
                self.bytes_received += len(chunk)
                written += len(chunk)
                since_sync += len(chunk)
                if since_sync >= FSYNC_EVERY:
                    os.fsync(out.fileno())
                    since_sync = 0
                chunk_no += 1
                self.checkpoint(f"chunk:{chunk_no}")
            os.fsync(out.fileno())

    def discard(self, target_path: str) -> None:
        self.partial_path(target_path).unlink(missing_ok=True)


def _target_path(url: str) -> str | None:
    marker = "/tuf/targets/"
    if marker not in url:
        return None
    return unquote(url.split(marker, 1)[1])


def _start_offset(resp: httpx.Response, have: int, url: str) -> int:
    """Where the body starts: ``have`` for a 206 that resumes there, 0 for a full 200 answer."""
    if resp.status_code == 206 and have:
        content_range = resp.headers.get("content-range", "")
        try:
            first = int(content_range.split()[1].split("-")[0])
        except (IndexError, ValueError):
            raise tuf_errors.DownloadError(f"{url}: 206 answer without a usable Content-Range") from None
        if first != have:
            raise tuf_errors.DownloadError(f"{url}: asked to resume at {have}, the server sent from {first}")
        return have
    return 0  # the server ignored Range (200): start over


def _body(resp: httpx.Response, url: str, chunk_size: int) -> Iterator[bytes]:
    """The body in chunks. A compressed answer (we asked for identity) is refused before reading:
    decompressing could expand one chunk far past the byte limits counted here."""
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise tuf_errors.DownloadError(f"{url}: the server sent a '{encoding[:40]}'-encoded answer; "
                                       "only identity was asked for")
    return resp.iter_bytes(chunk_size)


def _raise_for_status(resp: httpx.Response, url: str) -> None:
    if resp.status_code >= 400:
        raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {resp.status_code}", resp.status_code)


def _transport_problem(exc: httpx.HTTPError, url: str) -> str:
    """One line for a network failure; an untrusted TLS certificate says what to do about it."""
    cause: BaseException | None = exc
    for _ in range(8):   # httpx -> httpcore -> ssl; bounded in case a chain loops
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            return f"TLS certificate of {httpx.URL(url).host} not trusted (give --ca FILE)"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {str(exc)[:120]}"


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class DeviceApi:
    """The JSON endpoints a device uses: assignment, report, settings and telemetry. Errors become one-line messages."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"update server {self.client.base_url} unreachable "
                                    f"({_transport_problem(exc, str(self.client.base_url))})") from None
        if resp.status_code in (401, 403):
            raise EdgekilnError(f"update server refused the device token on {path} (HTTP {resp.status_code})")
        if resp.status_code >= 500:
            raise ServerUnreachable(f"update server error on {path} (HTTP {resp.status_code})")
        if resp.status_code >= 400:
            raise EdgekilnError(f"update server refused {method} {path} (HTTP {resp.status_code}: {resp.text[:200]})")
        try:
            return resp.json()
        except ValueError:
            raise ServerUnreachable(f"update server answered {path} with something that is not JSON") from None

    def assignment(self) -> dict[str, Any]:
        data = self._call("GET", "/v1/device/assignment")
        if not isinstance(data, dict):
            raise EdgekilnError("update server: assignment is not a JSON object")
        return data

    def report(self, body: dict[str, Any]) -> None:
        self._call("POST", "/v1/device/report", json=body)

    def settings(self) -> dict[str, Any]:
        """``GET /v1/device/settings``: ``{"mqtt": url|null, "websocket": path|null, "push_poll_s",
        "telemetry_every_s"}``; ``{}`` from a server that predates push (404)."""
        try:
            data = self._call("GET", "/v1/device/settings")
        except EdgekilnError as exc:
            if "(HTTP 404" in str(exc):
                return {}
            raise
        if not isinstance(data, dict):
            raise EdgekilnError("update server: settings is not a JSON object")
        return data

    def telemetry(self, batch: list[dict[str, Any]]) -> None:
        self._call("POST", "/v1/device/telemetry", json={"batch": batch})
