"""The operator's side of the update server: publish bundles, register devices, drive rollouts.

Every function takes the server URL and the admin token, an optional ``tls``
(:class:`~edgekiln.runtime.transport_security.TlsOptions`: the CA to trust, whether plain http to a
non-loopback host is allowed) and an optional httpx ``transport`` (tests pass
``httpx.ASGITransport(app)`` to talk to the app in-process; the URL check is then skipped). Failures
raise :class:`~edgekiln.errors.EdgekilnError` with one line: unreachable or untrusted server, bad
token, refused, plain http to another host.

    publish("runs/bundle", "http://127.0.0.1:8080", token, "stable", model="digits", version=2)
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError, ServerUnreachable
from edgekiln.runtime.transport_security import TlsOptions, check_server_url

TIMEOUT_S = 60.0
#: a publish waits for the server to store, sign and make deltas from the previous versions (bsdiff:
#: up to 30 s per publish by the server's own budget, seconds of hashing for large bundles)
PUBLISH_TIMEOUT_S = 300.0


def tar_bundle(bundle_dir: str | Path, out: str | Path) -> Path:
    """Write the bundle folder's contents as an uncompressed POSIX tar, byte-for-byte reproducible
    (:func:`~edgekiln.fleet.bundle_tar.write_reproducible`: devices rebuild it for deltas)."""
    from edgekiln.fleet.bundle_tar import write_reproducible

    return write_reproducible(bundle_dir, out)


def _client(server: str, token: str, transport: Any = None, tls: TlsOptions | None = None,
            timeout_s: float = TIMEOUT_S) -> Any:
    import httpx

    tls = tls or TlsOptions()
    if transport is None:
        check_server_url(server, insecure_http=tls.insecure_http)
    return httpx.Client(base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                        transport=transport, timeout=timeout_s, verify=tls.verify())


def _request(server: str, token: str, method: str, path: str, transport: Any = None, *,
             tls: TlsOptions | None = None, timeout_s: float = TIMEOUT_S, **kw: Any) -> Any:
    import httpx

    try:
        with _client(server, token, transport, tls, timeout_s) as c:
            resp = c.request(method, path, **kw)
    except httpx.TransportError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            host = httpx.URL(server).host
            raise ServerUnreachable(f"TLS certificate of {host} not trusted (give --ca FILE)") from None
        raise ServerUnreachable(f"cannot reach the update server at {server} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no answer'})") from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            detail = None
        detail = detail if isinstance(detail, str) else resp.text[:200].strip() or resp.reason_phrase
        hint = {401: " (check --token)", 403: " (this needs the admin token)"}.get(resp.status_code, "")
        raise EdgekilnError(f"server refused {method} {path}: {resp.status_code} {detail}{hint}")
    return resp.json() if resp.content else None


def publish(bundle: str | Path, server: str, token: str, channel: str = "stable", *, model: str | None = None,
            version: int | None = None, transport: Any = None, tls: TlsOptions | None = None) -> dict[str, Any]:
    """Upload a bundle (folder or ``.tar``) as ``model``/``version`` on ``channel``; both default to the
    manifest's ``name`` and ``version``. Returns the server's record (target path, sha256, length)."""
    from edgekiln.runtime.manifest import Manifest

    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="edgekiln-publish-") as tmp:
        if bundle.is_dir():
            tar_path = tar_bundle(bundle, Path(tmp) / "bundle.tar")
        elif bundle.is_file():
            tar_path = bundle
        else:
            raise EdgekilnError(f"{bundle}: no such bundle folder or .tar")
        if model is None or version is None:
            manifest = Manifest.from_dict(_manifest_from_tar(tar_path), f"{bundle}/manifest.json")
            model = model or manifest.name
            if version is None:
                if not manifest.version.isdigit():
                    raise EdgekilnError(f"{bundle}: manifest version '{manifest.version}' is not an integer; "
                                        "pass --version N")
                version = int(manifest.version)
        with open(tar_path, "rb") as fh:
            return _request(server, token, "POST", f"/v1/models/{model}/versions/{version}", transport, tls=tls,
                            timeout_s=PUBLISH_TIMEOUT_S, params={"channel": channel}, content=fh,
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(tar_path.stat().st_size)})


def _manifest_from_tar(tar_path: Path) -> dict[str, Any]:
    try:
        with tarfile.open(tar_path, "r:") as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                raise KeyError("manifest.json")
            return json.load(io.TextIOWrapper(member, encoding="utf-8"))
    except (KeyError, tarfile.TarError, json.JSONDecodeError) as exc:
        raise EdgekilnError(f"{tar_path}: not a bundle tar ({exc})") from None


def add_device(server: str, token: str, name: str, group: str, *, transport: Any = None,
        tls: TlsOptions | None = None) -> dict[str, Any]:
    """Register a device; the answer holds its token, shown only this once."""
    return _request(server, token, "POST", "/v1/devices", transport, tls=tls, json={"name": name, "group": group})


def remove_device(server: str, token: str, name: str, *, transport: Any = None,
        tls: TlsOptions | None = None) -> None:
    """Revoke a device (e.g. lost or stolen): its token stops working."""
    _request(server, token, "DELETE", f"/v1/devices/{name}", transport, tls=tls)


def list_devices(server: str, token: str, *, transport: Any = None,
        tls: TlsOptions | None = None) -> list[dict[str, Any]]:
    return _request(server, token, "GET", "/v1/devices", transport, tls=tls)


def set_group_channel(server: str, token: str, group: str, channel: str, *, transport: Any = None,
        tls: TlsOptions | None = None) -> dict[str, Any]:
    return _request(server, token, "POST", "/v1/groups", transport, tls=tls, json={"name": group, "channel": channel})


def list_models(server: str, token: str, *, transport: Any = None,
        tls: TlsOptions | None = None) -> list[dict[str, Any]]:
    return _request(server, token, "GET", "/v1/models", transport, tls=tls)


def rollout_start(server: str, token: str, model: str, version: int, group: str, *,
                  waves: list[float] | None = None, success_threshold: float = 1.0, failure_threshold: float = 0.2,
                  transport: Any = None, tls: TlsOptions | None = None) -> dict[str, Any]:
    body = {"model": model, "version": version, "group": group, "waves": waves or [100],
            "success_threshold": success_threshold, "failure_threshold": failure_threshold}
    return _request(server, token, "POST", "/v1/rollouts", transport, tls=tls, json=body)


def rollout_pause(server: str, token: str, rollout_id: int, *, transport: Any = None,
        tls: TlsOptions | None = None) -> dict[str, Any]:
    return _request(server, token, "POST", f"/v1/rollouts/{int(rollout_id)}/pause", transport, tls=tls)


def rollout_resume(server: str, token: str, rollout_id: int, *, transport: Any = None,
        tls: TlsOptions | None = None) -> dict[str, Any]:
    return _request(server, token, "POST", f"/v1/rollouts/{int(rollout_id)}/resume", transport, tls=tls)


def rollout_status(server: str, token: str, rollout_id: int | None = None, *,
                   transport: Any = None, tls: TlsOptions | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """One rollout with its devices, or (without an id) the list of rollouts."""
    path = "/v1/rollouts" if rollout_id is None else f"/v1/rollouts/{int(rollout_id)}"
    return _request(server, token, "GET", path, transport, tls=tls)


def device_telemetry(server: str, token: str, name: str, *, limit: int = 20, transport: Any = None,
                     tls: TlsOptions | None = None) -> list[dict[str, Any]]:
    """A device's newest telemetry items (at most ``limit``, newest first)."""
    return _request(server, token, "GET", f"/v1/devices/{name}/telemetry?limit={int(limit)}", transport, tls=tls)


def telemetry_stats(server: str, token: str, *, transport: Any = None,
                    tls: TlsOptions | None = None) -> dict[str, Any]:
    """The server process's telemetry counters: ``{"received": n, "dropped": {reason: n}}``."""
    return _request(server, token, "GET", "/v1/telemetry/stats", transport, tls=tls)
