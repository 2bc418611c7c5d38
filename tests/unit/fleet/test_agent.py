"""The device agent against the real server app, in-process (httpx transport): install, refuse,
roll back, queue reports, back off, and the `edgekiln agent` CLI."""

from __future__ import annotations

import json

import httpx
import pytest

from edgekiln.cli.app import main
from edgekiln.errors import EdgekilnError
from edgekiln.fleet.agent import Agent, AgentConfig
from edgekiln.fleet.agent_testing import FleetHarness, bundle_tar, free_port
from edgekiln.fleet.fetcher import ServerUnreachable
from edgekiln.fleet.inprocess import InProcessTransport
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.slots import health_check_slot

ADMIN = "admin-token-for-agent-tests-0123456789"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet")
    app = create_app(ServerConfig.local(folder / "server", admin_token=ADMIN))
    harness = FleetHarness("http://fleet.test", folder / "server", ADMIN, transport=InProcessTransport(app))
    bundles = folder / "bundles"
    harness.tars = {1: bundle_tar(bundles, version=1), 2: bundle_tar(bundles, version=2, seed=1),
                    3: bundle_tar(bundles, version=3, seed=2, broken=True)}
    return harness


def _device_with_v1(fleet, tmp_path, name):
    """A device in its own group (and its own model) with v1 installed."""
    token = fleet.device(name, f"g-{name}")
    fleet.publish(fleet.tars[1], name, 1)
    fleet.rollout(name, 1, f"g-{name}")
    agent = fleet.agent(tmp_path / "state", token)
    assert agent.run_once()["outcome"] == "installed"
    return token, agent


def test_agent_installs_the_assigned_version_and_reports_it(fleet, tmp_path, capsys):
    token, agent = _device_with_v1(fleet, tmp_path, "m-install")
    active = agent.store.active()
    assert (active.model, active.version) == ("m-install", 1)
    assert health_check_slot(active.path, latency_runs=1)["ok"]
    assert agent.run_once()["outcome"] == "up-to-date"
    record = fleet.devices()["m-install"]
    assert (record["active_version"], record["status"]) == (1, "installed")
    assert record["latency_ms"]["p50"] > 0, record
    main(["agent", "--state", str(tmp_path / "state"), "--status", "--json"])
    status = json.loads(capsys.readouterr().out)
    assert (status["active_version"], status["active_slot"], status["pending"]) == (1, "a", None)


def test_agent_refuses_a_version_not_newer_than_the_active_one(fleet, tmp_path):
    token, agent = _device_with_v1(fleet, tmp_path, "m-older")
    fleet.publish(fleet.tars[2], "m-older", 2)
    fleet.rollout("m-older", 2, "g-m-older")
    assert agent.run_once()["outcome"] == "installed"
    received = agent.fetcher.bytes_received
    older = fleet.rollout("m-older", 1, "g-m-older")   # an operator (or attacker) assigns the old one
    result = agent.run_once()
    assert result["outcome"] == "refused" and "not newer than the active version 2" in result["error"]
    assert agent.store.active().version == 2
    assert agent.fetcher.bytes_received == received, "a refused version must not be downloaded"
    assert fleet.devices()["m-older"]["status"] == "failed"
    assert fleet.rollout_status(older["id"])["state"] == "halted"
    assert agent.run_once()["outcome"] == "up-to-date"   # back on the v2 rollout the device installed


def test_a_bundle_failing_the_health_check_is_rolled_back_and_not_retried(fleet, tmp_path):
    token, agent = _device_with_v1(fleet, tmp_path, "m-broken")
    fleet.publish(fleet.tars[3], "m-broken", 3)
    rollout = fleet.rollout("m-broken", 3, "g-m-broken")
    result = agent.run_once()
    assert result["outcome"] == "rolled_back" and "health check failed" in result["error"], result
    active = agent.store.active()
    assert active.version == 1 and health_check_slot(active.path, latency_runs=1)["ok"]
    assert agent.store.sealed(agent.store.inactive_name()) is None, "the broken slot must be cleared"
    assert fleet.rollout_status(rollout["id"])["state"] == "halted"
    received = agent.fetcher.bytes_received
    assert agent.run_once()["outcome"] == "up-to-date"   # the halted rollout no longer assigns v3
    assert agent.fetcher.bytes_received == received


class FlakyReports(httpx.BaseTransport):
    """Delegates to the app, but the first ``fail`` report POSTs find no server."""

    def __init__(self, inner, fail):
        self.inner, self.fail = inner, fail

    def handle_request(self, request):
        if request.url.path == "/v1/device/report" and self.fail:
            self.fail -= 1
            raise httpx.ConnectError("connection refused")
        return self.inner.handle_request(request)


def test_a_report_that_cannot_be_sent_is_queued_and_sent_next_time(fleet, tmp_path):
    token = fleet.device("m-queue", "g-m-queue")
    fleet.publish(fleet.tars[1], "m-queue", 1)
    fleet.rollout("m-queue", 1, "g-m-queue")
    agent = fleet.agent(tmp_path / "state", token, transport=FlakyReports(fleet.transport, fail=2))
    assert agent.run_once()["outcome"] == "installed"
    assert agent.store.read_state()["outbox"][0]["status"] == "installed"
    assert fleet.devices()["m-queue"]["status"] != "installed"
    assert agent.run_once()["outcome"] == "up-to-date"
    assert agent.store.read_state()["outbox"] == []
    assert fleet.devices()["m-queue"]["status"] == "installed"


def test_daemon_backs_off_while_the_server_is_unreachable(tmp_path):
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    lines: list[str] = []
    waits: list[float] = []
    agent = Agent(AgentConfig(server="http://nowhere", token="t", state_dir=tmp_path / "s"),
                  transport=httpx.MockTransport(refuse), log=lines.append)
    agent.serve(2.0, max_backoff_s=10.0, cycles=5, sleep=waits.append)
    expected = [2, 4, 8, 10, 10]
    assert all(abs(w - e) <= 0.1 * e + 1e-9 for w, e in zip(waits, expected, strict=True)), (waits, expected)
    assert all("keeping the active model" in line for line in lines) and len(lines) == 5
    with pytest.raises(ServerUnreachable):
        agent.run_once()


def test_cli_once_with_an_unreachable_server_prints_one_line_and_exits_4(tmp_path, capsys):
    port = free_port()   # nothing listens there
    with pytest.raises(SystemExit) as done:
        main(["agent", "--server", f"http://127.0.0.1:{port}", "--token", "t", "--state", str(tmp_path / "s"),
              "--once"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 4, err
    assert len(err.splitlines()) == 1 and "unreachable" in err and "active model is unchanged" in err


def test_first_run_without_a_trusted_root_is_refused(fleet, tmp_path):
    token = fleet.device("m-noroot", "g-m-noroot")
    fleet.publish(fleet.tars[1], "m-noroot", 1)
    fleet.rollout("m-noroot", 1, "g-m-noroot")
    agent = Agent(AgentConfig(server=fleet.url, token=token, state_dir=tmp_path / "s"), transport=fleet.transport)
    with pytest.raises(EdgekilnError, match="not enrolled: give the server's trusted root with --root") as err:
        agent.run_once()
    assert err.value.exit_code == 2
    assert agent.store.active() is None


class AgentDied(BaseException):
    """Stands in for the process dying (kill -9, out of memory) at a checkpoint."""


def test_a_bundle_whose_health_check_keeps_killing_the_agent_is_given_up(fleet, tmp_path):
    token, agent = _device_with_v1(fleet, tmp_path, "m-crashy")
    fleet.publish(fleet.tars[2], "m-crashy", 2)
    fleet.rollout("m-crashy", 2, "g-m-crashy")

    def die_in_the_check(name):
        if name == "state:checking":
            raise AgentDied

    for _ in range(3):   # three restarts, each dying inside the health check
        with pytest.raises(AgentDied):
            fleet.agent(tmp_path / "state", token, checkpoint=die_in_the_check).run_once()
        assert fleet.agent(tmp_path / "state", token).store.active().version == 1
    result = fleet.agent(tmp_path / "state", token).run_once()
    assert result["outcome"] == "rolled_back" and "stopped 3 times while health-checking" in result["error"]
    active = agent.store.active()
    assert active.version == 1 and health_check_slot(active.path, latency_runs=1)["ok"]
    assert fleet.devices()["m-crashy"]["status"] == "rolled_back"
