"""The agent's telemetry: one compact sample of the device's model, latency, health and disk.

An item (docs/fleet-protocol.md; at most 16 per batch, 4 KiB)::

    {"t": unix_s, "model": str, "ver": int, "variant": str|null, "p50": ms, "p95": ms,
     "health": "ok"|"degraded"|"failed", "disk_free": bytes, "pending": int|null,
     "adapt": str|null}

``adapt`` is the id of the active slot's on-device adaptation (``edgekiln learn``), from its seal.

``variant``, ``p50`` and ``p95`` come from ``STATE/runtime-status.json`` when the application's
runtime writes it (:mod:`edgekiln.runtime.status_file`) and it is at most 10 minutes old;
otherwise from the last health check in the agent's history. :class:`Telemetry` samples every
``every_s`` and as soon as the version, variant or health changes (it looks every 10 s), keeps
at most 16 samples in memory and sends them through the connected push channel, or else with
``POST /v1/device/telemetry`` after a poll.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgekiln.errors import EdgekilnError, ServerUnreachable
from edgekiln.fleet.slots import adaptation_id
from edgekiln.runtime.status_file import FILE_NAME, read_status

MAX_ITEMS = 16
CHECK_EVERY_S = 10.0   # while push keeps the daemon asleep: how often it looks for a change to report
STATUS_MAX_AGE_S = 600.0


def _ms(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return round(float(value), 3)
    return None


def collect(agent: Any, *, now: float | None = None) -> dict[str, Any] | None:
    """A telemetry item for the agent's device, or None when no model is active yet."""
    store = agent.store
    active = store.active()
    if active is None:
        return None
    now = time.time() if now is None else now
    state = store.read_state()
    variant, p50, p95, health = None, None, None, "ok"
    status = read_status(store.root / FILE_NAME, max_age_s=STATUS_MAX_AGE_S, now=now)
    if status is not None and status.get("version") == active.version and isinstance(status.get("current"), str):
        variant = status["current"][:64]
        stats = (status.get("variants") or {}).get(variant) or {}
        p50, p95 = _ms(stats.get("p50_ms")), _ms(stats.get("p95_ms"))
        count, errors = stats.get("count"), stats.get("errors")
        if isinstance(count, int) and isinstance(errors, int) and count > 0 and errors > 0:
            health = "failed" if errors >= count else "degraded"
    else:
        for entry in reversed(state.get("history") or []):
            if entry.get("model") == active.model and entry.get("version") == active.version \
                    and entry.get("status") == "installed":
                latency = entry.get("latency_ms") or {}
                if isinstance(latency, dict):
                    p50, p95 = _ms(latency.get("p50")), _ms(latency.get("p95"))
                break
    if health == "ok" and state.get("last_error"):
        health = "degraded"   # the last update failed or was rolled back; the active model still serves
    pending = (state.get("pending") or {}).get("version")
    return {"t": int(now), "model": active.model, "ver": active.version, "variant": variant, "p50": p50,
            "p95": p95, "health": health, "disk_free": int(shutil.disk_usage(store.root).free),
            "pending": pending if isinstance(pending, int) else None,
            "adapt": (adaptation_id(getattr(active, "adaptation", None)) or "")[:16] or None}


class Telemetry:
    """Samples queued in memory (at most ``MAX_ITEMS``; the oldest are dropped) and sent in batches."""

    def __init__(self, agent: Any, *, every_s: float = 300.0, check_every_s: float = CHECK_EVERY_S,
                 clock: Callable[[], float] = time.monotonic,
                 collect_fn: Callable[[Any], dict[str, Any] | None] = collect) -> None:
        self.agent, self.every_s, self.check_every_s = agent, every_s, check_every_s
        self.clock, self.collect_fn = clock, collect_fn
        self.queue: deque[dict[str, Any]] = deque(maxlen=MAX_ITEMS)
        self.last_at: float | None = None      # the last sample queued
        self.checked_at: float | None = None   # the last look for a change
        self.last_key: tuple[Any, ...] | None = None
        self.sent = 0

    def _periodic_due(self) -> bool:
        return self.last_at is None or self.clock() >= self.last_at + self.every_s

    def due_in(self) -> float:
        """Seconds until the next look (a periodic sample, or a check for a changed version,
        variant or health every ``check_every_s``); 0 when due."""
        if self.last_at is None or self.checked_at is None:
            return 0.0
        now = self.clock()
        return max(0.0, min(self.last_at + self.every_s, self.checked_at + self.check_every_s) - now)

    def sample(self, *, force: bool = False) -> bool:
        """Queue a sample when one is due, or at once when version, variant, health or adaptation changed."""
        self.checked_at = self.clock()
        try:
            item = self.collect_fn(self.agent)
        except OSError:
            item = None
        if item is None:
            if self._periodic_due():
                self.last_at = self.clock()   # nothing to say now; next try one period later
            return False
        key = (item["model"], item["ver"], item["variant"], item["health"], item.get("adapt"))
        if not force and key == self.last_key and not self._periodic_due():
            return False
        self.queue.append(item)
        self.last_key, self.last_at = key, self.clock()
        return True

    def flush(self, channel: Any = None, api: Any = None) -> bool:
        """Send the queue through ``channel`` when connected, else through ``api.telemetry``; the
        queue is emptied only when a send succeeded."""
        if not self.queue:
            return True
        batch = list(self.queue)
        sent = False
        if channel is not None and channel.connected:
            sent = bool(channel.send_telemetry(batch))
        if not sent and api is not None:
            try:
                api.telemetry(batch)
                sent = True
            except ServerUnreachable:
                sent = False   # kept for the next try
            except EdgekilnError:
                self.queue.clear()   # refused (rate limit, a schema this server does not take): dropped
                return False
        if sent:
            self.queue.clear()
            self.sent += len(batch)
        return sent
