"""What the ``transfer`` benchmark measures with: a byte-counting TCP relay, simulated agents that
issue a real agent's requests, and the update server in a subprocess.

- :class:`CountingRelay` sits between the agents and the update server (or the broker) and counts
  the TCP payload bytes both ways and the connections: TLS records included, TCP/IP headers not.
- :class:`SimAgent` makes the requests :class:`~edgekiln.fleet.agent.Agent` makes, in its order
  (``tests/benchmarks/test_transfer_smoke.py`` checks it against a real agent), with asyncio httpx
  and without TUF verification or health checks: the director root probe and timestamp; on a
  change the director snapshot and targets; on a new assignment the image root probe, timestamp,
  snapshot and targets, the delta (when signed for its active version) or the bundle, and the two
  reports (``checking``, ``installed``).
- :func:`serve_subprocess` runs the update server app with uvicorn in its own process, with the
  WebSocket implementation and ping interval the benchmark asks for.

Used by ``benchmarks/cases_transfer.py``; ``relay = CountingRelay(host, port).start()`` gives
``relay.port`` to connect to and ``relay.counts()``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fleet.delta import delta_path

ROOT_PROBE = "2.root.json"   # NOTE: both repositories are at root v1 in the benchmark


class CountingRelay:
    """A TCP relay on 127.0.0.1 (its own thread and event loop) counting payload bytes and connections."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.up = self.down = self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="counting-relay", daemon=True)

    def start(self) -> CountingRelay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def counts(self) -> dict[str, int]:
        return {"bytes_up": self.up, "bytes_down": self.down, "bytes": self.up + self.down,
                "connections": self.connections}

    def reset(self) -> None:
        self.up = self.down = self.connections = 0

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while data := await src.read(65536):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with suppress(ConnectionError, OSError, RuntimeError):
                    dst.close()

        # NOTE: stop() ends the loop with connections open; a cancelled handler would be logged as an error
        with suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))


@dataclass
class SimAgent:
    """One simulated device: its token, what it runs, and what it sent."""

    token: str
    active: tuple[str, int] | None = None
    director_snapshot: int | None = None
    assignment: tuple[str, int, str] | None = None
    requests: int = 0
    target_bytes: int = 0
    installs: list[float] = field(default_factory=list)       # monotonic time of each `installed` report
    started: list[float] = field(default_factory=list)        # monotonic time each update began
    paths: list[tuple[str, str]] | None = None                # (method, path) when recording
    client: Any = None
    make_client: Callable[[], Any] | None = None
    busy: bool = False
    last_rev: str | None = None

    async def _get(self, path: str, expect: tuple[int, ...] = (200,)) -> Any:
        if self.paths is not None:
            self.paths.append(("GET", path))
        self.requests += 1
        r = await self.client.get(path)
        if r.status_code not in expect:
            raise EdgekilnError(f"{path}: HTTP {r.status_code} {r.text[:200]}")
        return r

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        if self.paths is not None:
            self.paths.append(("POST", path))
        self.requests += 1
        r = await self.client.post(path, json=body)
        if r.status_code != 200:
            raise EdgekilnError(f"{path}: HTTP {r.status_code} {r.text[:200]}")

    async def cycle(self) -> str:
        """One check-and-update cycle, as Agent.run_once; returns idle / up-to-date / installed."""
        if self.busy:
            return "busy"
        self.busy = True
        try:
            return await self._cycle()
        finally:
            self.busy = False

    async def _cycle(self) -> str:
        await self._get(f"/director/metadata/{ROOT_PROBE}", (404,))
        ts = (await self._get("/director/metadata/timestamp.json")).json()
        snap = int(ts["signed"]["meta"]["snapshot.json"]["version"])
        if snap != self.director_snapshot:
            await self._get("/director/metadata/snapshot.json")
            targets = (await self._get("/director/metadata/targets.json")).json()["signed"]["targets"]
            self.director_snapshot = snap
            custom = (targets.get("assignment") or {}).get("custom") or {}
            self.assignment = (custom["model"], int(custom["version"]), custom["target_path"]) if custom else None
        if self.assignment is None:
            return "idle"
        model, version, target = self.assignment
        if self.active is not None and self.active[0] == model and self.active[1] >= version:
            return "up-to-date"
        self.started.append(time.monotonic())
        await self._get(f"/tuf/metadata/{ROOT_PROBE}", (404,))
        await self._get("/tuf/metadata/timestamp.json")
        await self._get("/tuf/metadata/snapshot.json")
        image = (await self._get("/tuf/metadata/targets.json")).json()["signed"]["targets"]
        path = target
        if self.active is not None and self.active[0] == model:
            dpath = delta_path(model, version, self.active[1])
            path = dpath if dpath in image else target
        got = len((await self._get(f"/tuf/targets/{path}")).content)
        self.target_bytes += got
        await self._post("/v1/device/report", {"model": model, "version": version, "status": "checking"})
        await self._post("/v1/device/report", {"model": model, "version": version, "status": "installed",
                                               "latency_ms": {"p50": 1.0, "p95": 2.0},
                                               "transfer": {"kind": "full" if path == target else "delta",
                                                            "bytes": got, "fallback": None}})
        self.active = (model, version)
        self.installs.append(time.monotonic())
        return "installed"


def async_clients(url: str, agents: list[SimAgent], *, ca: str | Path | None, timeout_s: float = 60.0) -> None:
    """Give every agent its own keep-alive httpx client (one connection, as a device has)."""
    import httpx

    from edgekiln.runtime.transport_security import client_ssl_context

    verify: Any = client_ssl_context(ca) if ca is not None else httpx.create_ssl_context()
    for a in agents:
        def make(a: SimAgent = a) -> Any:
            return httpx.AsyncClient(base_url=url, timeout=timeout_s, verify=verify,
                                     headers={"Authorization": f"Bearer {a.token}"},
                                     limits=httpx.Limits(max_connections=1))

        a.make_client = make
        a.client = make()


async def close_clients(agents: list[SimAgent]) -> None:
    await asyncio.gather(*(a.client.aclose() for a in agents if a.client is not None))


async def poll_loop(agents: list[SimAgent], *, duration_s: float, interval_s: float, seed: int = 0,
                    until: Callable[[], bool] | None = None, fresh_connections: bool = False) -> int:
    """Every agent cycles every ``interval_s`` (+-10%, first one spread over an interval) for
    ``duration_s`` or until ``until()``; returns the errors. ``fresh_connections``: each cycle on a
    new connection, as when the real interval is longer than the server's keep-alive timeout
    (uvicorn's is 5 s) and the timers are scaled down."""
    rng = random.Random(seed)
    end = time.monotonic() + duration_s
    errors = 0

    async def run(a: SimAgent, offset: float) -> None:
        nonlocal errors
        await asyncio.sleep(offset)
        while time.monotonic() < end and not (until and until()):
            started = time.monotonic()
            if fresh_connections and a.make_client is not None and not a.busy:
                await a.client.aclose()
                a.client = a.make_client()
            try:
                await a.cycle()
            except Exception:  # noqa: BLE001 - counted; a simulated agent keeps polling like a real one
                errors += 1
            # NOTE: start to start: a real cycle takes milliseconds of a 60 s interval; with the timers
            # scaled down and this process loaded, sleeping a whole interval after each cycle would
            # poll measurably less often than the agent it stands for
            await asyncio.sleep(max(0.0, started + interval_s * rng.uniform(0.9, 1.1) - time.monotonic()))

    await asyncio.gather(*(run(a, rng.random() * interval_s) for a in agents))
    return errors


class PushFleet:
    """Simulated agents with the real push channels of :mod:`edgekiln.fleet.push` (``kind`` "mqtt"
    or "websocket"): a notice with a new rev runs the agent's cycle on ``loop`` after a random
    0..``jitter_s`` delay, as the daemon loop does."""

    def __init__(self, kind: str, agents: list[SimAgent], loop: asyncio.AbstractEventLoop, *, server_url: str,
                 mqtt_url: str | None, ca: str | Path | None, keepalive_s: float, jitter_s: float = 0.5,
                 seed: int = 0) -> None:
        self.kind, self.agents, self.loop = kind, agents, loop
        self.server_url, self.mqtt_url, self.ca = server_url, mqtt_url, ca
        self.keepalive_s, self.jitter_s = keepalive_s, jitter_s
        self.rng = random.Random(seed)
        self.channels: list[Any] = []
        self.errors = 0
        self.notices = 0
        self.fallback_cycles = 0

    def start(self) -> PushFleet:
        from edgekiln.fleet.mosquitto import mqtt_credentials
        from edgekiln.fleet.push import MqttNotices, WebSocketNotices

        for a in self.agents:
            def on_notice(rev: str, a: SimAgent = a) -> None:
                self.loop.call_soon_threadsafe(self._notice, a, rev)

            if self.kind == "mqtt":
                assert self.mqtt_url is not None
                user, pw = mqtt_credentials(a.token)
                ch: Any = MqttNotices(self.mqtt_url, user, pw, ca=self.ca, on_notice=on_notice,
                                      keepalive_s=max(1, int(round(self.keepalive_s))),
                                      rng=random.Random(self.rng.random()))
            else:
                ch = WebSocketNotices(self.server_url, a.token, ca=self.ca, on_notice=on_notice,
                                      ping_interval_s=self.keepalive_s, rng=random.Random(self.rng.random()))
            ch.start()
            self.channels.append(ch)
        return self

    @property
    def connected(self) -> int:
        return sum(1 for ch in self.channels if ch.connected)

    def _notice(self, a: SimAgent, rev: str) -> None:
        if rev == a.last_rev:
            return
        a.last_rev = rev
        self.notices += 1
        asyncio.ensure_future(self._run(a, self.rng.uniform(0.0, self.jitter_s)))

    async def _run(self, a: SimAgent, delay: float) -> None:
        await asyncio.sleep(delay)
        while a.busy:   # NOTE: a safety poll is running: the notice still gets its own cycle
            await asyncio.sleep(0.05)
        try:
            await a.cycle()
        except Exception:  # noqa: BLE001 - counted, as a real agent logs it and carries on
            self.errors += 1

    async def fallback_poll(self, *, interval_s: float, until: Callable[[], bool], seed: int = 0) -> None:
        """While ``until()`` is false: every agent whose channel is down runs a cycle every
        ``interval_s`` (+-10%), as the daemon loop polls when push is unavailable."""
        rng = random.Random(seed)

        async def run(a: SimAgent, ch: Any) -> None:
            await asyncio.sleep(rng.random() * interval_s)
            while not until():
                if not ch.connected and not a.busy:
                    self.fallback_cycles += 1
                    try:
                        await a.cycle()
                    except Exception:  # noqa: BLE001 - counted, as a real agent logs it and carries on
                        self.errors += 1
                await asyncio.sleep(interval_s * rng.uniform(0.9, 1.1))

        await asyncio.gather(*(run(a, ch) for a, ch in zip(self.agents, self.channels, strict=True)))

    def close(self) -> None:
        for ch in self.channels:
            ch._stop.set()
        for ch in self.channels:
            ch.close()


def serve_command(config: dict[str, Any], *, port: int, cert: str | None, key: str | None,
                  ws_ping_s: float | None) -> list[str]:
    return [sys.executable, "-m", "edgekiln.fleet.transfer_load", json.dumps(
        {"config": config, "port": port, "cert": cert, "key": key, "ws_ping_s": ws_ping_s})]


@contextmanager
def serve_subprocess(config: dict[str, Any], *, port: int, cert: str | None = None, key: str | None = None,
                     ws_ping_s: float | None = 60.0, ca: str | Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """The update server (``ServerConfig.local(**config)``) under uvicorn in a subprocess, with
    ``ws="websockets-sansio"`` and a server ping every ``ws_ping_s``."""
    from edgekiln.fleet.load import stop_server, wait_until_healthy

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(serve_command(config, port=port, cert=cert, key=key, ws_ping_s=ws_ping_s), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"{'https' if cert else 'http'}://127.0.0.1:{port}", proc, ca=ca)
        yield proc
    finally:
        stop_server(proc)


def _serve_main(spec: dict[str, Any]) -> None:
    import uvicorn

    from edgekiln.fleet.server import ServerConfig, create_app

    config = dict(spec["config"])
    folder = config.pop("folder")
    app = create_app(ServerConfig.local(folder, **config))
    tls = {"ssl_certfile": spec["cert"], "ssl_keyfile": spec["key"]} if spec.get("cert") else {}
    uvicorn.run(app, host="127.0.0.1", port=int(spec["port"]), log_level="warning", access_log=False,
                ws="websockets-sansio", ws_ping_interval=spec.get("ws_ping_s"), ws_ping_timeout=None, **tls)


if __name__ == "__main__":
    _serve_main(json.loads(sys.argv[1]))
