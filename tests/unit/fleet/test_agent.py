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
from edgekiln.fleet.slot_health import health_check_slot

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


@pytest.fixture
def enrolled_root(tmp_path):
    """Trusted roots (image and director) of a key folder no server answers for."""
    from edgekiln.fleet.keys import dev_init
    from edgekiln.fleet.tuf_repo import TufExpiry

    return dev_init(tmp_path / "keys", TufExpiry())


def test_daemon_backs_off_while_the_server_is_unreachable(tmp_path, enrolled_root):
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    lines: list[str] = []
    waits: list[float] = []
    agent = Agent(AgentConfig(server="http://nowhere", token="t", state_dir=tmp_path / "s", root=enrolled_root),
                  transport=httpx.MockTransport(refuse), log=lines.append)
    agent.serve(2.0, max_backoff_s=10.0, cycles=5, sleep=waits.append)
    expected = [2, 4, 8, 10, 10]
    assert all(abs(w - e) <= 0.1 * e + 1e-9 for w, e in zip(waits, expected, strict=True)), (waits, expected)
    assert all("keeping the active model" in line for line in lines) and len(lines) == 5
    with pytest.raises(ServerUnreachable):
        agent.run_once()


def test_cli_once_with_an_unreachable_server_prints_one_line_and_exits_4(tmp_path, capsys, enrolled_root):
    port = free_port()   # nothing listens there
    with pytest.raises(SystemExit) as done:
        main(["agent", "--server", f"http://127.0.0.1:{port}", "--token", "t", "--state", str(tmp_path / "s"),
              "--root", str(enrolled_root), "--once"])
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


class CountReports(httpx.BaseTransport):
    """Delegates to the app and keeps the bodies of the reports sent."""

    def __init__(self, inner):
        self.inner, self.reports = inner, []

    def handle_request(self, request):
        if request.url.path == "/v1/device/report":
            self.reports.append(json.loads(request.content))
        return self.inner.handle_request(request)


def test_a_full_disk_is_retried_reported_once_and_never_stops_the_daemon(fleet, tmp_path, monkeypatch):
    """The in-process twin of tests/integration/test_agent_disk_full.py (a real tmpfs there)."""
    import errno

    token, _ = _device_with_v1(fleet, tmp_path, "m-full")
    fleet.publish(fleet.tars[2], "m-full", 2)
    fleet.rollout("m-full", 2, "g-m-full", failure_threshold=1.0)
    counting = CountReports(fleet.transport)

    def disk_full_at_chunk_2(name):
        if name == "chunk:2":
            raise OSError(errno.ENOSPC, "No space left on device")

    # NOTE: a fixed free-space reading: on a real full disk it stays put; on this one it moves every cycle
    monkeypatch.setattr("edgekiln.fleet.slots.free_bytes", lambda path: 10**9)
    agent = fleet.agent(tmp_path / "state", token, transport=counting, checkpoint=disk_full_at_chunk_2)
    first, second = agent.run_once(), agent.run_once()
    assert first["outcome"] == "failed", first
    assert first["error"].startswith("no space left on the device (need 20480 bytes, 1000000000 free)"), first
    assert (second["outcome"], second["error"]) == ("retry", first["error"]), second
    failed = [r for r in counting.reports if r["status"] == "failed"]
    assert len(failed) == 1, failed   # same model, version and free bytes: reported once
    monkeypatch.undo()
    assert "m-full/2" not in (agent.store.read_state().get("rejected") or {}), "a full disk must not reject v2"
    assert not agent.fetcher.partial_path("m-full/2/bundle.tar").exists(), "the .part that filled the disk is kept"
    assert agent.store.active().version == 1
    # a plain OSError from below (state.json on a dying disk) costs the daemon one log line, not its life
    agent = fleet.agent(tmp_path / "state", token)
    real_write, calls = agent.store.write_state, []

    def write_state_fails_once(state):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(state)

    monkeypatch.setattr(agent.store, "write_state", write_state_fails_once)
    lines: list[str] = []
    agent.log = lines.append
    agent.serve(0.01, cycles=2, sleep=lambda s: None)
    assert lines[0] == "error: OSError: [Errno 5] Input/output error; keeping the active model", lines
    assert agent.store.active().version == 2, lines


def test_cli_refuses_plain_http_to_another_machine_unless_told(tmp_path, capsys, enrolled_root):
    with pytest.raises(SystemExit) as done:
        main(["agent", "--server", "http://10.0.0.2:8080", "--token", "t", "--state", str(tmp_path / "s"),
              "--root", str(enrolled_root), "--once"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2, err
    assert len(err.splitlines()) == 1 and "refusing plain http:// to 10.0.0.2" in err and "--insecure-http" in err
    agent = Agent(AgentConfig(server="http://10.0.0.2:8080", token="t", state_dir=tmp_path / "s", insecure_http=True))
    assert str(agent.client.base_url) == "http://10.0.0.2:8080"   # allowed; nothing was sent yet
    agent.close()


def test_a_revoked_device_is_told_in_one_line_and_keeps_its_model(fleet, tmp_path):
    from edgekiln.fleet.client import remove_device

    token, agent = _device_with_v1(fleet, tmp_path, "m-revoked")
    remove_device(fleet.url, fleet.admin_token, "m-revoked", transport=fleet.transport)
    with pytest.raises(EdgekilnError, match=r"refused the device token \(.*director/metadata/.*HTTP 401\)"):
        agent.run_once()
    assert agent.store.read_state()["outbox"] == [], "nothing to report with a revoked token"
    assert agent.store.active().version == 1


def test_a_device_enrolled_before_the_director_is_told_how_to_enrol(fleet, tmp_path):
    import shutil

    token, agent = _device_with_v1(fleet, tmp_path, "m-old-enrol")
    shutil.rmtree(agent.store.root / "director")   # what a state folder from before the director holds
    old = Agent(AgentConfig(server=fleet.url, token=token, state_dir=agent.store.root), transport=fleet.transport)
    with pytest.raises(EdgekilnError, match="not enrolled with the director: give --director-root FILE") as err:
        old.run_once()
    assert err.value.exit_code == 2
    assert old.store.active().version == 1
    given = Agent(AgentConfig(server=fleet.url, token=token, state_dir=agent.store.root,
                              director_root=fleet.director_root_file), transport=fleet.transport)
    assert given.run_once()["outcome"] == "up-to-date"


def test_the_install_report_says_how_the_bundle_came(fleet, tmp_path):
    token = fleet.device("m-transfer", "g-m-transfer")
    fleet.publish(fleet.tars[1], "m-transfer", 1)
    fleet.rollout("m-transfer", 1, "g-m-transfer")
    counting = CountReports(fleet.transport)
    agent = fleet.agent(tmp_path / "state", token, transport=counting)
    assert agent.run_once()["outcome"] == "installed"
    installed = [r for r in counting.reports if r["status"] == "installed"]
    size = fleet.tars[1].stat().st_size
    assert installed[0]["transfer"] == {"kind": "full", "bytes": size, "fallback": None}, installed
    assert fleet.devices()["m-transfer"]["active_version"] == 1   # the server took the report


def test_settings_and_telemetry_over_http(fleet, tmp_path):
    token, agent = _device_with_v1(fleet, tmp_path, "m-tele")
    settings = agent.api.settings()
    assert settings["websocket"] == "/v1/device/notices" and settings["mqtt"] is None, settings
    assert settings["push_poll_s"] > 0 and settings["telemetry_every_s"] > 0, settings
    from edgekiln.fleet.device_telemetry import collect

    item = collect(agent)
    assert (item["model"], item["ver"], item["health"]) == ("m-tele", 1, "ok"), item
    assert item["p95"] is not None and item["disk_free"] > 0, item   # from the install's health check
    agent.api.telemetry([item])
    seen = fleet.devices()["m-tele"]["telemetry"]
    assert (seen["ver"], seen["health"], seen["p95"]) == (1, "ok", item["p95"]), seen
    with pytest.raises(EdgekilnError, match="HTTP 422"):
        agent.api.telemetry([{**item, "colour": "red"}])


@pytest.mark.parametrize(("args", "message"), [
    (["--push", "carrier-pigeon"], "--push must be one of auto, mqtt, websocket, off"),
    (["--mqtt", "mqtt://10.0.0.2:1883"], "refusing plain mqtt:// to 10.0.0.2"),
    (["--push-poll-interval", "0"], "--push-poll-interval must be > 0"),
])
def test_cli_push_options_are_checked_in_one_line(tmp_path, capsys, enrolled_root, args, message):
    with pytest.raises(SystemExit) as done:
        main(["agent", "--server", "https://fleet.example:8443", "--token", "t", "--state", str(tmp_path / "s"),
              "--root", str(enrolled_root), *args])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def _adapt_in_place(store, record):
    """What ``fleet.adapt.adapt_state`` leaves after an accepted adaptation (the learning itself is
    tested in tests/integration/test_learn_state.py): the active bundle copied into the other slot,
    sealed with ``adaptation`` and switched to; state.json records it."""
    import shutil

    active = store.active()
    slot = store.inactive_name()
    shutil.copytree(active.path, store.slot_path(slot))
    store.seal(slot, model=active.model, version=active.version, target_path=active.target_path,
               sha256="0" * 64, adaptation=record)
    store.switch(slot)
    state = store.read_state()
    state.update(active_slot=slot, adaptation=record)
    store.write_state(state)
    return slot


def test_an_adaptation_is_kept_until_a_higher_version_supersedes_it(fleet, tmp_path):
    token, agent = _device_with_v1(fleet, tmp_path, "m-adapted")
    record = {"version": 1, "id": "0123456789ab", "scope": "head"}
    slot = _adapt_in_place(agent.store, record)
    counting = CountReports(fleet.transport)
    agent = fleet.agent(tmp_path / "state", token, transport=counting)
    assert agent.run_once()["outcome"] == "up-to-date"          # same version: the adaptation is kept
    assert agent.store.active_name() == slot and agent.store.active().adaptation == record
    assert agent.store.read_state()["adaptation"] == record
    fleet.publish(fleet.tars[2], "m-adapted", 2)
    fleet.rollout("m-adapted", 2, "g-m-adapted")
    assert agent.run_once()["outcome"] == "installed"           # a higher version supersedes it
    active = agent.store.active()
    assert (active.version, active.adaptation, active.name != slot) == (2, None, True), active
    state = agent.store.read_state()
    assert state["adaptation"] is None and state["history"][-1]["superseded_adaptation"] == "0123456789ab", state
    installed = [r for r in counting.reports if r["status"] == "installed"]
    assert installed[-1]["transfer"]["fallback"] == "adapted", installed   # no delta from an adapted slot
    assert health_check_slot(active.path, latency_runs=1)["ok"]


class RefuseAdaptReports(httpx.BaseTransport):
    """A server from before on-device learning: adaptation reports get 422."""

    def __init__(self, inner):
        self.inner = inner

    def handle_request(self, request):
        if request.url.path == "/v1/device/report" and json.loads(request.content)["status"] == "adapted":
            return httpx.Response(422, json={"detail": "report status 'adapted' is not one of ..."})
        return self.inner.handle_request(request)


def test_an_adaptation_report_an_older_server_refuses_is_dropped_not_retried_forever(fleet, tmp_path):
    token, agent = _device_with_v1(fleet, tmp_path, "m-old-server")
    state = agent.store.read_state()
    state["outbox"] = [{"status": "adapted", "model": "m-old-server", "version": 1,
                        "adaptation": {"id": "0123456789ab"}},
                       {"status": "failed", "model": "m-old-server", "version": 1, "error": "queued after it"}]
    agent.store.write_state(state)
    lines = []
    agent = fleet.agent(tmp_path / "state", token, transport=RefuseAdaptReports(fleet.transport), log=lines.append)
    assert agent.run_once()["outcome"] == "up-to-date"
    assert agent.store.read_state()["outbox"] == [], "the queue must not stay blocked"
    assert any("adaptation report dropped" in line and "HTTP 422" in line for line in lines), lines
    assert fleet.devices()["m-old-server"]["last_error"] == "queued after it"   # the next report went through
