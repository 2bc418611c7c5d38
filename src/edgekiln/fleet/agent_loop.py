"""The agent's daemon loop: poll, or wait for a push notice (MQTT or WebSocket) with a slow safety poll.

``run_daemon`` runs :meth:`Agent.run_once` cycles. Between cycles it waits on a
:class:`~edgekiln.fleet.push.Wakeup`:

- while a push channel is connected, up to ``push_poll_s`` (default 900 s, a safety net);
  otherwise ``interval_s`` (the poll), each times ``U(0.9, 1.1)``;
- a notice whose rev differs from the last one handled starts a cycle at once, after a
  ``U(0, push_jitter_s)`` spread, so a wave of 10,000 devices does not arrive in one millisecond;
- when the server is unreachable, exponential backoff up to ``max_backoff_s``;
- telemetry samples (``device_telemetry``) go through the connected channel when due, and with
  ``POST /v1/device/telemetry`` after a cycle otherwise.

A broker or WebSocket that is down only means polling every ``interval_s``; the active model
is never touched by anything here. :func:`open_channel` picks the channel for ``--push``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from edgekiln.errors import EdgekilnError, ServerUnreachable
from edgekiln.fleet.push import MqttNotices, Wakeup, WebSocketNotices, check_mqtt_url

PUSH_MODES = ("auto", "mqtt", "websocket", "off")
DEFAULT_PUSH_POLL_S = 900.0


def run_daemon(agent: Any, *, interval_s: float, push_poll_s: float = DEFAULT_PUSH_POLL_S, channel: Any = None,
               wake: Wakeup | None = None, push_jitter_s: float = 0.5, max_backoff_s: float = 300.0,
               cycles: int | None = None, sleep: Callable[[float], None] | None = None, telemetry: Any = None,
               rng: Any = None, clock: Callable[[], float] = time.monotonic,
               pause: Callable[[float], None] = time.sleep) -> None:
    """Run update cycles until ``cycles`` are done (forever when None).

    ``sleep`` given (the old ``Agent.serve`` tests): wait with it and ignore notices.
    ``rng`` defaults to the ``random`` module; ``clock`` and ``pause`` are for tests.
    """
    wake = wake or Wakeup()
    rng = rng or random
    log = agent.log
    backoff, done = interval_s, 0
    shown: list[Any] = [None]

    def note() -> None:
        """One log line whenever the channel comes up or goes away."""
        if channel is None or not channel.attempted:
            return
        now = bool(channel.connected)
        if shown[0] is now:
            return
        shown[0] = now
        if now:
            log(f"push: {channel.kind} connected; checking every {push_poll_s:g} s as a safety net")
        else:
            log(f"push unavailable ({channel.error or 'not connected'}); polling every {interval_s:g} s")

    while (cycles is None or done < cycles) and not wake.stopped:
        done += 1
        wake.take()
        fixed: float | None = None   # a wait that push does not stretch (backoff, a cut download)
        try:
            result = agent.run_once()
            backoff = interval_s
            if result["outcome"] not in ("idle", "up-to-date"):
                log(_summary(result))
            if result["outcome"] == "retry":
                fixed = min(interval_s, 5.0)
        except ServerUnreachable as exc:
            log(f"{exc}; keeping the active model, retrying in {backoff:.0f} s")
            fixed = backoff
            backoff = min(max_backoff_s, backoff * 2)
        except EdgekilnError as exc:
            # NOTE: a refused token or a malformed answer; a daemon keeps running and retries.
            log(f"error: {exc}; keeping the active model")
            fixed = interval_s
        except OSError as exc:
            # NOTE: a full disk or a failing flash while writing state: one line, keep serving
            # the active model, try again next cycle.
            log(f"error: {type(exc).__name__}: {exc}; keeping the active model")
            fixed = interval_s
        if telemetry is not None:
            _telemetry(telemetry, channel, agent.api, log)
        spread = rng.uniform(0.9, 1.1)
        if sleep is not None:
            sleep((fixed if fixed is not None else interval_s) * spread)
            continue
        woken = wait_next(wake, channel, poll_wait=interval_s * spread, push_wait=push_poll_s * spread,
                          fixed=None if fixed is None else fixed * spread, telemetry=telemetry, clock=clock,
                          note=note)
        if woken and push_jitter_s > 0 and (cycles is None or done < cycles) and not wake.stopped:
            pause(rng.uniform(0.0, push_jitter_s))


def wait_next(wake: Wakeup, channel: Any, *, poll_wait: float, push_wait: float, fixed: float | None,
              telemetry: Any = None, clock: Callable[[], float] = time.monotonic,
              note: Callable[[], None] = lambda: None) -> bool:
    """Wait until the next cycle is due; True when a new notice ended the wait early.

    The target is recomputed whenever the wakeup fires, so a channel that drops (it pokes the
    wakeup) shortens a 900 s safety wait to the poll interval at once."""
    start = clock()
    while not wake.stopped:
        note()
        connected = channel is not None and bool(channel.connected)
        target = fixed if fixed is not None else (push_wait if connected else poll_wait)
        remaining = start + target - clock()
        if remaining <= 0:
            return False
        due = telemetry.due_in() if telemetry is not None and connected else math.inf
        if due <= 0:
            _telemetry(telemetry, channel, None, lambda line: None)   # NOTE: HTTP only after a cycle
            continue
        if wake.wait(min(remaining, due)) and wake.pending:
            return True
    return False


def _telemetry(telemetry: Any, channel: Any, api: Any, log: Callable[[str], None]) -> None:
    """Sample and send; telemetry never stops the daemon."""
    try:
        telemetry.sample()
        telemetry.flush(channel, api)
    except Exception as exc:  # noqa: BLE001 - a daemon: one line, then updates go on
        telemetry.checked_at = telemetry.last_at = telemetry.clock()   # not again at once
        log(f"telemetry: {type(exc).__name__}: {exc}")


def _summary(result: dict[str, Any]) -> str:
    line = f"{result['outcome']}: {result.get('model')} v{result.get('version')}"
    return line + (f" ({result['error']})" if result.get("error") else "")


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def open_channel(agent: Any, *, mode: str, wake: Wakeup, mqtt_url: str | None = None,
                 settings: dict[str, Any] | None = None, first_wait_s: float = 5.0,
                 backoff_max_s: float = 300.0, keepalive_s: int = 60) -> Any:
    """Start the push channel ``--push MODE`` asks for (None for ``off``, or when there is none).

    ``auto``: MQTT when a broker is named (``--mqtt``) or advertised on the update server's own
    host and it answers within ``first_wait_s``; else the server's WebSocket. An advertised
    broker on another host is ignored (the derived MQTT password only goes where the operator
    said). Raises :class:`EdgekilnError` for ``mqtt`` with no broker, or a bad ``--mqtt`` URL.
    """
    if mode not in PUSH_MODES:
        raise EdgekilnError(f"agent: --push must be one of {', '.join(PUSH_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    config, log = agent.config, agent.log
    settings = settings or {}
    url = mqtt_url
    advertised = settings.get("mqtt")
    if url is None and isinstance(advertised, str) and advertised:
        if _host(advertised) == _host(config.server):
            try:
                check_mqtt_url(advertised, insecure_http=config.insecure_http)
                url = advertised
            except EdgekilnError as exc:
                log(f"push: ignoring the advertised MQTT broker: {exc}")
        else:
            log(f"push: ignoring the advertised MQTT broker {advertised[:100]} (not the update server's host "
                f"{_host(config.server)}); pass --mqtt URL to use it")
    common = {"on_notice": wake.notice, "on_change": wake.poke, "log": log, "backoff_max_s": backoff_max_s}
    if mode == "mqtt" and url is None:
        raise EdgekilnError("agent --push mqtt: the server advertises no MQTT broker; give --mqtt mqtts://HOST:PORT")
    if url is not None and mode in ("auto", "mqtt"):
        from edgekiln.fleet.mosquitto import mqtt_credentials

        user, password = mqtt_credentials(config.token)
        mqtt = MqttNotices(url, user, password, ca=config.ca, insecure_http=config.insecure_http,
                           keepalive_s=keepalive_s, **common)
        mqtt.start()
        if mode == "mqtt" or mqtt.wait_first_attempt(first_wait_s):
            return mqtt
        log(f"push: MQTT broker {url} unreachable ({mqtt.error}); trying the update server's WebSocket")
        mqtt.close()
    if mode == "auto" and settings and not settings.get("websocket"):
        return None   # a server without the WebSocket route: poll
    ws = WebSocketNotices(config.server, config.token, ca=config.ca, **common)
    ws.start()
    ws.wait_first_attempt(first_wait_s)
    return ws


def serve(agent: Any, *, interval_s: float, push: str = "auto", mqtt_url: str | None = None,
          push_poll_s: float | None = None, push_jitter_s: float = 0.5, telemetry: bool = True,
          cycles: int | None = None, wake: Wakeup | None = None, backoff_max_s: float = 300.0,
          on_channel: Callable[[Any], None] | None = None) -> None:
    """``edgekiln agent`` as a daemon: settings, push channel, telemetry, then :func:`run_daemon`
    (until ``cycles`` are done or ``wake.stop()``)."""
    from edgekiln.fleet.device_telemetry import Telemetry

    settings: dict[str, Any] = {}
    if push != "off" or telemetry:
        try:
            settings = agent.api.settings()
        except (ServerUnreachable, EdgekilnError) as exc:
            agent.log(f"push: no settings from the server yet ({exc})")
    wake = wake or Wakeup()
    channel = open_channel(agent, mode=push, wake=wake, mqtt_url=mqtt_url, settings=settings,
                           backoff_max_s=backoff_max_s)
    if on_channel is not None:
        on_channel(channel)   # tests and the benchmark watch the channel
    if push_poll_s is None:
        advertised = settings.get("push_poll_s")
        push_poll_s = float(advertised) if isinstance(advertised, int | float) and advertised > 0 \
            else DEFAULT_PUSH_POLL_S
    every = settings.get("telemetry_every_s")
    meter = Telemetry(agent, every_s=float(every) if isinstance(every, int | float) and every > 0 else 300.0) \
        if telemetry else None
    try:
        run_daemon(agent, interval_s=interval_s, push_poll_s=push_poll_s, channel=channel, wake=wake,
                   push_jitter_s=push_jitter_s, cycles=cycles, telemetry=meter)
    finally:
        if channel is not None:
            channel.close()
