"""Shared helpers for the update-server tests: an in-process server with a settable clock."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from edgekiln.fleet.server import ServerConfig, create_app

ADMIN = "admin-token-for-tests-0123456789"
T0 = 1_800_000_000.0  # a fixed start time (2027-01-15) for the injected clock


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Server:
    folder: Path
    clock: Clock
    app: Any
    client: TestClient

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def add_device(self, name: str, group: str = "lab") -> dict[str, str]:
        r = self.client.post("/v1/devices", json={"name": name, "group": group}, headers=self.admin())
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def publish(self, bundle_tar: bytes, model: str = "digits", version: int = 1, channel: str = "stable") -> Any:
        return self.client.post(f"/v1/models/{model}/versions/{version}", params={"channel": channel},
                                content=bundle_tar, headers={**self.admin(), "Content-Type": "application/octet-stream"})


def start_server(folder: Path, clock: Clock | None = None, **kw: Any) -> Server:
    clock = clock or Clock()
    fault = kw.pop("fault", None)
    app = create_app(ServerConfig.local(folder, admin_token=ADMIN, **kw), clock=clock, fault=fault)
    return Server(folder, clock, app, TestClient(app))


_TARS: dict[tuple[int, tuple[tuple[str, Any], ...]], bytes] = {}


def bundle_tar(tmp: Path, version: int = 1, **kw: Any) -> bytes:
    """The tar of a sample bundle; built once per (version, options) for the whole test session."""
    import tempfile

    from edgekiln.fleet.client import tar_bundle
    from edgekiln.fleet.sample import sample_bundle

    key = (version, tuple(sorted(kw.items())))
    if key not in _TARS:
        folder = Path(tempfile.mkdtemp(prefix="fleet-test-bundle-")) / "bundle"
        sample_bundle(folder, version=version, **kw)
        _TARS[key] = tar_bundle(folder, folder.parent / "bundle.tar").read_bytes()
    return _TARS[key]
