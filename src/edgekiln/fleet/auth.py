"""Who is calling: the admin (one token from the server's start) or a registered device.

Tokens are never stored: the server keeps SHA-256 hashes and compares hashes in constant time.
A device token is looked up by its hash (an index lookup reveals nothing an attacker could time:
the hash of a guess says nothing about the hash of the real token).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fleet.registry import FleetError, token_hash

TOKEN_CACHE_S = 30.0
ADMIN_TOKEN_REFUSED = ("admin token refused: use at least 16 characters with at least 8 different ones "
                       "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")


def check_admin_token(token: str | None) -> str:
    """Refuse a weak admin token before anything is created; return it unchanged.

    At least 16 characters, at least 8 distinct ones, and no character more than a quarter of
    the token (``"ab" * 8`` and ``"a" * 32`` are refused).

    >>> check_admin_token("correct-horse-battery-9")
    'correct-horse-battery-9'
    >>> check_admin_token("a" * 32)
    Traceback (most recent call last):
    ...
    edgekiln.errors.EdgekilnError: admin token refused: ...
    """
    text = token or ""
    counts = Counter(text)
    if len(text) < 16 or len(counts) < 8 or max(counts.values()) * 4 > len(text):
        raise EdgekilnError(ADMIN_TOKEN_REFUSED, exit_code=2)
    return text


@dataclass(frozen=True)
class Principal:
    kind: str                  # "admin" | "device"
    device: str | None = None


class Authenticator:
    def __init__(self, registry: Any, admin_token: str | None) -> None:
        if admin_token is not None:
            check_admin_token(admin_token)
        self.registry = registry
        self._admin_hash = token_hash(admin_token) if admin_token else None
        # NOTE: hash -> (device, when cached). Bounded in time so that a token revoked through another
        # server process stops working within TOKEN_CACHE_S; revocation through this one is immediate.
        self._devices: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def cached(self, authorization: str | None) -> bool:
        """Whether :meth:`principal` can answer without the database."""
        if not authorization or not authorization.startswith("Bearer ") or len(authorization) > 512:
            return True
        digest = token_hash(authorization[len("Bearer "):].strip())
        hit = self._devices.get(digest)
        return digest == self._admin_hash or (hit is not None and time.monotonic() - hit[1] < TOKEN_CACHE_S)

    def principal(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.startswith("Bearer ") or len(authorization) > 512:
            raise FleetError("missing bearer token (send 'Authorization: Bearer <token>')", 401)
        digest = token_hash(authorization[len("Bearer "):].strip())
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal("admin")
        with self._lock:
            hit = self._devices.get(digest)
        if hit is not None and time.monotonic() - hit[1] < TOKEN_CACHE_S:
            return Principal("device", hit[0])
        name = self.registry.device_by_token_hash(digest)
        if name is None:
            raise FleetError("unknown token", 401)
        with self._lock:
            self._devices[digest] = (name, time.monotonic())
        return Principal("device", name)

    def forget(self, device: str) -> None:
        """Drop a revoked device's cached token."""
        with self._lock:
            for digest in [d for d, (name, _) in self._devices.items() if name == device]:
                del self._devices[digest]
