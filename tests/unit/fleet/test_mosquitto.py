"""The broker files edgekiln writes, checked against a real Mosquitto on loopback."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from edgekiln.fleet import mosquitto
from edgekiln.fleet.mosquitto import MosquittoBroker, mqtt_credentials, password_line

pytestmark = pytest.mark.skipif(mosquitto.find_mosquitto() is None,
                                reason=f"mosquitto not installed (PATH={os.environ.get('PATH', '')}); "
                                       "scripts/system-deps.sh installs it")


def _connect(url: str, user: str, pw: str) -> int:
    """The CONNACK reason code (0 = accepted) for ``user``/``pw``."""
    import paho.mqtt.client as mqtt

    port = int(url.rsplit(":", 1)[1])
    done, result = threading.Event(), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user[:8]}-{os.getpid()}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, pw)

    def on_connect(client, userdata, flags, reason, props):  # noqa: ANN001
        result.append(reason.value)
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, keepalive=10)
    deadline = time.monotonic() + 5
    while not done.is_set():   # driven here, not by loop_start(): its thread takes 1 s to end
        assert time.monotonic() < deadline, "no CONNACK within 5 s"
        c.loop(timeout=0.01)
    c.disconnect()
    return result[0]


def test_credentials_are_stable_and_not_the_token() -> None:
    token = "ekd_" + "x1y2z3" * 7
    assert mqtt_credentials(token) == mqtt_credentials(token)
    user, pw = mqtt_credentials(token)
    assert user == mosquitto.device_id(token) and len(user) == 32
    assert token not in pw and pw != mqtt_credentials(token + "a")[1]
    line = password_line(user, pw, salt=b"0123456789ab")
    assert line == password_line(user, pw, salt=b"0123456789ab") != password_line(user, pw)
    with pytest.raises(Exception, match="may not contain"):
        password_line("a:b", pw)


def test_generated_files_and_sighup_admit_a_new_device(tmp_path) -> None:
    pytest.importorskip("paho.mqtt")
    a_user, a_pw = mqtt_credentials("ekd_device-a-token-0123456789")
    b_user, b_pw = mqtt_credentials("ekd_device-b-token-0123456789")
    broker = MosquittoBroker(tmp_path / "broker", users={a_user: a_pw})
    for name in ("passwd", "acl", "mosquitto.conf"):
        mode = stat.S_IMODE((tmp_path / "broker" / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}, want 0o600"
    with broker as url:
        assert url.startswith("mqtt://127.0.0.1:")
        assert _connect(url, a_user, a_pw) == 0
        assert _connect(url, mosquitto.SERVER_USER, broker.server_password) == 0
        assert _connect(url, a_user, b_pw) != 0, "a wrong password was accepted"
        assert _connect(url, b_user, b_pw) != 0, "a user not yet in passwd was accepted"
        broker.lines[b_user] = password_line(b_user, b_pw)
        broker.write()
        assert mosquitto.reload(tmp_path / "broker"), "no pid file to reload through"
        for _ in range(50):   # SIGHUP is handled asynchronously by the broker's loop
            if _connect(url, b_user, b_pw) == 0:
                break
        else:
            pytest.fail("the new device was still refused after SIGHUP")
        broker.kill()
        assert not mosquitto.reload(tmp_path / "nowhere")
        broker.start()
        assert _connect(url, a_user, a_pw) == 0, "the restarted broker refused a known device"


def _wait(cond, timeout_s=3.0, what=""):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.01)


def test_server_bridge_publishes_retained_notices_and_stores_telemetry(tmp_path) -> None:
    """The real app with --mqtt: a device gets its retained notice and its telemetry is stored;
    the broker files written through --mqtt-broker-dir admit a device added after the broker started."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    from fleet_server_helpers import bundle_tar, start_server

    broker = MosquittoBroker(tmp_path / "broker")
    with broker as url:
        server = start_server(tmp_path / "srv", mqtt_url=url, mqtt_password=broker.server_password,
                              mqtt_broker_dir=str(tmp_path / "broker"), notice_sweep_s=0.2)
        fleet = server.app.state.fleet
        try:
            _wait(lambda: fleet.mqtt.connected, what="the server's MQTT connection")
            assert server.client.get("/healthz").json() == {"ok": True, "mqtt": "connected"}
            token = server.add_device("cam-1")["Authorization"].split()[1]
            assert server.publish(bundle_tar(tmp_path, 1), version=1).status_code == 201
            r = server.client.post("/v1/rollouts", json={"model": "digits", "version": 1, "group": "lab"},
                                   headers=server.admin())
            assert r.status_code == 201, r.text
            user, pw = mqtt_credentials(token)
            got: list[bytes] = []
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
            c.username_pw_set(user, pw)   # admitted only through the rewritten passwd + SIGHUP
            c.on_message = lambda client, userdata, msg: got.append(msg.payload)
            c.connect("127.0.0.1", broker.port, keepalive=10)
            c.subscribe(mosquitto.notice_topic(user), qos=1)
            c.loop_start()
            try:
                rev = fleet.hub.current("cam-1")["rev"]
                _wait(lambda: any(b'"rev":"' + rev.encode() in p for p in got), what=f"the retained notice {rev}")
                c.publish(mosquitto.telemetry_topic(user), json.dumps({"batch": [{"t": 1, "health": "ok"}]}), qos=1)
                c.publish(mosquitto.telemetry_topic(user), b"\x00not json", qos=1)
                _wait(lambda: fleet.telemetry.counters()["dropped"]["not_json"] == 1, what="the bad payload counted")
                items = server.client.get("/v1/devices/cam-1/telemetry", headers=server.admin()).json()
                assert [i["health"] for i in items] == ["ok"], items
            finally:
                c.disconnect()
                c.loop_stop()
        finally:
            fleet.close()
