"""Transport security shared by every HTTP client and server edgekiln runs: TLS or loopback only.

Bearer tokens (device, admin, split) must never cross a network in clear. Clients check the URL
before the first request: ``https://`` always, ``http://`` only to this machine (localhost or a
loopback address) unless the user explicitly passes ``--insecure-http``. Servers take a
certificate and key together, and refuse a key file others can read. Standard library only, so
the device side (agent, split client) can use it.

    >>> check_server_url("https://fleet.example:8443", insecure_http=False)
    'https://fleet.example:8443'
    >>> check_server_url("http://127.0.0.1:8080", insecure_http=False)
    'http://127.0.0.1:8080'
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgekiln.errors import EdgekilnError


@dataclass(frozen=True, kw_only=True)
class TlsOptions:
    """How a client talks to a server: the CA file that signed its certificate (None: the system's
    trust store) and whether plain ``http://`` to a non-loopback host is allowed."""

    ca: str | None = None
    insecure_http: bool = False

    def verify(self) -> ssl.SSLContext | bool:
        """What httpx takes as ``verify=``."""
        return client_ssl_context(self.ca) if self.ca else True


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server_url(url: str, *, insecure_http: bool) -> str:
    """Return ``url`` if tokens sent to it are safe from the network, else raise (exit code 2)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme == "https" and host:
        return url
    if scheme != "http" or not host:
        raise EdgekilnError(f"server URL '{url[:200]}' is not http(s)://HOST[:PORT]")
    if is_loopback_host(host) or insecure_http:
        return url
    raise EdgekilnError(f"refusing plain http:// to {host}: tokens would travel in clear; use https:// with "
                        "--ca FILE, or pass --insecure-http")


def client_ssl_context(ca: str | Path | None) -> ssl.SSLContext:
    """A verifying client context trusting ``ca`` (a PEM file) or, without one, the system store."""
    if ca is None:
        return ssl.create_default_context()
    path = Path(ca)
    if not path.is_file():
        raise EdgekilnError(f"{path}: CA certificate file not found")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise EdgekilnError(f"{path}: not a PEM CA certificate ({exc.reason or exc})") from None


def server_tls_kwargs(cert: str | Path | None, key: str | Path | None) -> dict[str, str]:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile`` for ``--tls-cert``/``--tls-key``: both or neither
    ({} then), the key readable by its owner only."""
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise EdgekilnError("give both --tls-cert FILE and --tls-key FILE, or neither")
    for path, what in ((Path(cert), "TLS certificate"), (Path(key), "TLS key")):
        if not path.is_file():
            raise EdgekilnError(f"{path}: {what} file not found")
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077:
        raise EdgekilnError(f"{key} is readable by group/others (mode {mode:04o}): chmod 600 it")
    try:  # load once here so a mismatched or broken pair is one line, not a uvicorn traceback
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise EdgekilnError(f"{cert}, {key}: not a matching PEM certificate and key ({exc.reason or exc})") from None
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
