"""Push notices and telemetry against a real Mosquitto and the real server on loopback (issue 23).

One TLS server and one mqtts broker per module; each test uses its own devices, group and model.
The agents are in-process :class:`Agent`s whose daemon loop (``agent_loop.serve``) runs in a
thread. "No poll" is enforced with ``interval_s=3600`` and ``push_poll_s=3600``: an install that
starts within 2 s of the rollout can only have been started by a notice. "The agent starts
installing" is the ``state:pending`` checkpoint. Skipped (with the reason) without ``mosquitto``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgekiln.fleet import agent_loop
from edgekiln.fleet.agent_testing import FleetHarness, LoopbackServer, bundle_tar
from edgekiln.fleet.mosquitto import (
    MosquittoBroker,
    find_mosquitto,
    mqtt_credentials,
    notice_topic,
    telemetry_topic,
)
from edgekiln.fleet.push import MqttNotices, Wakeup, WebSocketNotices
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.slot_health import health_check_slot
from edgekiln.fleet.slots import SlotStore
from edgekiln.fleet.tls_testing import make_test_ca
from edgekiln.runtime.engine import Runtime
from edgekiln.runtime.transport_security import client_ssl_context

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not found on PATH "
                                f"({os.environ.get('PATH', '')}) or in /usr/sbin: apt-get install mosquitto "
                                "(scripts/system-deps.sh)")
ADMIN = "admin-token-for-the-push-test-0123456789"
PUSH_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_test_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def broker(tls, tmp_path_factory):
    _, cert, key = tls
    b = MosquittoBroker(tmp_path_factory.mktemp("broker"), tls=(cert, key))
    b.start()
    yield b
    b.stop()


def _server(folder: Path, tls: Any, **mqtt: Any) -> Any:
    ca, cert, key = tls
    app = create_app(ServerConfig.local(folder, admin_token=ADMIN, **mqtt))
    return LoopbackServer(app, ssl_certfile=cert, ssl_keyfile=key), ca


@pytest.fixture(scope="module")
def fleet(broker, tls, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    server, ca = _server(folder, tls, mqtt_url=broker.url, mqtt_ca=str(tls[0]), mqtt_password=broker.server_password,
                         mqtt_broker_dir=str(broker.folder))
    with server as url:
        yield FleetHarness(url, folder, ADMIN, ca=ca)


class Daemon:
    """An in-process agent whose daemon loop runs in a thread; records when installs start."""

    def __init__(self, fleet: FleetHarness, state: Path, token: str, *, push: str, interval_s: float = 3600.0,
                 push_poll_s: float = 3600.0) -> None:
        self.lines: list[str] = []
        self.pending: list[float] = []
        self.notices: list[tuple[float, str]] = []
        self.channel: Any = None
        self.state = state
        self.wake = Wakeup()
        heard = self.wake.notice

        def notice(rev: str) -> None:
            self.notices.append((time.monotonic(), rev))
            heard(rev)

        self.wake.notice = notice  # type: ignore[method-assign]
        self.agent = fleet.agent(state, token, checkpoint=self._checkpoint, log=self.lines.append)
        self.thread = threading.Thread(target=agent_loop.serve, args=(self.agent,), daemon=True, kwargs={
            "interval_s": interval_s, "push": push, "push_poll_s": push_poll_s, "push_jitter_s": 0.0,
            "wake": self.wake, "backoff_max_s": 0.2, "on_channel": self._set_channel})

    def _checkpoint(self, name: str) -> None:
        if name == "state:pending":
            self.pending.append(time.monotonic())

    def _set_channel(self, channel: Any) -> None:
        self.channel = channel

    def __enter__(self) -> Daemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wake.stop()
        if self.channel is not None:
            self.channel.close()
        self.thread.join(timeout=20)
        self.agent.close()
        assert not self.thread.is_alive(), "the daemon thread did not stop"

    def connected(self) -> bool:
        return self.channel is not None and bool(self.channel.connected)

    def active(self) -> int | None:
        active = SlotStore(self.state).active()
        return None if active is None else active.version


def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def _assert_good_model_active(state: Path, version: int) -> None:
    active = SlotStore(state).active()
    assert active is not None and active.version == version, f"active {active}, expected v{version}"
    check = health_check_slot(active.path, latency_runs=1)
    assert check["ok"], check
    y = Runtime(active.path, warmup=0).infer(np.zeros((1, 1, 8, 8), np.float32))
    assert y.shape == (1, 10) and np.isfinite(y).all()


def _admin(fleet: FleetHarness) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, verify=client_ssl_context(fleet.ca),
                        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def _publish(fleet: FleetHarness, folder: Path, model: str, *versions: int) -> None:
    for v in versions:
        fleet.publish(bundle_tar(folder, name=model, version=v, seed=v), model, v)


def _rollout_and_time(fleet: FleetHarness, daemon: Daemon, model: str, version: int, group: str) -> float:
    """Start the rollout; seconds from its response to the agent's ``state:pending``."""
    before = len(daemon.pending)
    fleet.rollout(model, version, group)
    t0 = time.monotonic()
    _until(lambda: len(daemon.pending) > before, 10, f"{model} v{version}: the agent did not start installing")
    return daemon.pending[before] - t0


def _mqtt_client(broker: MosquittoBroker, ca: Path, user: str, password: str) -> tuple[Any, dict[str, Any]]:
    """A raw paho client, driven by hand with ``loop()`` (no background thread)."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.tls_set_context(client_ssl_context(ca))
    seen: dict[str, Any] = {"messages": [], "suback": {}, "puback": {}}
    c.on_connect = lambda cl, u, f, rc, p: seen.__setitem__("connack", rc)
    c.on_message = lambda cl, u, m: seen["messages"].append((m.topic, m.payload))
    c.on_subscribe = lambda cl, u, mid, rcs, p: seen["suback"].__setitem__(mid, rcs)
    c.on_publish = lambda cl, u, mid, rc, p: seen["puback"].__setitem__(mid, rc)
    c.connect("127.0.0.1", broker.port)
    return c, seen


def _admitted_client(broker: MosquittoBroker, ca: Path, user: str, password: str) -> tuple[Any, dict[str, Any]]:
    """A connected raw client; retried for a moment, as the broker may still be re-reading its
    passwd file (SIGHUP) for a device added a millisecond ago."""
    deadline = time.monotonic() + 3
    while True:
        client, seen = _mqtt_client(broker, ca, user, password)
        _pump(client, 3, lambda seen=seen: "connack" in seen)
        if "connack" in seen and not seen["connack"].is_failure:
            return client, seen
        client.disconnect()
        assert time.monotonic() < deadline, f"{user} not admitted by the broker: {seen.get('connack')}"
        time.sleep(0.05)


def _pump(clients: Any, seconds: float, until: Callable[[], Any] = lambda: False) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        for client in clients if isinstance(clients, tuple) else (clients,):
            client.loop(0.005)


def test_acl_device_cannot_read_or_write_other_topics(fleet, broker, tls):
    ca = tls[0]
    tokens = {n: fleet.device(n, "acl") for n in ("acl-a", "acl-b")}
    (ua, pa), (ub, pb) = mqtt_credentials(tokens["acl-a"]), mqtt_credentials(tokens["acl-b"])
    with _admin(fleet) as admin:
        before = admin.get("/v1/telemetry/stats").json()
    b, seen_b = _admitted_client(broker, ca, ub, pb)
    a, seen_a = _admitted_client(broker, ca, ua, pa)
    b.subscribe(notice_topic(ub), qos=1)
    _, mid = a.subscribe(notice_topic(ub), qos=1)
    _pump((a, b), 3, lambda: seen_b["messages"])
    _pump((a, b), 0.5)   # NOTE: what A must not get would arrive in milliseconds, like B's own notice
    assert seen_b["messages"] and seen_b["messages"][0][0] == notice_topic(ub), "B got no retained notice"
    assert json.loads(seen_b["messages"][0][1])["v"] == 1
    assert not seen_a["suback"][mid][0].is_failure, "mosquitto grants the SUBACK and filters at delivery"
    assert seen_a["messages"] == [], f"A received B's notice: {seen_a['messages']}"
    a.subscribe("edgekiln/devices/+/notice", qos=1)
    _pump(a, 0.3)
    assert {t for t, _ in seen_a["messages"]} == {notice_topic(ua)}, seen_a["messages"]
    info = a.publish(telemetry_topic(ub), b'{"batch":[{"t":1}]}', qos=1)
    _pump(a, 3, lambda: info.mid in seen_a["puback"])
    assert seen_a["puback"][info.mid].value == 0x87, f"A's publish to B's telemetry: {seen_a['puback'][info.mid]}"
    for topic in (notice_topic(ub), notice_topic(ua)):   # notices come from the server only, even one's own
        info = a.publish(topic, b'{"v":1,"rev":"0000000000000000","seq":1}', qos=1, retain=True)
        _pump(a, 3, lambda info=info: info.mid in seen_a["puback"])
        assert seen_a["puback"][info.mid].value == 0x87, f"A's publish to {topic}: {seen_a['puback'][info.mid]}"
    a.disconnect()
    b.disconnect()
    bad, seen_bad = _mqtt_client(broker, ca, ua, "not-the-password")
    _pump(bad, 3, lambda: "connack" in seen_bad)
    assert seen_bad["connack"].is_failure and "authori" in str(seen_bad["connack"]).lower(), seen_bad
    with _admin(fleet) as admin:
        after = admin.get("/v1/telemetry/stats").json()
    assert after["received"] == before["received"], (before, after)


def test_mqtt_notice_starts_install_within_2s(fleet, tmp_path):
    token = fleet.device("push-a", "push-a")
    _publish(fleet, tmp_path, "pusha", 1, 2)
    fleet.rollout("pusha", 1, "push-a")
    with Daemon(fleet, tmp_path / "push-a", token, push="mqtt") as d:
        _until(lambda: d.active() == 1 and d.connected(), 15, "v1 installed and MQTT connected")
        delay = _rollout_and_time(fleet, d, "pusha", 2, "push-a")
        assert delay < PUSH_LIMIT_S, f"the install started {delay:.3f} s after the rollout (limit {PUSH_LIMIT_S} s)"
        assert d.notices and d.notices[-1][0] <= d.pending[-1], "the cycle was not started by a notice"
        _until(lambda: d.active() == 2, 15, "v2 installed")
    assert any("push: mqtt connected" in line for line in d.lines), d.lines
    _assert_good_model_active(tmp_path / "push-a", 2)


def test_telemetry_arrives_malformed_dropped_counted(fleet, broker, tls):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ca = tls[0]
    token, bad_token = fleet.device("tele-a", "tele"), fleet.device("tele-bad", "tele")
    user, pw = mqtt_credentials(token)
    item = {"t": int(time.time()), "model": "digits", "ver": 1, "variant": "int8", "p50": 1.0, "p95": 2.5,
            "health": "degraded", "disk_free": 123456, "pending": None}
    mq = MqttNotices(broker.url, user, pw, ca=ca, on_notice=lambda rev: None, backoff_max_s=0.2)
    ws = WebSocketNotices(fleet.url, token, ca=ca, on_notice=lambda rev: None, backoff_max_s=0.2)
    for ch in (mq, ws):
        ch.start()
    try:
        _until(lambda: mq.connected and ws.connected, 5, f"both channels connected ({mq.error}, {ws.error})")
        assert mq.send_telemetry([item])
        assert ws.send_telemetry([{**item, "p95": 3.5, "health": "ok"}])
        with _admin(fleet) as admin:
            history = _until(lambda: len(h := admin.get("/v1/devices/tele-a/telemetry").json()) >= 2 and h, 5,
                             "2 telemetry items in the history")
            assert len(history) == 2, history
            row = {d["name"]: d for d in admin.get("/v1/devices").json()}["tele-a"]["telemetry"]
            assert row["variant"] == "int8" and row["p95"] in (2.5, 3.5) and row["health"] in ("ok", "degraded"), row
            before = admin.get("/v1/telemetry/stats").json()
            with connect(fleet.url.replace("https", "wss") + "/v1/device/notices", ssl=client_ssl_context(ca),
                         additional_headers={"Authorization": f"Bearer {bad_token}"}) as raw:
                good = {"t": 1}
                for frame in ("not json", '{"type":"telemetry","batch":[{"t":NaN}]}',
                              json.dumps({"type": "telemetry", "batch": [{**good, "colour": "red"}]}),
                              json.dumps({"type": "telemetry", "batch": [good] * 20})):
                    raw.send(frame)
                raw.ping().wait(2)   # still open after four bad frames
                raw.send(json.dumps({"type": "telemetry", "batch": [{"t": 1, "model": "x" * 5000}]}))
                with pytest.raises(ConnectionClosed) as closed:
                    for _ in range(20):
                        raw.recv(timeout=2)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value
            after = _until(lambda: sum(admin.get("/v1/telemetry/stats").json()["dropped"].values())
                           >= sum(before["dropped"].values()) + 5 and admin.get("/v1/telemetry/stats").json(), 5,
                           "5 refusals counted")
            grew = {r for r in ("not_json", "non_finite", "unknown_key", "too_many", "too_large")
                    if after["dropped"].get(r, 0) > before["dropped"].get(r, 0)}
            assert grew == {"not_json", "non_finite", "unknown_key", "too_many", "too_large"}, (before, after)
            assert httpx.get(fleet.url + "/healthz", verify=client_ssl_context(ca)).status_code == 200
    finally:
        mq.close()
        ws.close()


def test_websocket_push_without_broker(tls, tmp_path):
    server, ca = _server(tmp_path / "server", tls)
    with server as url:
        fleet = FleetHarness(url, tmp_path / "server", ADMIN, ca=ca)
        token = fleet.device("ws-a", "ws")
        _publish(fleet, tmp_path, "wsm", 1, 2)
        fleet.rollout("wsm", 1, "ws")
        with Daemon(fleet, tmp_path / "ws-a", token, push="auto") as d:
            _until(lambda: d.active() == 1 and d.connected(), 15, "v1 installed and the WebSocket connected")
            assert d.channel.kind == "websocket"
            delay = _rollout_and_time(fleet, d, "wsm", 2, "ws")
            assert delay < PUSH_LIMIT_S, f"the install started {delay:.3f} s after the rollout (limit {PUSH_LIMIT_S} s)"
            _until(lambda: d.active() == 2, 15, "v2 installed")
        bad = WebSocketNotices(url, "not-a-device-token", ca=ca, on_notice=lambda rev: None)
        bad.start()
        assert not bad.wait_first_attempt(5) and "HTTP 403" in str(bad.error), bad.error
        bad.close()
    _assert_good_model_active(tmp_path / "ws-a", 2)


def test_broker_down_agent_polls(fleet, broker, tmp_path):
    token = fleet.device("down-a", "down")
    _publish(fleet, tmp_path, "downm", 1, 2)
    broker.stop()
    try:
        with Daemon(fleet, tmp_path / "down-a", token, push="mqtt", interval_s=0.3) as d:
            _until(lambda: any("push unavailable (" in line and "); polling every 0.3 s" in line for line in d.lines),
                   5, "the 'push unavailable' line")
            fleet.rollout("downm", 2, "down")
            _until(lambda: d.active() == 2, 15, "v2 installed by polling")
    finally:
        broker.start()
    _assert_good_model_active(tmp_path / "down-a", 2)


def test_broker_gone_mid_session(fleet, broker, tmp_path):
    token = fleet.device("gone-a", "gone")
    _publish(fleet, tmp_path, "gonem", 1, 2, 3)
    fleet.rollout("gonem", 1, "gone")
    with Daemon(fleet, tmp_path / "gone-a", token, push="mqtt", interval_s=0.5) as d, _admin(fleet) as admin:
        _until(lambda: d.active() == 1 and d.connected(), 15, "v1 installed and MQTT connected")
        broker.kill()
        try:
            _until(lambda: not d.connected(), 5, "the agent noticed the broker is gone")
            fleet.rollout("gonem", 2, "gone")
            _until(lambda: d.active() == 2, 15, "v2 installed by polling while the broker is down")
        finally:
            broker.start()
        _until(lambda: d.connected() and admin.get("/healthz").json()["mqtt"] == "connected", 20,
               "the agent and the server reconnected to the restarted broker")
        delay = _rollout_and_time(fleet, d, "gonem", 3, "gone")
        assert delay < PUSH_LIMIT_S, f"after the restart the install started {delay:.3f} s after the rollout"
        _until(lambda: d.active() == 3, 15, "v3 installed")
    _assert_good_model_active(tmp_path / "gone-a", 3)


def test_mqtt_channel_writes_its_socket_from_its_own_thread_only(fleet, broker, tls, monkeypatch):
    """paho's ``publish`` called from another thread writes the socket itself when the client is driven
    by ``loop()``, racing the loop's PUBACK/PINGREQ writes: Mosquitto then closed ~2-4% of 200 channels
    with "Protocol error" (keepalive 2 s, telemetry every 50 ms, one process). Telemetry is queued for the
    channel's thread instead; every write must come from it."""
    import paho.mqtt.client as mqtt

    writers: set[str] = set()
    real = mqtt.Client._packet_write

    def spy(self: Any) -> Any:
        writers.add(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(mqtt.Client, "_packet_write", spy)
    token = fleet.device("tele-thread", "tele-thread")
    user, pw = mqtt_credentials(token)
    mq = MqttNotices(broker.url, user, pw, ca=tls[0], on_notice=lambda rev: None, backoff_max_s=0.2)
    mq.start()
    try:
        _until(lambda: mq.connected, 5, f"MQTT connected ({mq.error})")
        now = int(time.time())
        sent = [mq.send_telemetry([{"t": now + k, "model": "digits", "ver": 1, "p50": 1.0}]) for k in range(5)]
        assert all(sent), f"send_telemetry results {sent} on a connected channel"
        with _admin(fleet) as admin:
            _until(lambda: len(admin.get("/v1/devices/tele-thread/telemetry").json()) >= 1, 5,
                   "telemetry in the history")
    finally:
        mq.close()
    ours = {w for w in writers if not w.startswith("paho-mqtt-client-")}   # the server's bridge: paho's own thread
    assert ours == {"edgekiln-mqtt"}, f"device socket written from threads {sorted(ours)}, expected only edgekiln-mqtt"
