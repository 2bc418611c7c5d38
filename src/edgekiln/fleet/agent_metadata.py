"""The agent's TUF side: how a refresh of signed metadata fails, in one line each.

The agent reads two TUF repositories (docs/fleet-protocol.md): the director (``/director/metadata/``,
what this device must run) and the image repository (``/tuf/metadata/``, what each bundle is).
:func:`refresh` turns python-tuf's errors into :class:`MetadataRefused` (an attack or a broken
server: refused, reported) or :class:`~edgekiln.errors.ServerUnreachable` (an outage: retried).

>>> DIRECTOR_LIMITS["timestamp_max_length"]
16384
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuf.ngclient import FetcherInterface

from edgekiln.errors import EdgekilnError, ServerUnreachable

ASSIGNMENT = "assignment"   # the one target of a device's director repository (fleet/director.py)
DIRECTOR_LIMITS = {"timestamp_max_length": 16 * 1024, "snapshot_max_length": 16 * 1024,
                   "targets_max_length": 64 * 1024}   # bytes; far above a one-target repository's files


class MetadataRefused(EdgekilnError):
    """Signed metadata failed verification (or was too large); the update is refused, not retried now."""


class NamedFetcher(FetcherInterface):
    """Delegates to the agent's ``TokenFetcher`` and remembers the last URL, so a refused
    metadata file can be named in the error."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.last_url = inner, ""

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.inner._fetch(url)   # type: ignore[no-any-return]

    def download_file(self, url: str, max_length: int) -> Any:
        self.last_url = url
        return self.inner.download_file(url, max_length)


def refresh(updater: Any, fetcher: NamedFetcher, server: Any) -> None:
    """``updater.refresh()`` (``fetcher`` is the updater's) with its errors as
    :class:`MetadataRefused` or :class:`ServerUnreachable`."""
    from tuf.api import exceptions as tuf_errors

    try:
        updater.refresh()
    except tuf_errors.DownloadLengthMismatchError:
        # NOTE: before DownloadError, its parent: an endless answer is an attack, not an outage.
        name = fetcher.last_url.rsplit("/", 1)[-1][:64]
        role = name.split(".")[-2] if name.count(".") else name
        limit = getattr(updater.config, f"{role}_max_length", "?")
        raise MetadataRefused(f"metadata refused: {name} is larger than the {limit}-byte limit "
                              "(endless-data attack?)") from None
    except tuf_errors.DownloadHTTPError as exc:
        if exc.status_code >= 500:
            raise ServerUnreachable(f"update server {server} error while fetching metadata ({exc})") from None
        if exc.status_code in (401, 403):   # NOTE: a revoked token: no report could be sent either
            raise EdgekilnError(f"update server refused the device token ({exc})") from None
        raise MetadataRefused(f"metadata refused by the server: {exc}") from None
    except tuf_errors.DownloadError as exc:
        raise ServerUnreachable(f"update server {server} unreachable while fetching metadata ({exc})") from None
    except tuf_errors.ExpiredMetadataError as exc:
        raise MetadataRefused(f"metadata refused as expired (freeze attack?): {exc}") from None
    except tuf_errors.BadVersionNumberError as exc:
        raise MetadataRefused(f"metadata refused as older than already seen (rollback attack?): {exc}") from None
    except tuf_errors.UnsignedMetadataError as exc:
        raise MetadataRefused(f"metadata refused: not signed by the trusted keys: {exc}") from None
    except tuf_errors.RepositoryError as exc:
        raise MetadataRefused(f"metadata refused: {type(exc).__name__}: {exc}") from None


def stored_root(folder: Path) -> bytes | None:
    """The newest root a device trusted in a TUF metadata folder, or None (not enrolled)."""
    stored = folder / "root.json"
    if stored.is_file():
        return stored.read_bytes()
    # NOTE: python-tuf re-creates the root.json symlink by unlink + symlink; a crash in between
    # leaves only root_history/, whose newest file is the newest root this device trusted.
    history = sorted((folder / "root_history").glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]))
    return history[-1].read_bytes() if history else None
