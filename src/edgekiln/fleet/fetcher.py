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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from edgekiln.errors import EdgekilnError, ServerUnreachable

DEFAULT_CHUNK = 1 << 16
FSYNC_EVERY = 1 << 20   # NOTE: durability of a .part only saves re-downloading; TUF checks correctness


def make_client(server: str, token: str, *, timeout_s: float = 30.0, transport: Any = None) -> httpx.Client:
    return httpx.Client(base_url=server.rstrip("/"), timeout=timeout_s, transport=transport,
                        headers={"Authorization": f"Bearer {token}", "User-Agent": "edgekiln-agent"})


class TokenFetcher(FetcherInterface):
    """``FetcherInterface`` over an httpx client that carries the device token.

    Metadata is fetched whole. Targets (URLs under ``/tuf/targets/``) are resumable: see the
    module docstring. ``checkpoint("chunk:N")`` is called after every chunk is on disk.
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
        try:
            resp = self.client.get(url)
        except httpx.TransportError as exc:
            raise tuf_errors.DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
        _raise_for_status(resp, url)
        return iter([resp.content])

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        target = _target_path(url)
        if target is None:
            with super().download_file(url, max_length) as fh:
                yield fh
            return
        part = self.partial_path(target)
        self._download_resumable(url, target, part, max_length)
        with open(part, "rb") as fh:
            yield fh

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
        except httpx.TransportError as exc:
            raise tuf_errors.DownloadError(f"{url}: download cut after {_size(part)} of {max_length} bytes "
                                           f"({type(exc).__name__}); it resumes on the next attempt") from exc
        got = _size(part)
        if got < max_length:
            raise tuf_errors.DownloadError(f"{url}: the server sent {got} of {max_length} bytes; "
                                           "the download resumes on the next attempt")

    def _append(self, resp: httpx.Response, part: Path, start: int, max_length: int, url: str) -> None:
        mode = "r+b" if start and part.exists() else "wb"
        written, since_sync, chunk_no = start, 0, 0
        with open(part, mode) as out:
            out.seek(start)
            out.truncate()
            for chunk in resp.iter_bytes(self.chunk_size):
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


def _raise_for_status(resp: httpx.Response, url: str) -> None:
    if resp.status_code >= 400:
        raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {resp.status_code}", resp.status_code)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class DeviceApi:
    """The JSON endpoints a device uses: assignment and report. Errors become one-line messages."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"update server {self.client.base_url} unreachable "
                                    f"({type(exc).__name__}: {str(exc)[:120]})") from None
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
