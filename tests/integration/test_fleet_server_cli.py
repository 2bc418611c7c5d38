"""`edgekiln serve` as a real uvicorn process over https (a test CA), driven by the operator CLI; kill -9
mid-publish."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

ADMIN = "integration-admin-token-0123456789"
EXE = [sys.executable, "-m", "edgekiln.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("EDGEKILN_ADMIN_TOKEN", None)
    env.update(extra)
    return env


def _cli(*args: str, token: str = ADMIN, server: str | None = None, ca: Path | None = None,
         ) -> subprocess.CompletedProcess[str]:
    env = _env(EDGEKILN_ADMIN_TOKEN=token, **({"EDGEKILN_SERVER": server} if server else {}),
               **({"EDGEKILN_CA": str(ca)} if ca else {}))
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def served(tmp_path):
    """The server on https://127.0.0.1:PORT; yields (url, folder, ca)."""
    from edgekiln.fleet.keys import init_keys
    from edgekiln.fleet.load import wait_until_healthy
    from edgekiln.fleet.tls_testing import make_test_ca
    from edgekiln.fleet.tuf_repo import TufExpiry

    port = _free_port()
    folder = tmp_path / "srv"
    ca, cert, key = make_test_ca(tmp_path / "tls")
    init_keys(folder / "keys", tmp_path / "offline" / "root.pem", expiry=TufExpiry())
    proc = subprocess.Popen([*EXE, "serve", "--db", f"sqlite:///{folder / 'fleet.db'}", "--store", str(folder / "blobs"),
                             "--keys", str(folder / "keys"), "--port", str(port), "--tls-cert", str(cert),
                             "--tls-key", str(key), "--ws-ping", "30", "--push-poll-interval", "600"],
                            env=_env(EDGEKILN_ADMIN_TOKEN=ADMIN), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"https://127.0.0.1:{port}"
    wait_until_healthy(url, proc, ca=ca)
    yield url, folder, ca
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_operator_cli_drives_a_real_server(served, tmp_path):
    from edgekiln.fleet.sample import sample_bundle

    url, folder, ca = served
    ctx = ssl.create_default_context(cafile=str(ca))
    assert (folder / "keys" / "root.json").is_file()
    added = _cli("devices", "add", "cam-1", "--group", "lab", "--server", url, "--ca", str(ca))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("ekd_")
    bundle = sample_bundle(tmp_path / "bundle", version=1)
    pub = _cli("publish", str(bundle), "--server", url, "--channel", "stable", ca=ca)
    assert pub.returncode == 0 and "published digits v1 on stable" in pub.stdout, pub.stdout + pub.stderr
    again = _cli("publish", str(bundle), "--server", url, ca=ca)
    assert again.returncode != 0 and "409" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    start = _cli("rollout", "start", "digits", "1", "--group", "lab", "--percent", "100", "--json", server=url, ca=ca)
    assert start.returncode == 0, start.stderr
    rid = json.loads(start.stdout)["id"]
    r = httpx.get(f"{url}/v1/device/assignment", headers={"Authorization": f"Bearer {token}"}, verify=ctx)
    assert r.json()["version"] == 1
    part = httpx.get(f"{url}/tuf/targets/digits/1/bundle.tar",
                     headers={"Authorization": f"Bearer {token}", "Range": "bytes=100-"}, verify=ctx)
    assert part.status_code == 206 and part.headers["content-range"].startswith("bytes 100-")
    for cmd in (["rollout", "pause", str(rid)], ["rollout", "resume", str(rid)], ["rollout", "status", str(rid)],
                ["rollout", "status"]):
        out = _cli(*cmd, server=url, ca=ca)
        assert out.returncode == 0, (cmd, out.stderr)
    status = json.loads(_cli("rollout", "status", str(rid), "--json", server=url, ca=ca).stdout)
    assert status["state"] == "running" and status["devices"][0]["selected"] is True
    # push over the real uvicorn (ws="websockets-sansio"): the current notice arrives at once
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    wss = url.replace("https://", "wss://") + "/v1/device/notices"
    with connect(wss, additional_headers={"Authorization": f"Bearer {token}"}, ssl=ctx, open_timeout=10) as ws:
        notice = json.loads(ws.recv(timeout=5))
        assert notice["type"] == "notice" and len(notice["rev"]) == 16 and notice["v"] == 1, notice
        ws.send(json.dumps({"type": "telemetry", "batch": [{"t": time.time(), "health": "ok", "variant": "int8"}]}))
        deadline = time.monotonic() + 5
        while not (seen := httpx.get(f"{url}/v1/devices/cam-1/telemetry", headers={"Authorization": f"Bearer {ADMIN}"},
                                     verify=ctx).json()):
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
    listed = _cli("devices", "list", server=url, ca=ca).stdout
    assert "cam-1" in listed and "int8" in listed, listed
    history = _cli("devices", "telemetry", "cam-1", server=url, ca=ca)
    assert history.returncode == 0 and "int8" in history.stdout and "ok" in history.stdout, history
    with pytest.raises(InvalidStatus) as refused:
        connect(wss, additional_headers={"Authorization": "Bearer ekd_wrong"}, ssl=ctx, open_timeout=10)
    assert refused.value.response.status_code == 403
    assert httpx.get(f"{url}/v1/device/settings", headers={"Authorization": f"Bearer {token}"},
                     verify=ctx).json() == {"mqtt": None, "websocket": "/v1/device/notices", "push_poll_s": 600.0,
                                            "telemetry_every_s": 300.0}
    # the device side over the same https: an in-process agent trusting the test CA installs v1
    from edgekiln.fleet.agent import Agent, AgentConfig

    agent = Agent(AgentConfig(server=url, token=token, state_dir=tmp_path / "device",
                              root=folder / "keys" / "root.json", ca=ca, latency_runs=1))
    try:
        assert agent.run_once()["outcome"] == "installed"
        assert agent.store.active().version == 1
    finally:
        agent.close()


def test_bad_token_untrusted_and_unreachable_servers_are_one_line_errors(served):
    url, _, ca = served
    bad = _cli("devices", "list", "--server", url, token="wrong-token-wrong-token", ca=ca)
    assert bad.returncode != 0 and "401" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    untrusted = _cli("devices", "list", "--server", url)  # no --ca: the test CA is not in the system store
    assert untrusted.returncode == 4 and "TLS certificate of 127.0.0.1 not trusted" in untrusted.stderr, \
        untrusted.stderr
    gone = _cli("devices", "list", "--server", f"http://127.0.0.1:{_free_port()}")
    assert gone.returncode == 4 and "cannot reach the update server" in gone.stderr, gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1, gone.stderr


def test_serve_without_an_admin_token_refuses_to_start(tmp_path):
    out = subprocess.run([*EXE, "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--store", str(tmp_path / "b"),
                          "--keys", str(tmp_path / "k")], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 2 and "EDGEKILN_ADMIN_TOKEN" in out.stderr, out.stderr


KILLER = textwrap.dedent("""
    import os, sys
    from fastapi.testclient import TestClient
    from edgekiln.fleet.server import ServerConfig, create_app
    folder, step, tar = sys.argv[1], sys.argv[2], sys.argv[3]
    def fault(at):
        if at == step:
            os.kill(os.getpid(), 9)   # kill -9 at this step: no cleanup, no rollback handler runs
    app = create_app(ServerConfig.local(folder, admin_token=sys.argv[4]), fault=fault)
    c = TestClient(app)
    c.post("/v1/models/digits/versions/1", content=open(tar, "rb").read(),
           headers={"Authorization": "Bearer " + sys.argv[4]})
    sys.exit(3)
""")


@pytest.mark.parametrize("step", ["spooled", "stored", "registered", "signed-snapshot", "signed-timestamp"])
def test_kill_9_mid_publish_leaves_nothing_visible_and_a_retry_succeeds(tmp_path, step):
    from fastapi.testclient import TestClient

    from edgekiln.fleet.client import tar_bundle
    from edgekiln.fleet.sample import sample_bundle
    from edgekiln.fleet.server import ServerConfig, create_app

    tar = tar_bundle(sample_bundle(tmp_path / "b", version=1), tmp_path / "b.tar")
    folder = tmp_path / "srv"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(folder), step, str(tar), ADMIN], env=_env(), timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -9, (step, proc.returncode, proc.stderr[-500:])
    left = [p.name for p in (folder / "spool").iterdir()]
    assert len(left) == 1 and left[0].startswith("upload-"), left  # the killed upload's folder
    c = TestClient(create_app(ServerConfig.local(folder, admin_token=ADMIN)))
    assert list((folder / "spool").iterdir()) == [], "a dead server's upload folder must be removed at start"
    h = {"Authorization": "Bearer " + ADMIN}
    assert c.get("/v1/models", headers=h).json() == []
    targets = json.loads(c.get("/tuf/metadata/targets.json", headers=h).content)["signed"]
    assert targets["targets"] == {} and targets["version"] == 1, targets
    assert c.get("/tuf/targets/digits/1/bundle.tar", headers=h).status_code == 404
    r = c.post("/v1/models/digits/versions/1", content=Path(tar).read_bytes(), headers=h)
    assert r.status_code == 201, r.text
    assert c.get("/tuf/targets/digits/1/bundle.tar", headers=h).content == Path(tar).read_bytes()


def test_broker_config_and_serve_mqtt_options_are_checked(tmp_path, capsys):
    from cli_run import run_cli

    from edgekiln.fleet.tls_testing import make_test_ca

    _, cert, key = make_test_ca(tmp_path / "tls")
    broker = tmp_path / "broker"
    assert run_cli(["broker", "config", broker, "--port", "18883", "--tls-cert", cert, "--tls-key", key]) == 0
    out = capsys.readouterr().out
    assert "mosquitto -c" in out and "--mqtt mqtts://127.0.0.1:18883" in out, out
    conf = (broker / "mosquitto.conf").read_text()
    assert "listener 18883 127.0.0.1" in conf and f"certfile {cert.resolve()}" in conf, conf
    assert "allow_anonymous false" in conf and (broker / "server-password").stat().st_mode & 0o077 == 0
    (broker / "passwd").write_text((broker / "passwd").read_text() + "dev1:$7$101$abc$def\n")
    assert run_cli(["broker", "config", broker]) == 0    # again: the device user is kept
    assert "dev1:$7$101$abc$def" in (broker / "passwd").read_text()
    for argv, message in (
            (["broker", "config", tmp_path / "b2", "--bind", "0.0.0.0"], "refusing a plain MQTT listener"),
            (["broker", "config", tmp_path / "b3", "--tls-cert", cert], "together"),
            (["serve", "--mqtt", "http://127.0.0.1:1883"], "use mqtts://HOST[:PORT]"),
            (["serve", "--mqtt", "mqtt://broker.example:1883"], "sends passwords in clear"),
            (["serve", "--mqtt", "mqtts://127.0.0.1:8883", "--mqtt-ca", tmp_path / "nope.pem"], "file not found"),
            (["serve", "--mqtt-broker-dir", tmp_path / "missing"], "not a folder"),
            (["serve", "--ws-ping", "-1"], "must be 0 (no server pings) or a positive number"),
            (["serve", "--push-poll-interval", "nan"], "must be a positive number")):
        code = run_cli(argv)
        err = capsys.readouterr().err.strip()
        assert code != 0 and message in err and len(err.splitlines()) == 1, (argv, code, err)
