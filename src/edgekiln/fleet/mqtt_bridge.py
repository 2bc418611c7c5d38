"""The update server's side of MQTT: one paho client that publishes notices (retained, QoS 1) and
receives device telemetry through the shared subscription ``$share/edgekiln/edgekiln/devices/+/telemetry``
(several server processes each get a share, none stores an item twice). Also the device users the
server keeps for the broker (``device_mqtt``), written to ``--mqtt-broker-dir`` on add and remove.

paho is imported inside, so nothing here is needed unless the server is started with ``--mqtt``.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgekiln.errors import EdgekilnError
from edgekiln.fleet import mosquitto

log = logging.getLogger("edgekiln.fleet.mqtt")
PASSWORD_ENV = "EDGEKILN_MQTT_PASSWORD"
PASSWORD_FILE = "server-password"
DEVICE_CACHE_S = 30.0


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """``mqtt[s]://host[:port]`` as ``(host, port, tls)``; a one-line error for anything else.

    >>> parse_mqtt_url("mqtts://broker.example:8883")
    ('broker.example', 8883, True)
    >>> parse_mqtt_url("mqtt://127.0.0.1")
    ('127.0.0.1', 1883, False)
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise EdgekilnError(f"--mqtt {url[:100]}: not a valid URL") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/") \
            or parts.username or parts.query:
        raise EdgekilnError(f"--mqtt {url[:100]}: use mqtts://HOST[:PORT] (or mqtt:// on loopback), "
                            "without user, path or query")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


def server_password(broker_dir: str | Path | None) -> str | None:
    """The server user's MQTT password: ``$EDGEKILN_MQTT_PASSWORD``, else ``BROKER_DIR/server-password``."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if broker_dir is not None:
        path = Path(broker_dir) / PASSWORD_FILE
        if path.is_file():
            return path.read_text().strip() or None
    return None


# -- the broker's device users ---------------------------------------------------------------------
def remember_device(db: Any, name: str, token: str) -> None:
    """Store ``name``'s MQTT passwd line (only at ``POST /v1/devices``: the token exists only there)."""
    user, pw = mosquitto.mqtt_credentials(token)
    with db.transaction(write_lock=True) as tx:
        tx.execute("INSERT INTO device_mqtt (device, device_id, pw_line) VALUES (?, ?, ?) ON CONFLICT (device) "
                   "DO UPDATE SET device_id = excluded.device_id, pw_line = excluded.pw_line",
                   (name, user, mosquitto.password_line(user, pw)))


def forget_device(db: Any, name: str) -> None:
    db.execute("DELETE FROM device_mqtt WHERE device = ?", (name,))


def sync_broker_dir(db: Any, folder: str | Path, password: str) -> int:
    """Rewrite the broker's ``passwd``/``acl`` from ``device_mqtt`` and reload a running broker
    (SIGHUP through its pid file). Returns the number of device users."""
    lines = [r["pw_line"] for r in db.query("SELECT m.pw_line FROM device_mqtt m JOIN devices d ON d.name = m.device "
                                            "ORDER BY m.device")]
    mosquitto.write_users(folder, lines, server_password=password)
    if not mosquitto.reload(folder):
        log.warning("no running broker found through %s/mosquitto.pid; it reads the new users when it starts",
                    folder)
    return len(lines)


class MqttBridge:
    """Publishes notices handed to :meth:`publish`; feeds telemetry to ``store.receive``. Reconnects
    by itself (paho's backoff, 1 to 60 s, plus a random first delay so a fleet of server processes
    does not reconnect in step); on every connect the hub republishes all notices."""

    def __init__(self, url: str, password: str, *, hub: Any, store: Any, db: Any, ca: str | Path | None = None,
                 keepalive_s: int = 60) -> None:
        self.host, self.port, self.tls = parse_mqtt_url(url)
        self.url, self.password, self.ca = url, password, ca
        self.hub, self.store, self.db = hub, store, db
        self.keepalive_s = keepalive_s
        self.connected = False
        self.published = 0
        self._names: dict[str, tuple[str | None, float]] = {}
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def status(self) -> str:
        return "connected" if self.connected else "down"

    def start(self) -> MqttBridge:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                             client_id=f"{mosquitto.SERVER_USER}-{os.getpid()}-{random.getrandbits(32):08x}")
        client.username_pw_set(mosquitto.SERVER_USER, self.password)
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            client.tls_set_context(ctx)
        client.reconnect_delay_set(1, 60)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        client.loop_start()
        return self

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected = False

    def publish(self, dev_id: str, payload: bytes) -> None:
        """A retained QoS 1 notice (``b""`` clears it). While disconnected it is dropped: the hub
        republishes every notice on the next connect."""
        client = self._client
        if client is None or not self.connected:
            return
        client.publish(mosquitto.notice_topic(dev_id), payload, qos=1, retain=True)
        self.published += 1

    # -- paho callbacks (paho's thread) ------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s refused the server: %s", self.url, reason)
            return
        self.connected = True
        log.info("MQTT connected to %s", self.url)
        client.subscribe(mosquitto.SHARED_TELEMETRY, qos=1)
        try:
            self.hub.republish()
        except Exception:  # noqa: BLE001 - the next connect tries again; polling covers meanwhile
            log.exception("republishing notices failed")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.connected:
            log.warning("MQTT connection to %s lost (%s); reconnecting", self.url, reason)
        self.connected = False
        time.sleep(random.uniform(0, 0.5))   # jitter before paho's own backoff

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # NOTE: everything is caught: a malformed payload is dropped and counted, never raised into paho.
        try:
            parts = msg.topic.split("/")
            name = self._device(parts[2]) if len(parts) == 4 and parts[3] == "telemetry" else None
            if name is None:
                self.store.refuse("bad_type")
                return
            self.store.receive(name, msg.payload)
        except Exception:  # noqa: BLE001
            log.exception("telemetry message on %s dropped", getattr(msg, "topic", "?")[:120])
            self.store.refuse("bad_type")

    def _device(self, dev_id: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            hit = self._names.get(dev_id)
        if hit is not None and now - hit[1] < DEVICE_CACHE_S:
            return hit[0]
        rows = self.db.query("SELECT device FROM device_mqtt WHERE device_id = ?", (dev_id,))
        name = rows[0]["device"] if rows else None
        with self._lock:
            self._names[dev_id] = (name, now)
        return name

    def forget(self, name: str) -> None:
        with self._lock:
            for dev_id in [d for d, (n, _) in self._names.items() if n == name]:
                del self._names[dev_id]


# -- the server's hooks ----------------------------------------------------------------------------
def start_mqtt(fleet: Any) -> MqttBridge | None:
    """With ``config.mqtt_url``: connect the bridge and keep the notice worker running; with
    ``config.mqtt_broker_dir``: write the broker's users now. Returns the bridge or None."""
    config = fleet.config
    password = config.mqtt_password or server_password(config.mqtt_broker_dir)
    if config.mqtt_broker_dir is not None:
        if password is None:
            raise EdgekilnError(f"--mqtt-broker-dir {config.mqtt_broker_dir}: no server password (set "
                                f"{PASSWORD_ENV}, or run `edgekiln broker config {config.mqtt_broker_dir}` first)")
        sync_broker_dir(fleet.db, config.mqtt_broker_dir, password)
    if config.mqtt_url is None:
        return None
    if password is None:
        raise EdgekilnError(f"--mqtt {config.mqtt_url}: no server password (set {PASSWORD_ENV}, or give "
                            "--mqtt-broker-dir with a server-password file)")
    bridge = MqttBridge(config.mqtt_url, password, hub=fleet.hub, store=fleet.telemetry, db=fleet.db,
                        ca=config.mqtt_ca)
    fleet.hub.publisher = bridge.publish
    fleet.hub.start()
    return bridge.start()


def device_added(fleet: Any, name: str, token: str) -> None:
    remember_device(fleet.db, name, token)
    _sync(fleet)
    fleet.hub.poke()


def device_removed(fleet: Any, name: str) -> None:
    forget_device(fleet.db, name)
    fleet.telemetry.forget(name)
    if fleet.mqtt is not None:
        fleet.mqtt.forget(name)
    _sync(fleet)
    fleet.hub.poke()


def _sync(fleet: Any) -> None:
    config = fleet.config
    if config.mqtt_broker_dir is not None:
        password = config.mqtt_password or server_password(config.mqtt_broker_dir)
        if password is not None:
            sync_broker_dir(fleet.db, config.mqtt_broker_dir, password)
