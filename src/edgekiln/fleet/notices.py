"""Update notices: telling a device "your assignment changed, check now" without waiting for its poll.

A notice carries no authority, only a revision: the device still fetches and verifies the signed
director and image metadata over HTTP(S). Its revision is a hash of what the director would sign:

    >>> notice_rev("0f" * 16, {"model": "digits", "version": 2, "rollout_id": 7}, "ab" * 32)
    '4e1db61c0be51585'
    >>> notice_rev("0f" * 16, {}, "")
    '-'
    >>> notice_payload({"rev": "-", "seq": 3})
    b'{"v":1,"rev":"-","seq":3}'

:class:`NoticeHub` keeps ``device_notices`` current: after every change that can move an
assignment (``poke()``) and at least every ``sweep_s`` (changes made by other server processes),
it recomputes every assignment in one query, gives each changed row a new ``seq``, pushes the rows
with ``seq`` above the last one seen to this process's WebSocket subscribers, and hands the rows
its own sweep changed to the MQTT publisher (retained, so a device that connects later gets it).
"""

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

log = logging.getLogger("edgekiln.fleet.notices")

Notice = dict[str, Any]
Publisher = Callable[[str, bytes], None]     # (device_id, payload; b"" clears the retained notice)


def notice_rev(device_id: str, assignment: dict[str, Any], sha256: str) -> str:
    """16 hex digits naming ``device_id``'s assignment and the bundle's hash; ``"-"`` when none."""
    if not assignment:
        return "-"
    text = f"{device_id}|{assignment['model']}|{assignment['version']}|{sha256}|{assignment.get('rollout_id')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def notice_payload(row: dict[str, Any]) -> bytes:
    """The notice's bytes (at most 128): ``{"v":1,"rev":...,"seq":...}``; ``b""`` for a removed device."""
    if not row["rev"]:
        return b""
    return json.dumps({"v": 1, "rev": row["rev"], "seq": int(row["seq"])}, separators=(",", ":")).encode()


class NoticeHub:
    """The ``device_notices`` table, and who to tell when a row changes. ``start()`` runs the
    worker thread; tests call :meth:`run_once` directly."""

    def __init__(self, db: Any, rollouts: Any, clock: Callable[[], float] = time.time, *, sweep_s: float = 2.0,
                 debounce_s: float = 0.05) -> None:
        self.db, self.rollouts, self.clock = db, rollouts, clock
        self.sweep_s, self.debounce_s = sweep_s, debounce_s
        self.publisher: Publisher | None = None
        self._subs: dict[str, list[Callable[[Notice], None]]] = {}
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._always = False
        rows = db.query("SELECT COALESCE(MAX(seq), 0) AS s FROM device_notices")
        self._last_seq = int(rows[0]["s"])

    # -- producers -------------------------------------------------------------------------------
    def poke(self) -> None:
        """Something may have changed an assignment: sweep soon (debounced)."""
        self._event.set()

    def _wanted(self, tx: Any) -> tuple[dict[str, tuple[str, str]], dict[str, dict[str, Any]]]:
        """``({device: (device_id, rev)}, {device: its device_notices row})`` as of ``tx``."""
        wanted = self.rollouts.assignments(tx)
        shas = {(r["model"], int(r["version"])): r["sha256"]
                for r in tx.query("SELECT model, version, sha256 FROM versions")}
        revs = {}
        for r in tx.query("SELECT name, token_hash FROM devices"):
            a, dev_id = wanted.get(r["name"], {}), r["token_hash"][:32]
            revs[r["name"]] = (dev_id, notice_rev(dev_id, a, shas.get((a["model"], a["version"]), "") if a else ""))
        have = {r["device"]: r for r in tx.query("SELECT device, device_id, rev, seq FROM device_notices")}
        return revs, have

    @staticmethod
    def _stale(revs: dict[str, tuple[str, str]], have: dict[str, dict[str, Any]]) -> bool:
        return any(have.get(d) is None or (have[d]["device_id"], have[d]["rev"]) != v for d, v in revs.items()) \
            or any(d not in revs and row["rev"] for d, row in have.items())

    def sweep(self) -> list[dict[str, Any]]:
        """Bring ``device_notices`` up to date; return the rows this call changed. NOTE: a read-only
        pass first, so an idle fleet's sweep never takes the write lock."""
        with self.db.transaction() as tx:
            if not self._stale(*self._wanted(tx)):
                return []
        changed = []
        with self.db.transaction(write_lock=True) as tx:
            revs, have = self._wanted(tx)
            ids = {device: dev_id for device, (dev_id, _) in revs.items()}
            seq = max([0, *(int(r["seq"]) for r in have.values())])
            for device, (dev_id, rev) in revs.items():
                old = have.get(device)
                if old is not None and old["rev"] == rev and old["device_id"] == dev_id:
                    continue
                seq += 1
                tx.execute("INSERT INTO device_notices (device, device_id, rev, seq) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (device) DO UPDATE SET device_id = excluded.device_id, rev = excluded.rev, "
                           "seq = excluded.seq", (device, dev_id, rev, seq))
                if old is not None and old["device_id"] != dev_id and old["rev"]:
                    changed.append({"device": device, "device_id": old["device_id"], "rev": "", "seq": seq})
                changed.append({"device": device, "device_id": dev_id, "rev": rev, "seq": seq})
            for device, old in have.items():
                if device not in ids and old["rev"]:   # removed: clear its retained notice once
                    seq += 1
                    tx.execute("UPDATE device_notices SET rev = '', seq = ? WHERE device = ?", (seq, device))
                    changed.append({"device": device, "device_id": old["device_id"], "rev": "", "seq": seq})
        return changed

    # -- consumers -------------------------------------------------------------------------------
    def subscribe(self, device: str, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Call ``callback(notice)`` (from the hub's thread) for each new notice of ``device``;
        returns the function that unsubscribes."""
        with self._lock:
            self._subs.setdefault(device, []).append(callback)
            self._ensure_thread()

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subs.get(device, [])
                if callback in subs:
                    subs.remove(callback)
                if not subs:
                    self._subs.pop(device, None)
        return unsubscribe

    def current(self, device: str) -> Notice | None:
        """``device``'s notice now (sweeping first if it has none yet), or None when removed."""
        rows = self.db.query("SELECT rev, seq FROM device_notices WHERE device = ?", (device,))
        if not rows:
            self.run_once()
            rows = self.db.query("SELECT rev, seq FROM device_notices WHERE device = ?", (device,))
        if not rows or not rows[0]["rev"]:
            return None
        return {"v": 1, "rev": rows[0]["rev"], "seq": int(rows[0]["seq"])}

    def deliver(self, changed: list[dict[str, Any]]) -> None:
        """Push rows newer than the last seen ``seq`` (any process's) to this process's subscribers;
        publish the rows this process changed."""
        rows = self.db.query("SELECT device, rev, seq FROM device_notices WHERE seq > ? ORDER BY seq",
                             (self._last_seq,))
        for row in rows:
            self._last_seq = max(self._last_seq, int(row["seq"]))
            with self._lock:
                subs = list(self._subs.get(row["device"], ()))
            for callback in subs:   # rev "" tells a removed device's socket to close
                try:
                    callback({"v": 1, "rev": row["rev"], "seq": int(row["seq"])})
                except Exception:  # noqa: BLE001 - one subscriber's failure must not stop the others
                    log.exception("notice subscriber for %s failed", row["device"])
        publisher = self.publisher
        for row in changed if publisher is not None else ():
            publisher(row["device_id"], notice_payload(row))

    def republish(self) -> int:
        """Hand every row to the publisher again (after an MQTT (re)connect: the broker may have
        lost its retained messages). At-least-once: a device ignores a rev it already handled."""
        publisher = self.publisher
        if publisher is None:
            return 0
        rows = self.db.query("SELECT device_id, rev, seq FROM device_notices")
        for row in rows:
            publisher(row["device_id"], notice_payload(row))
        return len(rows)

    # -- the worker ------------------------------------------------------------------------------
    def run_once(self) -> list[dict[str, Any]]:
        with self._run_lock:
            changed = self.sweep()
            self.deliver(changed)
        return changed

    def start(self) -> None:
        """Keep the worker running (with an MQTT publisher). Without it, the worker runs only while
        a WebSocket is subscribed, so an idle test app leaves no thread behind."""
        with self._lock:
            self._always = True
            self._ensure_thread()

    def _ensure_thread(self) -> None:   # under self._lock
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._event.set()   # sweep at once: pokes made while no worker ran were not acted on
            self._thread = threading.Thread(target=self._loop, name="edgekiln-notices", daemon=True)
            self._thread.start()

    def _idle(self) -> bool:
        with self._lock:
            if self._always or self._subs:
                return False
            self._thread = None
            return True

    def stop(self) -> None:
        with self._lock:
            self._always = False
            thread, self._thread = self._thread, None
        self._stop.set()
        self._event.set()
        if thread is not None:
            thread.join(timeout=5)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if self._event.wait(self.sweep_s if not failures else min(60.0, self.sweep_s * 2 ** failures)):
                time.sleep(self.debounce_s)   # coalesce a burst of changes into one sweep
            self._event.clear()
            if self._stop.is_set():
                return
            try:
                self.run_once()
                failures = 0
            except Exception:  # noqa: BLE001 - a database hiccup must not end the worker
                failures += 1
                log.exception("notice sweep failed (%d in a row)", failures)
            if self._idle():
                return


WS_MAX_FRAME = 4096
CLOSE_REPLACED = 4000      # a newer socket of the same device took over
CLOSE_TOO_BIG = 1009
CLOSE_POLICY = 1008


def add_routes(app: Any, fleet: Any, *, device: Any) -> None:
    """``GET /v1/device/settings`` and ``WS /v1/device/notices``; ``device`` is the server's
    device-token dependency (the WebSocket checks the same ``Authorization`` header itself)."""
    import asyncio

    from fastapi import Depends, WebSocket
    from starlette.concurrency import run_in_threadpool
    from starlette.websockets import WebSocketDisconnect

    from edgekiln.fleet.registry import FleetError

    hub: NoticeHub = fleet.hub
    config = fleet.config
    sockets: dict[str, asyncio.Queue[Any]] = {}    # device -> the live socket's outgoing queue

    @app.get("/v1/device/settings")
    def settings(name: Annotated[str, Depends(device)]) -> dict[str, Any]:
        return {"mqtt": config.mqtt_advertise or config.mqtt_url, "websocket": "/v1/device/notices",
                "push_poll_s": config.push_poll_s, "telemetry_every_s": config.telemetry_every_s}

    @app.websocket("/v1/device/notices")
    async def notices(websocket: WebSocket) -> None:
        try:
            p = await run_in_threadpool(fleet.auth.principal, websocket.headers.get("authorization"))
        except FleetError:
            p = None
        if p is None or p.kind != "device" or p.device is None:
            await websocket.close(code=CLOSE_POLICY)   # before accept: the client sees HTTP 403
            return
        name: str = p.device
        await websocket.accept()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()
        old = sockets.get(name)
        sockets[name] = out
        if old is not None:
            old.put_nowait(CLOSE_REPLACED)

        def on_notice(notice: Notice) -> None:   # the hub's thread
            loop.call_soon_threadsafe(out.put_nowait, notice if notice["rev"] else CLOSE_POLICY)   # "": revoked

        unsubscribe = hub.subscribe(name, on_notice)
        try:
            current = await run_in_threadpool(hub.current, name)
            if current is not None:
                out.put_nowait(current)

            async def sender() -> None:
                last = -1
                while True:
                    item = await out.get()
                    if isinstance(item, int):
                        await websocket.close(code=item)
                        return
                    if item["seq"] <= last:
                        continue   # the worker's first delivery can repeat the current notice
                    last = item["seq"]
                    await websocket.send_text(json.dumps({"type": "notice", **item}, separators=(",", ":")))

            task = asyncio.create_task(sender())
            receive: asyncio.Future[Any] | None = None
            try:
                while not task.done():
                    receive = asyncio.ensure_future(websocket.receive())
                    done, _ = await asyncio.wait({receive, task}, return_when=asyncio.FIRST_COMPLETED)
                    if receive not in done:
                        break
                    message, receive = receive.result(), None
                    if message["type"] == "websocket.disconnect":
                        break
                    data = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
                    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
                    if size > WS_MAX_FRAME:
                        fleet.telemetry.refuse("too_large")
                        out.put_nowait(CLOSE_TOO_BIG)
                        await task
                        break
                    await run_in_threadpool(fleet.telemetry.receive, name, data)
            finally:
                for pending in (task, receive):
                    if pending is None:
                        continue
                    pending.cancel()
                    if pending.done() and not pending.cancelled():
                        pending.exception()   # retrieved: a socket that just went away is expected
        except (WebSocketDisconnect, RuntimeError):
            pass   # the device went away mid-send
        finally:
            unsubscribe()
            if sockets.get(name) is out:
                del sockets[name]
