"""Load test of the update server: many simulated agents polling a real uvicorn server.

Each simulated agent does what a real one does on every poll when nothing is new: the
director root probe ``GET /director/metadata/2.root.json`` (404 while the director root is v1)
and ``GET /director/metadata/timestamp.json`` (TUF's cheap "anything new?" check; the first one
makes the server sign the device's assignment), then sleeps its interval. All agents run in one asyncio process with one shared httpx connection pool; the
server runs in its own process, as in production. Any other answer than 200 (404 for the root
probe) or an exception counts as an error.

    stats = asyncio.run(poll(url, tokens, duration_s=5, interval_s=2))
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError


@dataclass
class LoadStats:
    agents: int
    duration_s: float
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    client_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        every = [x for v in self.latencies_ms.values() for x in v]
        out: dict[str, Any] = {"agents": self.agents, "duration_s": round(self.duration_s, 2),
                               "requests": self.requests, "errors": self.errors,
                               "requests_per_s": round(self.requests / self.duration_s, 1) if self.duration_s else 0.0,
                               "error_samples": self.error_samples[:5], "client_cpu_s": round(self.client_cpu_s, 2)}
        for name, values in (("all", every), *self.latencies_ms.items()):
            if values:
                a = np.asarray(values)
                out[f"{name}_p50_ms"] = round(float(np.percentile(a, 50)), 2)
                out[f"{name}_p99_ms"] = round(float(np.percentile(a, 99)), 2)
        return out


async def poll(url: str, tokens: list[str], *, duration_s: float, interval_s: float, seed: int = 0,
               timeout_s: float = 30.0) -> LoadStats:
    """Run ``len(tokens)`` agents against ``url`` for ``duration_s`` seconds."""
    import httpx

    stats = LoadStats(agents=len(tokens), duration_s=duration_s)
    rng = random.Random(seed)
    paths = {"root_probe": "/director/metadata/2.root.json", "timestamp": "/director/metadata/timestamp.json"}
    expected = {"root_probe": 404, "timestamp": 200}
    for name in paths:
        stats.latencies_ms[name] = []
    # NOTE: one client (one keep-alive connection) per agent, as each device has its own; a single shared
    # pool of 500 connections is scanned per request by httpx. The clients share one SSL context: building
    # one per client costs tens of milliseconds of CPU each.
    ssl_context = httpx.create_ssl_context()
    clients = [httpx.AsyncClient(base_url=url, timeout=timeout_s, headers={"Authorization": f"Bearer {t}"},
                                 limits=httpx.Limits(max_connections=1), verify=ssl_context) for t in tokens]
    start = time.perf_counter()
    cpu0 = time.process_time()
    end = start + duration_s

    async def agent(client: httpx.AsyncClient, offset: float) -> None:
        async with client:
            await asyncio.sleep(offset)      # agents start spread over one interval, as a real fleet does
            while time.perf_counter() < end:
                for name, path in paths.items():
                    t0 = time.perf_counter()
                    try:
                        r = await client.get(path)
                        ok = r.status_code == expected[name]
                        detail = f"{path}: HTTP {r.status_code}"
                    except httpx.HTTPError as exc:
                        ok, detail = False, f"{path}: {type(exc).__name__}"
                    stats.latencies_ms[name].append((time.perf_counter() - t0) * 1e3)
                    stats.requests += 1
                    if not ok:
                        stats.errors += 1
                        stats.error_samples.append(detail)
                await asyncio.sleep(interval_s * (0.9 + 0.2 * rng.random()))

    await asyncio.gather(*(agent(c, rng.random() * interval_s) for c in clients))
    stats.duration_s = time.perf_counter() - start
    stats.client_cpu_s = time.process_time() - cpu0
    return stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux ``/proc``), to report server CPU per request."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_healthy(url: str, proc: subprocess.Popen[str], timeout_s: float = 60.0, *,
                       ca: str | Path | None = None) -> None:
    """Poll ``URL/healthz`` until the server started as ``proc`` answers; raise if it exits or times out.
    ``ca``: the CA file an https server's certificate chains to."""
    import httpx

    from edgekiln.runtime.transport_security import client_ssl_context

    verify: Any = client_ssl_context(ca) if ca is not None else True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise EdgekilnError(f"update server did not start: {(proc.stderr.read() if proc.stderr else '')[-300:]}")
        time.sleep(0.2)


@contextmanager
def served(folder: Path, db_url: str, admin_token: str) -> Iterator[tuple[str, int]]:
    """Run ``edgekiln serve`` in a subprocess on a loopback port; yield its URL and pid."""

    from edgekiln.fleet import keys
    from edgekiln.fleet.tuf_repo import TufExpiry

    if not keys.is_initialized(folder / "keys"):   # NOTE: the root key stays outside KEYS, as in production
        keys.init_keys(folder / "keys", folder / "offline-root.pem", expiry=TufExpiry())
    port = free_port()
    env = {**os.environ, "EDGEKILN_ADMIN_TOKEN": admin_token, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgekiln.cli", "serve", "--db", db_url,
                             "--store", str(folder / "blobs"), "--keys", str(folder / "keys"), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        yield url, proc.pid
    finally:
        stop_server(proc)


def prepare_fleet(url: str, admin_token: str, agents: int, work: Path) -> list[str]:
    """Register ``agents`` devices, publish a sample bundle and roll it out; return the device tokens."""
    import httpx

    from edgekiln.fleet.client import publish, rollout_start
    from edgekiln.fleet.sample import sample_bundle

    tokens = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as c:
        for i in range(agents):
            r = c.post("/v1/devices", json={"name": f"sim-{i:04d}", "group": "load"})
            if r.status_code != 201:
                raise EdgekilnError(f"registering simulated device {i} failed: {r.status_code} {r.text[:200]}")
            tokens.append(r.json()["token"])
    bundle = work / "bundle"
    if not bundle.exists():
        sample_bundle(bundle, version=1)
    publish(bundle, url, admin_token, "stable", model="digits", version=1)
    rollout_start(url, admin_token, "digits", 1, "load", waves=[50, 100])
    return tokens


def run_load(work: Path, db_url: str, *, agents: int, duration_s: float, interval_s: float) -> dict[str, Any]:
    """Start a server on ``db_url``, prepare the fleet, poll, and return the summary."""
    import secrets

    work.mkdir(parents=True, exist_ok=True)
    admin = secrets.token_urlsafe(24)
    with served(work, db_url, admin) as (url, pid):
        tokens = prepare_fleet(url, admin, agents, work)
        cpu0 = cpu_seconds(pid)
        stats = asyncio.run(poll(url, tokens, duration_s=duration_s, interval_s=interval_s))
        server_cpu = cpu_seconds(pid) - cpu0
    out = stats.summary()
    return {**out, "interval_s": interval_s, "server_cpu_s": round(server_cpu, 2),
            "server_cpu_ms_per_request": round(1e3 * server_cpu / max(1, out["requests"]), 3)}


def stop_server(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    """SIGTERM a server subprocess (uvicorn shuts down cleanly), SIGKILL it after ``timeout_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
