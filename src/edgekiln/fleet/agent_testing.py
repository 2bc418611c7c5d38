"""Helpers for testing the update agent against a real server: tiny bundle tars and a loopback
uvicorn server in a thread. Shipped with the library so users' own fleet tests can use them.

>>> tar = bundle_tar("/tmp/b", name="digits", version=1)          # doctest: +SKIP
>>> with LoopbackServer(app) as url: ...                                # doctest: +SKIP
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any


def bundle_tar(folder: str | Path, *, name: str = "digits", version: int = 1, seed: int = 0,
               broken: bool = False) -> Path:
    """A tiny one-variant bundle as the ``.tar`` the server takes (``edgekiln.fleet.sample``).

    ``broken=True`` gives a valid, publishable bundle that fails the device's health check.
    Different ``seed``s give different bytes (the server stores blobs by content hash).
    """
    from edgekiln.fleet.client import tar_bundle
    from edgekiln.fleet.sample import sample_bundle

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-v{version}-s{seed}{'-broken' if broken else ''}"
    bundle = sample_bundle(folder / tag, name=name, version=version, seed=seed, broken=broken)
    return tar_bundle(bundle, folder / f"{tag}.tar")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackServer:
    """Serve an ASGI ``app`` with uvicorn on a free 127.0.0.1 port in a background thread; over
    https when given a certificate and key (``edgekiln.fleet.tls_testing.make_test_ca``).
    WebSockets (the device notice route) use uvicorn's sans-io implementation, as ``serve`` does."""

    def __init__(self, app: Any, *, port: int | None = None, ssl_certfile: str | Path | None = None,
                 ssl_keyfile: str | Path | None = None, ws_ping_interval: float | None = None) -> None:
        import uvicorn

        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ValueError("LoopbackServer: give ssl_certfile and ssl_keyfile together")
        self.port = port or free_port()
        self.url = f"{'https' if ssl_certfile else 'http'}://127.0.0.1:{self.port}"
        tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan="off", ws="websockets-sansio", ws_ping_interval=ws_ping_interval,
                                ws_ping_timeout=20.0, **tls)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class FleetHarness:
    """One update server (the real app: on loopback, or in-process through ``transport``) and what
    tests do with it as the operator."""

    def __init__(self, url: str, server_dir: str | Path, admin_token: str, *, transport: Any = None,
                 ca: str | Path | None = None) -> None:
        self.url, self.server_dir, self.admin_token = url, Path(server_dir), admin_token
        self.transport, self.ca = transport, ca

    @property
    def root_file(self) -> Path:
        """The trusted root a device is enrolled with (the server writes it to KEYS/root.json)."""
        return self.server_dir / "keys" / "root.json"

    @property
    def director_root_file(self) -> Path:
        """The trusted director root (KEYS/director-root.json); the agent finds it next to ``root_file``."""
        return self.server_dir / "keys" / "director-root.json"

    def _tls(self) -> Any:
        from edgekiln.runtime.transport_security import TlsOptions

        return None if self.ca is None else TlsOptions(ca=str(self.ca))

    def device(self, name: str, group: str) -> str:
        from edgekiln.fleet.client import add_device

        return str(add_device(self.url, self.admin_token, name, group, transport=self.transport,
                              tls=self._tls())["token"])

    def publish(self, tar: Path, model: str, version: int, channel: str = "stable") -> dict[str, Any]:
        from edgekiln.fleet.client import publish

        return publish(tar, self.url, self.admin_token, channel, model=model, version=version,
                       transport=self.transport, tls=self._tls())

    def rollout(self, model: str, version: int, group: str, **kw: Any) -> dict[str, Any]:
        from edgekiln.fleet.client import rollout_start

        return rollout_start(self.url, self.admin_token, model, version, group, transport=self.transport,
                             tls=self._tls(), **kw)

    def rollout_status(self, rollout_id: int) -> dict[str, Any]:
        from edgekiln.fleet.client import rollout_status

        result = rollout_status(self.url, self.admin_token, rollout_id, transport=self.transport, tls=self._tls())
        assert isinstance(result, dict)
        return result

    def devices(self) -> dict[str, dict[str, Any]]:
        from edgekiln.fleet.client import list_devices

        return {d["name"]: d for d in list_devices(self.url, self.admin_token, transport=self.transport,
                                                   tls=self._tls())}

    def agent(self, state: str | Path, token: str, *, chunk_size: int = 4096, **kw: Any) -> Any:
        from edgekiln.fleet.agent import Agent, AgentConfig

        config = AgentConfig(server=self.url, token=token, state_dir=Path(state), root=self.root_file,
                             chunk_size=chunk_size, latency_runs=5, ca=None if self.ca is None else Path(self.ca))
        return Agent(config, **{"transport": self.transport, **kw})


def push_demo(folder: str | Path, *, timeout_s: float = 30.0) -> dict[str, Any]:
    """``make demo``'s push step: a loopback server with no broker, one agent daemon on its
    WebSocket (polling only every hour), a rollout; returns how long the install took to start
    and finish after the rollout. Raises ``RuntimeError`` when it does not happen in ``timeout_s``."""
    from edgekiln.fleet import agent_loop
    from edgekiln.fleet.push import Wakeup
    from edgekiln.fleet.server import ServerConfig, create_app
    from edgekiln.fleet.slots import SlotStore

    folder, admin = Path(folder), "demo-admin-token-0123456789abcdef"
    marks: dict[str, float] = {}
    with LoopbackServer(create_app(ServerConfig.local(folder / "server", admin_token=admin))) as url:
        fleet = FleetHarness(url, folder / "server", admin)
        token = fleet.device("demo-cam", "demo")
        fleet.publish(bundle_tar(folder / "bundles", name="digits", version=1), "digits", 1)
        agent = fleet.agent(folder / "device", token,
                            checkpoint=lambda name: marks.setdefault(name, time.monotonic()))
        wake, channels = Wakeup(), []   # type: ignore[var-annotated]
        thread = threading.Thread(target=agent_loop.serve, args=(agent,), daemon=True, kwargs={
            "interval_s": 3600.0, "push": "websocket", "push_poll_s": 3600.0, "push_jitter_s": 0.0,
            "telemetry": False, "wake": wake, "on_channel": channels.append})
        thread.start()
        try:
            deadline = time.monotonic() + timeout_s
            while not (channels and channels[0] is not None and channels[0].connected
                       and "director-refreshed" in marks):
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("push demo: the agent did not connect to the server's WebSocket")
                time.sleep(0.01)
            fleet.rollout("digits", 1, "demo")
            t0 = time.monotonic()
            while SlotStore(folder / "device").active() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"push demo: the rollout was not installed within {timeout_s:g} s")
                time.sleep(0.01)
            done = time.monotonic()
        finally:
            wake.stop()
            if channels and channels[0] is not None:
                channels[0].close()
            thread.join(timeout=10)
            agent.close()
    return {"channel": "websocket", "start_s": marks.get("state:pending", done) - t0, "installed_s": done - t0}
