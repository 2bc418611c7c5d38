"""The `transfer` benchmark's tools: a simulated agent issues exactly the requests of a real Agent
(install, idle, delta update), and the counting relay counts what crosses it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from edgekiln.fleet.agent_testing import FleetHarness, LoopbackServer
from edgekiln.fleet.bundle_tar import write_reproducible
from edgekiln.fleet.inprocess import InProcessTransport
from edgekiln.fleet.sample import sample_mlp_bundle
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.transfer_load import CountingRelay, SimAgent, async_clients, close_clients, poll_loop

ADMIN = "admin-token-for-transfer-smoke-0123456789"


class Recording(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.paths = inner, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append((request.method, request.url.path))
        return self.inner.handle_request(request)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transfer")
    app = create_app(ServerConfig.local(folder / "server", admin_token=ADMIN))
    harness = FleetHarness("http://fleet.test", folder / "server", ADMIN, transport=InProcessTransport(app))
    harness.app = app
    harness.tars = {v: write_reproducible(sample_mlp_bundle(folder / f"v{v}", version=v, change=0.1 * (v > 1)),
                                          folder / f"v{v}.tar") for v in (1, 2)}
    return harness


def _sim_cycle(app, sim: SimAgent) -> str:
    async def run() -> str:
        sim.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fleet.test",
                                       headers={"Authorization": f"Bearer {sim.token}"})
        async with sim.client:
            return await sim.cycle()

    return asyncio.run(run())


def test_the_simulated_agent_sends_what_a_real_agent_sends(fleet, tmp_path):
    real_token, sim_token = fleet.device("real", "seq"), fleet.device("sim", "seq")
    recording = Recording(fleet.transport)
    real = fleet.agent(tmp_path / "real", real_token, transport=recording)
    sim = SimAgent(sim_token, paths=[])
    fleet.publish(fleet.tars[1], "seq", 1)
    fleet.rollout("seq", 1, "seq")
    steps = []
    for step in ("install v1", "idle", "delta to v2"):
        if step == "delta to v2":
            fleet.publish(fleet.tars[2], "seq", 2)
            fleet.rollout("seq", 2, "seq")
        recording.paths.clear()
        sim.paths.clear()
        outcome = real.run_once()["outcome"]
        assert _sim_cycle(fleet.app, sim) == ("up-to-date" if step == "idle" else "installed") == \
            ("up-to-date" if outcome == "up-to-date" else outcome)
        assert sim.paths == recording.paths, f"{step}: simulated {sim.paths} != real {recording.paths}"
        steps.append(len(sim.paths))
    assert ("GET", "/tuf/targets/seq/2/delta-from-1.bsdiff4") in sim.paths
    assert steps[1] == 2, steps   # an idle check is the director root probe + timestamp


def test_the_relay_counts_the_bytes_and_requests_of_polling_agents(fleet, tmp_path):
    tokens = [fleet.device(f"poll-{i}", "poll") for i in range(8)]
    agents = [SimAgent(t) for t in tokens]
    with LoopbackServer(fleet.app) as url:
        relay = CountingRelay("127.0.0.1", int(url.rsplit(":", 1)[1])).start()
        try:
            async def run() -> int:
                async_clients(f"http://127.0.0.1:{relay.port}", agents, ca=None)
                try:
                    # NOTE: until every agent has made its first check (4 requests) and one idle one (2), not
                    # for a fixed 0.4 s: on a loaded machine (pytest -n 2) 8 agents did not all get that far.
                    return await poll_loop(agents, duration_s=60, interval_s=0.15,
                                           until=lambda: all(a.requests >= 6 for a in agents))
                finally:
                    await close_clients(agents)

            errors = asyncio.run(run())
            counts = relay.counts()
        finally:
            relay.stop()
    requests = sum(a.requests for a in agents)
    assert errors == 0 and requests >= 8 * 2 and requests % 2 == 0, (errors, requests)  # idle cycles: 2 requests
    assert counts["connections"] == 8, counts   # one keep-alive connection per agent
    per_request = counts["bytes"] / requests
    print(f"{requests} requests, {counts['bytes']} B through the relay ({per_request:.0f} B/request)")
    assert 150 < per_request < 2000, f"{per_request:.0f} B per idle request is implausible"
