"""Push channels of the device agent: a notice wakes the daemon loop early (docs/fleet-protocol.md).

A notice is ``{"v": 1, "rev": "<16 hex>", "seq": N}``: it carries no authority and no model
name, only "your assignment may have changed". The agent still fetches and verifies the signed
director and image metadata over HTTP(S). Two channels, each a thread of its own that
reconnects with capped exponential backoff and jitter (``reconnect_delay``):

- :class:`MqttNotices`: MQTT 5 (paho, imported inside), clean start, subscribed at QoS 1 to its
  own retained topic ``edgekiln/devices/<device_id>/notice``; telemetry goes to ``…/telemetry``;
- :class:`WebSocketNotices`: ``/v1/device/notices`` on the update server itself (websockets'
  sync client, imported inside); frames ``{"type": "notice", …}`` in and
  ``{"type": "telemetry", "batch": […]}`` out.

Either way the loop falls back to polling: a channel that is down only means polling every
``interval_s``. Standard library at import time, so the layering of ``fleet/`` holds.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.transport_security import client_ssl_context, is_loopback_host

REV = re.compile(r"^(-|[0-9a-f]{1,64})$")
MAX_NOTICE_BYTES = 512
NOTICE_TOPIC = "edgekiln/devices/{device_id}/notice"
TELEMETRY_TOPIC = "edgekiln/devices/{device_id}/telemetry"
WS_PATH = "/v1/device/notices"


def reconnect_delay(attempt: int, *, base_s: float = 1.0, cap_s: float = 300.0,
                    rng: random.Random | None = None) -> float:
    """Seconds before reconnect ``attempt`` (0, 1, ...): ``min(cap, base * 2^n) * U(0.5, 1.5)``.

    >>> 0.5 <= reconnect_delay(0) <= 1.5 and 150 <= reconnect_delay(30) <= 450
    True
    """
    return min(cap_s, base_s * 2.0 ** min(attempt, 30)) * (rng or random).uniform(0.5, 1.5)


def parse_notice(raw: bytes | str) -> str | None:
    """The ``rev`` of a notice, or None for anything else (an empty retained payload, junk)."""
    if not raw or len(raw) > MAX_NOTICE_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("v") != 1:
        return None
    rev = data.get("rev")
    return rev if isinstance(rev, str) and REV.match(rev) else None


def check_mqtt_url(url: str, *, insecure_http: bool) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of an ``mqtt(s)://HOST[:PORT]`` URL; plain ``mqtt://`` only to this
    machine or with ``insecure_http`` (the MQTT password would travel in clear).

    >>> check_mqtt_url("mqtts://fleet:8883", insecure_http=False)
    ('fleet', 8883, True)
    """
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in ("mqtt", "mqtts") or not host:
        raise EdgekilnError(f"MQTT URL '{url[:200]}' is not mqtt(s)://HOST[:PORT]")
    try:
        port = parts.port or (8883 if scheme == "mqtts" else 1883)
    except ValueError:
        raise EdgekilnError(f"MQTT URL '{url[:200]}' has an invalid port") from None
    if scheme == "mqtt" and not (is_loopback_host(host) or insecure_http):
        raise EdgekilnError(f"refusing plain mqtt:// to {host}: the MQTT password would travel in clear; use "
                            "mqtts:// (with --ca FILE), or pass --insecure-http")
    return host, port, scheme == "mqtts"


class Wakeup:
    """What the daemon loop waits on: an event set by a notice whose rev is not the last handled.

    >>> w = Wakeup(); w.notice("ab12"); w.wait(0)
    True
    >>> w.take(); w.notice("ab12"); w.wait(0)
    False
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.latest: str | None = None    # the newest rev heard
        self.handled: str | None = None   # the rev the last cycle started from
        self.stopped = False              # stop(): the daemon loop returns after its current cycle

    def notice(self, rev: str) -> None:
        with self._lock:
            self.latest = rev
            if rev != self.handled:
                self._event.set()

    def stop(self) -> None:
        self.stopped = True
        self._event.set()

    def poke(self) -> None:
        """Wake the loop without a rev (a channel came up: telemetry to send, state to report)."""
        self._event.set()

    @property
    def pending(self) -> bool:
        """A rev was heard that no cycle has started from yet."""
        return self.latest is not None and self.latest != self.handled

    def wait(self, timeout: float) -> bool:
        """True when woken by a new rev before ``timeout`` seconds."""
        woken = self._event.wait(max(0.0, timeout))
        if not self.stopped:
            self._event.clear()
        return woken

    def take(self) -> None:
        """A cycle starts: the newest rev heard counts as handled."""
        with self._lock:
            self.handled = self.latest
            self._event.clear()


class _Channel:
    """The reconnect thread shared by both channels; subclasses implement ``_session``."""

    kind = "?"

    def __init__(self, on_notice: Callable[[str], None], *, backoff_base_s: float = 1.0,
                 backoff_max_s: float = 300.0, rng: random.Random | None = None,
                 log: Callable[[str], None] | None = None, on_change: Callable[[], None] | None = None) -> None:
        self.on_notice = on_notice
        self.on_change = on_change or (lambda: None)   # connected <-> not: the daemon recomputes its wait
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.rng = rng or random.Random()
        self.log = log or (lambda line: None)
        self.connected = False
        self.error: str | None = None        # why the last attempt failed (for the log)
        self.connects = 0                    # sessions established so far
        self._stop = threading.Event()
        self._ready = threading.Event()      # the first attempt finished (either way)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"edgekiln-{self.kind}", daemon=True)
        self._thread.start()

    @property
    def attempted(self) -> bool:
        """The first connect has finished, either way."""
        return self._ready.is_set()

    def wait_first_attempt(self, timeout: float) -> bool:
        """Block until the first connect succeeded or failed; True when connected."""
        self._ready.wait(timeout)
        return self.connected

    def close(self) -> None:
        self._stop.set()
        self._interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def send_telemetry(self, batch: list[dict[str, Any]]) -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self._session()   # returns when the session ends (or never started)
            except Exception as exc:  # noqa: BLE001 - a daemon thread: every failure means "reconnect"
                self.error = f"{type(exc).__name__}: {exc}"[:300]
            was_up, first = self.connected, not self._ready.is_set()
            self.connected = False
            self._ready.set()
            if was_up or first:
                self.on_change()
            if self._stop.is_set():
                break
            attempt = 0 if was_up else attempt + 1
            delay = reconnect_delay(attempt, base_s=self.backoff_base_s, cap_s=self.backoff_max_s, rng=self.rng)
            self.log(f"push: {self.kind} {'lost' if was_up else 'unavailable'} ({self.error or 'closed'}); "
                     f"reconnecting in {delay:.1f} s")
            self._stop.wait(delay)

    def _up(self) -> None:
        self.connected, self.error = True, None
        self.connects += 1
        self._ready.set()
        self.on_change()

    def _session(self) -> None:
        raise NotImplementedError

    def _interrupt(self) -> None:
        raise NotImplementedError


class MqttNotices(_Channel):
    """The notice topic of one device over MQTT 5 (retained, QoS 1), as a background thread."""

    kind = "mqtt"

    def __init__(self, url: str, username: str, password: str, *, ca: Any = None,
                 on_notice: Callable[[str], None], keepalive_s: int = 60, insecure_http: bool = False,
                 connect_timeout_s: float = 10.0, **kw: Any) -> None:
        super().__init__(on_notice, **kw)
        self.host, self.port, self.tls = check_mqtt_url(url, insecure_http=insecure_http)
        self.url, self.username, self.password, self.ca = url, username, password, ca
        self.keepalive_s, self.connect_timeout_s = keepalive_s, connect_timeout_s
        self.topic = NOTICE_TOPIC.format(device_id=username)
        self.telemetry_topic = TELEMETRY_TOPIC.format(device_id=username)
        self._client: Any = None
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[str] = queue.SimpleQueue()

    def send_telemetry(self, batch: list[dict[str, Any]]) -> bool:
        """Queue ``batch`` for the channel's thread, which publishes it (QoS 1) within one loop turn (0.5 s).

        NOTE: paho's ``publish`` from another thread writes to the socket itself when the client is
        driven by ``loop()`` rather than ``loop_start()``, racing the loop thread's own writes (PUBACK,
        PINGREQ): interleaved packets, which Mosquitto closes as "Protocol error" (~7% of 200 agents in
        one process). Only the loop thread writes."""
        with self._lock:
            client = self._client
        if client is None or not self.connected:
            return False
        self._outbox.put(json.dumps({"batch": batch}, separators=(",", ":")))
        return True

    def _publish_queued(self, client: Any) -> None:
        while True:
            try:
                payload = self._outbox.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(ValueError):   # a payload paho refuses (too large): dropped, not a reconnect
                client.publish(self.telemetry_topic, payload, qos=1)

    def _interrupt(self) -> None:
        """Nothing to do: the session's loop sees the stop flag within one turn (0.5 s) and disconnects
        from its own thread (a DISCONNECT written from here could interleave with its writes)."""

    def _session(self) -> None:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="",
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set_context(client_ssl_context(self.ca))
        client.connect_timeout = self.connect_timeout_s
        refused: list[str] = []

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                refused.append(f"broker refused the connection: {reason}")
                c.disconnect()
                return
            c.subscribe(self.topic, qos=1)

        def on_subscribe(c: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
            if reasons and not reasons[0].is_failure:
                self._up()
            else:
                refused.append(f"broker refused the subscription to {self.topic}")
                c.disconnect()

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            rev = parse_notice(msg.payload)
            if rev is not None and msg.topic == self.topic:
                self.on_notice(rev)

        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        with self._lock:
            self._client = client
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive_s, clean_start=True)
            while not self._stop.is_set():
                self._publish_queued(client)
                rc = client.loop(timeout=0.5)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            self.error = refused[0] if refused else "connection closed"
        except OSError as exc:
            self.error = f"{self.host}:{self.port}: {exc.strerror or exc}"
        finally:
            with self._lock:
                self._client = None
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                client.disconnect()


class WebSocketNotices(_Channel):
    """The update server's ``/v1/device/notices`` WebSocket, as a background thread."""

    kind = "websocket"

    def __init__(self, base_url: str, token: str, *, ca: Any = None, on_notice: Callable[[str], None],
                 open_timeout_s: float = 10.0, ping_interval_s: float | None = 60.0, **kw: Any) -> None:
        super().__init__(on_notice, **kw)
        parts = urlsplit(base_url.rstrip("/"))
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower())
        if scheme is None:
            raise EdgekilnError(f"server URL '{base_url[:200]}' is not http(s)://")
        self.url = f"{scheme}://{parts.netloc}{parts.path}{WS_PATH}"
        self.token, self.ca, self.tls = token, ca, scheme == "wss"
        self.open_timeout_s, self.ping_interval_s = open_timeout_s, ping_interval_s
        self._ws: Any = None
        self._lock = threading.Lock()

    def send_telemetry(self, batch: list[dict[str, Any]]) -> bool:
        with self._lock:
            ws = self._ws
        if ws is None or not self.connected:
            return False
        try:
            ws.send(json.dumps({"type": "telemetry", "batch": batch}, separators=(",", ":")))
        except Exception:  # noqa: BLE001 - websockets raises ConnectionClosed and friends
            return False
        return True

    def _interrupt(self) -> None:
        with self._lock:
            ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):  # noqa: BLE001 - websockets' own errors on close
                ws.close()

    def _session(self) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidStatus
        from websockets.sync.client import connect

        try:
            ws = connect(self.url, additional_headers={"Authorization": f"Bearer {self.token}"},
                         ssl=client_ssl_context(self.ca) if self.tls else None, open_timeout=self.open_timeout_s,
                         ping_interval=self.ping_interval_s, max_size=4096, user_agent_header="edgekiln-agent")
        except InvalidStatus as exc:
            self.error = f"{self.url}: HTTP {exc.response.status_code}"
            return
        except (OSError, TimeoutError) as exc:
            self.error = f"{self.url}: {exc}"
            return
        with self._lock:
            self._ws = ws
        try:
            if self._stop.is_set():
                return
            self._up()
            while not self._stop.is_set():
                try:
                    raw = ws.recv()
                except ConnectionClosed as exc:
                    self.error = f"closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
                    return
                try:
                    data = json.loads(raw)
                except (ValueError, TypeError):
                    continue
                if isinstance(data, dict) and data.get("type") == "notice":
                    rev = parse_notice(json.dumps({k: v for k, v in data.items() if k != "type"}))
                    if rev is not None:
                        self.on_notice(rev)
        finally:
            with self._lock:
                self._ws = None
            with contextlib.suppress(Exception):  # noqa: BLE001 - websockets' own errors on close
                ws.close()
