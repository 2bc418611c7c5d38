"""Device telemetry on the server: checking batches, rate limiting, storing the latest item and a
short history. The same bytes arrive over MQTT (``edgekiln/devices/<id>/telemetry``), a WebSocket
frame or ``POST /v1/device/telemetry``:

    >>> check_batch(b'{"batch": [{"t": 1700000000, "health": "ok", "p95": 4.5}]}')
    [{'t': 1700000000, 'health': 'ok', 'p95': 4.5}]
    >>> check_batch(b'{"batch": [{"t": 1, "cpu": 3}]}')
    Traceback (most recent call last):
    ...
    edgekiln.fleet.telemetry.TelemetryRefused: unknown_key: item key 'cpu' is unknown

Malformed input is dropped and counted (:meth:`TelemetryStore.refuse`), never raised to a
transport: a broken device cannot take the MQTT bridge or a WebSocket down with it.
"""

import json
import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from edgekiln.fleet.json_limits import JsonRefused, loads_bounded

MAX_BATCH_BYTES = 4096
MAX_ITEMS = 16
HEALTH = ("ok", "degraded", "failed")
ITEM_KEYS = ("t", "model", "ver", "variant", "p50", "p95", "health", "disk_free", "pending", "adapt")
REASONS = ("too_large", "not_json", "depth", "unknown_key", "bad_type", "non_finite", "too_many", "rate_limited")
MAX_MS = 1e7


class TelemetryRefused(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _number(value: Any, lo: float, hi: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and lo <= value <= hi


def _int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _str(value: Any, pattern_len: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= pattern_len and value.isprintable()


CHECKS: dict[str, Callable[[Any], bool]] = {
    "t": lambda v: _number(v, 0, 1e11),
    "model": lambda v: _str(v, 64),
    "ver": lambda v: _int(v, 1, 2**31 - 1),
    "variant": lambda v: _str(v, 64),
    "p50": lambda v: _number(v, 0, MAX_MS),
    "p95": lambda v: _number(v, 0, MAX_MS),
    "health": lambda v: v in HEALTH,
    "disk_free": lambda v: _int(v, 0, 2**63 - 1),
    "pending": lambda v: _int(v, 0, 2**31 - 1),
    "adapt": lambda v: _str(v, 16),   # the id of the active slot's on-device adaptation (fleet.adapt)
}


def check_item(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise TelemetryRefused("bad_type", "an item must be a JSON object")
    unknown = sorted(set(item) - set(ITEM_KEYS))
    if unknown:
        raise TelemetryRefused("unknown_key", f"item key {str(unknown[0])[:40]!r} is unknown")
    if "t" not in item:
        raise TelemetryRefused("bad_type", "item has no 't' (unix seconds)")
    for key, value in item.items():
        if value is None and key != "t":
            continue
        if not CHECKS[key](value):
            raise TelemetryRefused("bad_type", f"item {key} {str(value)[:40]!r} has the wrong type or range")
    return item


def check_batch(raw: bytes | str) -> list[dict[str, Any]]:
    """A telemetry payload ``{"batch": [item, ...]}`` (or a bare list; a WebSocket frame's
    ``"type": "telemetry"`` is allowed) as its items, or :class:`TelemetryRefused` with the reason."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > MAX_BATCH_BYTES:
        raise TelemetryRefused("too_large", f"{len(data)} bytes, over {MAX_BATCH_BYTES}")
    try:
        body = loads_bounded(data, max_depth=4)
    except JsonRefused as exc:
        reason = exc.reason if exc.reason in REASONS else "bad_type"
        raise TelemetryRefused(reason, exc.detail) from None
    if isinstance(body, dict):
        unknown = sorted(set(body) - {"batch", "type"})
        if unknown:
            raise TelemetryRefused("unknown_key", f"key {str(unknown[0])[:40]!r} is unknown (use batch)")
        if body.get("type", "telemetry") != "telemetry":
            raise TelemetryRefused("bad_type", "type must be 'telemetry'")
        body = body.get("batch")
    if not isinstance(body, list):
        raise TelemetryRefused("bad_type", "batch must be a list of items")
    if len(body) > MAX_ITEMS:
        raise TelemetryRefused("too_many", f"{len(body)} items, over {MAX_ITEMS}")
    return [check_item(item) for item in body]


class TelemetryStore:
    """The latest item per device (``device_telemetry``) and the last ``history`` items
    (``telemetry_history``); a per-device token bucket (``burst`` batches, one more every
    ``min_interval_s``) drops floods. Counters are this process's."""

    def __init__(self, db: Any, clock: Callable[[], float], *, history: int = 100, min_interval_s: float = 5.0,
                 burst: int = 5) -> None:
        self.db, self.clock = db, clock
        self.keep, self.min_interval_s, self.burst = history, min_interval_s, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._received = 0
        self._dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def refuse(self, reason: str) -> None:
        with self._lock:
            self._dropped[reason if reason in REASONS else "bad_type"] += 1

    def _take(self, device: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.get(device, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - when) / self.min_interval_s)
            if tokens < 1.0:
                self._buckets[device] = (tokens, now)
                return False
            self._buckets[device] = (tokens - 1.0, now)
            return True

    def receive(self, device: str, raw: bytes | str) -> int:
        """Check and store a payload from ``device``; a refused one is counted. Returns the items stored."""
        try:
            items = check_batch(raw)
        except TelemetryRefused as exc:
            self.refuse(exc.reason)
            return 0
        return self.add(device, items)

    def add(self, device: str, items: Sequence[dict[str, Any]]) -> int:
        """Store checked ``items`` (oldest first); returns how many, 0 when rate limited."""
        if not items:
            return 0
        if not self._take(device):
            self.refuse("rate_limited")
            return 0
        now = self.clock()
        with self.db.transaction(write_lock=True) as tx:
            if not tx.query("SELECT 1 FROM devices WHERE name = ?", (device,)):
                return 0   # removed meanwhile
            for item in items:
                tx.execute("INSERT INTO telemetry_history (device, received, data) VALUES (?, ?, ?)",
                           (device, now, json.dumps(item, separators=(",", ":"))))
            tx.execute("INSERT INTO device_telemetry (device, received, data) VALUES (?, ?, ?) ON CONFLICT (device) "
                       "DO UPDATE SET received = excluded.received, data = excluded.data",
                       (device, now, json.dumps(items[-1], separators=(",", ":"))))
            tx.execute("DELETE FROM telemetry_history WHERE device = ? AND id NOT IN (SELECT id FROM "
                       "telemetry_history WHERE device = ? ORDER BY id DESC LIMIT ?)", (device, device, self.keep))
        with self._lock:
            self._received += len(items)
        return len(items)

    def latest(self) -> dict[str, dict[str, Any]]:
        """``{device: {**item, "received": unix_s}}`` for every device that sent telemetry."""
        return {r["device"]: {**json.loads(r["data"]), "received": r["received"]}
                for r in self.db.query("SELECT device, received, data FROM device_telemetry")}

    def history(self, device: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` items of ``device``, newest first."""
        rows = self.db.query("SELECT received, data FROM telemetry_history WHERE device = ? ORDER BY id DESC LIMIT ?",
                             (device, max(1, min(int(limit), self.keep))))
        return [{**json.loads(r["data"]), "received": r["received"]} for r in rows]

    def forget(self, device: str) -> None:
        with self.db.transaction(write_lock=True) as tx:
            tx.execute("DELETE FROM device_telemetry WHERE device = ?", (device,))
            tx.execute("DELETE FROM telemetry_history WHERE device = ?", (device,))
        with self._lock:
            self._buckets.pop(device, None)

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {"received": self._received, "dropped": {r: self._dropped.get(r, 0) for r in REASONS}}


def add_routes(app: Any, fleet: Any, *, admin: Any, device: Any) -> None:
    """``POST /v1/device/telemetry`` (device), ``GET /v1/devices/{name}/telemetry`` and
    ``GET /v1/telemetry/stats`` (admin). ``admin``/``device`` are the server's auth dependencies."""
    from fastapi import Depends, Query, Request
    from fastapi.responses import JSONResponse

    from edgekiln.fleet.registry import FleetError

    store: TelemetryStore = fleet.telemetry

    def post_telemetry(raw: bytes, name: str) -> JSONResponse:
        try:
            items = check_batch(raw)
        except TelemetryRefused as exc:
            store.refuse(exc.reason)
            return JSONResponse({"detail": f"telemetry refused: {exc}"[:300], "reason": exc.reason},
                                status_code=413 if exc.reason == "too_large" else 422)
        stored = store.add(name, items)
        if items and not stored:
            return JSONResponse({"detail": "telemetry refused: rate_limited (send at most one batch every "
                                           f"{store.min_interval_s:g} s)", "reason": "rate_limited"}, status_code=429)
        return JSONResponse({"accepted": stored})

    @app.post("/v1/device/telemetry")
    async def device_telemetry(request: Request, name: Annotated[str, Depends(device)]) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(post_telemetry, await request.body(), name)

    @app.get("/v1/devices/{name}/telemetry")
    def device_history(name: str, _: Annotated[Any, Depends(admin)],
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[dict[str, Any]]:
        if fleet.registry.device(name) is None:
            raise FleetError(f"device '{name[:80]}' does not exist", 404)
        return store.history(name, limit)

    @app.get("/v1/telemetry/stats")
    def telemetry_stats(_: Annotated[Any, Depends(admin)]) -> dict[str, Any]:
        return store.counters()


def telemetry_view(latest: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """The latest item as ``GET /v1/devices`` shows it: health, variant, p50/p95, free disk, age."""
    if latest is None:
        return None
    return {"health": latest.get("health"), "variant": latest.get("variant"), "p50": latest.get("p50"),
            "p95": latest.get("p95"), "disk_free": latest.get("disk_free"), "model": latest.get("model"),
            "ver": latest.get("ver"), "pending": latest.get("pending"), "adapt": latest.get("adapt"),
            "age_s": round(max(0.0, now - float(latest["received"])), 1)}
