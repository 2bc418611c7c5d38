"""A man in the middle between a device and the real update server (uvicorn on loopback): what the
agent refuses. The instruction to install is the device's signed director metadata; the
unsigned ``/v1/device/assignment`` is never asked; a version at or below the highest one the
device has run is refused; endless metadata is cut at TUF's byte limits.

Device A runs ``mitm`` v5 through the proxy; device B is assigned ``other`` v1.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from mitm_proxy import MitmProxy, TcpRelay

from edgekiln.fleet.agent import Agent, AgentConfig
from edgekiln.fleet.agent_testing import FleetHarness, LoopbackServer, bundle_tar
from edgekiln.fleet.fetcher import ServerUnreachable
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.slot_health import health_check_slot

ADMIN = "admin-token-for-the-mitm-test-0123456789"
DIRECTOR_FILE = re.compile(r"^/director/metadata/(?:[0-9]+\.)?(?P<role>timestamp|snapshot|targets)\.json$")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mitm")
    app = create_app(ServerConfig.local(folder / "server", admin_token=ADMIN))
    with LoopbackServer(app) as url, MitmProxy(url) as proxy:
        harness = FleetHarness(url, folder / "server", ADMIN)
        harness.proxy, harness.folder, harness.app = proxy, folder, app
        tars = {(m, v): bundle_tar(folder / "bundles", name=m, version=v, seed=v)
                for m, v in (("mitm", 5), ("mitm", 1), ("other", 1))}
        for (model, version), tar in tars.items():
            harness.publish(tar, model, version)
        harness.tokens = {"A": harness.device("dev-a", "group-a"), "B": harness.device("dev-b", "group-b")}
        harness.rollout("other", 1, "group-b")
        harness.agents = {"A": _agent_with_mitm_v5(harness, "A", "group-a")}
        yield harness
        for agent in harness.agents.values():
            agent.close()


def _agent_with_mitm_v5(fleet, name, group):
    fleet.rollout("mitm", 5, group)
    config = AgentConfig(server=fleet.proxy.url, token=fleet.tokens[name], state_dir=fleet.folder / f"state-{name}",
                         root=fleet.root_file, latency_runs=2)
    agent = Agent(config)
    result = agent.run_once()
    assert result["outcome"] == "installed", result
    return agent


@pytest.fixture(autouse=True)
def honest_proxy(fleet):
    fleet.proxy.rewrite, fleet.proxy.endless = None, lambda path: False
    yield
    fleet.proxy.rewrite, fleet.proxy.endless = None, lambda path: False


def _assert_good_model_active(agent, model, version):
    active = agent.store.active()
    assert active is not None and (active.model, active.version) == (model, version), active
    assert health_check_slot(active.path, latency_runs=1)["ok"]
    assert agent.run_once()["outcome"] == "up-to-date"


def test_a_director_assignment_changed_in_transit_is_refused(fleet):
    agent = fleet.agents["A"]

    def flip_model(path, status, headers, body):
        m = DIRECTOR_FILE.match(path)
        if m is None or m["role"] != "targets":
            return status, headers, body
        md = json.loads(body)
        custom = md["signed"]["targets"]["assignment"]["custom"]
        custom.update(model="other", version=1, target_path="other/1/bundle.tar")
        return status, headers, json.dumps(md).encode()

    fleet.rollout("mitm", 5, "group-a")   # a new rollout: the director signs new targets for A
    fleet.proxy.rewrite = flip_model
    result = agent.run_once()
    assert result["outcome"] == "failed" and "not signed by the trusted keys" in result["error"], result
    fleet.proxy.rewrite = None
    _assert_good_model_active(agent, "mitm", 5)


def test_another_devices_signed_director_metadata_is_refused(fleet):
    fleet.tokens["A2"] = fleet.device("dev-a2", "group-a2")
    agent = fleet.agents["A2"] = _agent_with_mitm_v5(fleet, "A2", "group-a2")
    b = {"Authorization": f"Bearer {fleet.tokens['B']}"}

    def version(headers):
        r = httpx.get(f"{fleet.url}/director/metadata/timestamp.json", headers=headers)
        assert r.status_code == 200, r.text
        return json.loads(r.content)["signed"]["version"]

    mine = json.loads((agent.store.root / "director" / "timestamp.json").read_bytes())["signed"]["version"]
    while version(b) <= mine:   # B's files must look newer than A2's, or TUF refuses them as a rollback
        fleet.rollout("other", 1, "group-b")

    def serve_bs_files(path, status, headers, body):
        if DIRECTOR_FILE.match(path) is None:
            return status, headers, body
        r = httpx.get(f"{fleet.url}{path}", headers=b)
        return r.status_code, headers, r.content

    fleet.proxy.rewrite = serve_bs_files
    result = agent.run_once()
    assert result["outcome"] == "failed" and "director metadata is for another device" in result["error"], result
    fleet.proxy.rewrite = None
    active = agent.store.active()
    assert (active.model, active.version) == ("mitm", 5) and health_check_slot(active.path, latency_runs=1)["ok"]


def test_a_rewritten_unsigned_assignment_is_never_even_asked_for(fleet):
    agent = fleet.agents["A"]

    def other_model(path, status, headers, body):
        if path.startswith("/v1/device/assignment"):
            return 200, headers, json.dumps({"model": "other", "version": 1, "target_path": "other/1/bundle.tar",
                                             "rollout_id": 1}).encode()
        return status, headers, body

    fleet.proxy.rewrite = other_model
    before = len(fleet.proxy.paths)
    assert agent.run_once()["outcome"] == "up-to-date"
    asked = fleet.proxy.paths[before:]
    assert "/v1/device/assignment" not in asked and "/director/metadata/timestamp.json" in asked, asked
    _assert_good_model_active(agent, "mitm", 5)


def test_endless_metadata_is_cut_at_the_byte_limit(fleet):
    agent = fleet.agents["A"]
    for path in ("/director/metadata/timestamp.json", "/tuf/metadata/timestamp.json"):
        if path.startswith("/tuf/"):
            fleet.rollout("other", 1, "group-a")   # only an update makes the agent read the image repository
        fleet.proxy.endless, fleet.proxy.endless_sent = (lambda p, path=path: p == path), 0
        result = agent.run_once()
        assert result["outcome"] == "failed", result
        assert "metadata refused: timestamp.json is larger than the 16384-byte limit" in result["error"], result
        sent = fleet.proxy.endless_sent
        assert sent < 4 << 20, f"the proxy sent {sent} bytes before the agent hung up (limit 4 MiB)"
        active = agent.store.active()
        assert (active.model, active.version) == ("mitm", 5)
    fleet.proxy.endless = lambda path: False
    fleet.rollout("mitm", 5, "group-a")
    _assert_good_model_active(agent, "mitm", 5)


def test_moving_back_to_an_older_version_of_a_model_the_device_ran_is_refused(fleet):
    agent = fleet.agents["A"]
    fleet.rollout("other", 1, "group-a")     # the operator moves A to another model: it installs
    assert agent.run_once()["outcome"] == "installed"
    back = fleet.rollout("mitm", 1, "group-a")
    result = agent.run_once()
    assert result["outcome"] == "refused", result
    assert ("refused: mitm v1 is below the highest version this device has run (v5); roll back by publishing a "
            "new, higher version") in result["error"], result
    assert fleet.rollout_status(back["id"])["state"] == "halted"
    _assert_good_model_active(agent, "other", 1)


def test_over_tls_a_network_tap_sees_no_token_and_a_fake_server_is_not_trusted(fleet):
    from edgekiln.fleet.tls_testing import make_test_ca

    ca, cert, key = make_test_ca(fleet.folder / "tls")
    _, evil_cert, evil_key = make_test_ca(fleet.folder / "evil")   # a certificate for 127.0.0.1 from another CA
    token = fleet.tokens["T"] = fleet.device("dev-tls", "group-tls")
    fleet.rollout("mitm", 5, "group-tls")
    with (LoopbackServer(fleet.app, ssl_certfile=cert, ssl_keyfile=key) as url,
          TcpRelay(int(url.rsplit(":", 1)[1])) as tap,
          LoopbackServer(fleet.app, ssl_certfile=evil_cert, ssl_keyfile=evil_key) as evil_url):
        config = AgentConfig(server=f"https://127.0.0.1:{tap.port}", token=token, ca=ca, latency_runs=2,
                             state_dir=fleet.folder / "state-tls", root=fleet.root_file)
        agent = Agent(config)
        assert agent.run_once()["outcome"] == "installed"
        seen = bytes(tap.captured)
        bundle = fleet.folder / "bundles" / "mitm-v5-s5.tar"
        assert len(seen) > bundle.stat().st_size, f"the tap saw {len(seen)} bytes, less than the bundle"
        assert b"Bearer" not in seen and token.encode() not in seen and b"director" not in seen
        fake = Agent(AgentConfig(server=evil_url, token=token, ca=ca, state_dir=config.state_dir, latency_runs=2))
        with pytest.raises(ServerUnreachable, match="TLS certificate of 127.0.0.1 not trusted \\(give --ca FILE\\)"):
            fake.run_once()
        _assert_good_model_active(agent, "mitm", 5)
        for a in (agent, fake):
            a.close()


def _fresh_agent(fleet, name, group):
    fleet.tokens[name] = fleet.device(f"dev-{name.lower()}", group)
    return Agent(AgentConfig(server=fleet.proxy.url, token=fleet.tokens[name], latency_runs=2,
                             state_dir=fleet.folder / f"state-{name}", root=fleet.root_file))


def test_an_older_validly_signed_image_targets_with_a_newer_snapshot_is_refused(fleet):
    """Mix and match: every file is validly signed, but the image targets.json is from before the
    last publish; the snapshot pins the targets version, so the device refuses and installs nothing."""
    agent = _fresh_agent(fleet, "M", "group-m")
    headers = {"Authorization": f"Bearer {fleet.tokens['M']}"}
    old = httpx.get(f"{fleet.url}/tuf/metadata/targets.json", headers=headers).content
    fleet.publish(bundle_tar(fleet.folder / "bundles", name="other", version=7, seed=7), "other", 7)
    fleet.rollout("mitm", 5, "group-m")
    fleet.proxy.rewrite = lambda path, status, h, body: (status, h, old if path == "/tuf/metadata/targets.json"
                                                         else body)
    result = agent.run_once()
    assert result["outcome"] == "failed" and "Expected targets v" in result["error"], result
    assert agent.store.active() is None
    fleet.proxy.rewrite = None
    fleet.rollout("mitm", 5, "group-m")   # the failure report halted the first rollout (threshold 0.2)
    assert agent.run_once()["outcome"] == "installed"
    _assert_good_model_active(agent, "mitm", 5)
    agent.close()


def test_a_director_target_the_image_repository_does_not_sign_is_refused(fleet, monkeypatch):
    """A compromised director key (simulated: the server's director signs a wrong hash for one
    device): the image repository, signed with other keys, disagrees, and nothing is installed."""
    agent = _fresh_agent(fleet, "D", "group-d")
    director = fleet.app.state.fleet.director
    honest = director.wanted

    def forged(device, group):
        want = honest(device, group)
        if device == "dev-d" and want is not None:
            want = {**want, "sha256": "0" * 64}
        return want

    monkeypatch.setattr(director, "wanted", forged)
    fleet.rollout("mitm", 5, "group-d")
    result = agent.run_once()
    assert result["outcome"] == "failed", result
    assert "image and director metadata disagree about the sha256" in result["error"], result
    assert agent.store.active() is None
    monkeypatch.setattr(director, "wanted", honest)
    fleet.rollout("mitm", 5, "group-d")   # the failure report halted the first rollout (threshold 0.2)
    assert agent.run_once()["outcome"] == "installed"
    _assert_good_model_active(agent, "mitm", 5)
    agent.close()
