"""The update server (`edgekiln serve`): registry, signed TUF metadata, staged rollouts.

The protocol is docs/fleet-protocol.md. This module is the FastAPI adapter, so it imports
FastAPI at the top; nothing on the device side imports it. Storage, clock and fault hooks are injected, so tests
run the real app in-process:

    >>> import tempfile, httpx
    >>> from fastapi.testclient import TestClient
    >>> token = "doctest-admin-token-0123456789"
    >>> app = create_app(ServerConfig.local(tempfile.mkdtemp(), admin_token=token))
    >>> with TestClient(app) as c:
    ...     c.post("/v1/devices", json={"name": "cam-1", "group": "lab"},
    ...            headers={"Authorization": "Bearer " + token}).status_code
    201
"""

import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgekiln.errors import EdgekilnError
from edgekiln.fleet import mqtt_bridge, notices, telemetry
from edgekiln.fleet.auth import Authenticator, Principal, check_admin_token
from edgekiln.fleet.bundle_tar import MAX_UNPACKED_BYTES
from edgekiln.fleet.director import make_director
from edgekiln.fleet.json_limits import parse_json_object
from edgekiln.fleet.mqtt_bridge import start_mqtt
from edgekiln.fleet.notices import NoticeHub
from edgekiln.fleet.registry import FleetError, Registry, check_name, check_version
from edgekiln.fleet.rollout import Rollouts, RolloutSpec
from edgekiln.fleet.telemetry import TelemetryStore, telemetry_view
from edgekiln.fleet.tuf_repo import TufExpiry, TufRepository
from edgekiln.runtime.http_limits import BodyLimit

UPLOAD_PATH = re.compile(r"^/v1/models/[^/]+/versions/[^/]+$")
TARGET_PATH = re.compile(r"^(?P<model>[a-z0-9][a-z0-9._-]{0,63})/(?P<version>[1-9][0-9]{0,9})/"
                         r"(?:bundle\.tar|delta-from-[1-9][0-9]{0,9}\.bsdiff4)$")
VERSION_TEXT = re.compile(r"[1-9][0-9]{0,9}")
SPOOL_ENTRY = re.compile(r"^upload-(?P<pid>[0-9]{1,9})-")
RANGE = re.compile(r"^bytes=(?P<start>[0-9]{1,15})?-(?P<end>[0-9]{1,15})?$")
LAST_SEEN_EVERY_S = 5.0
DEVICE_INFO_TTL_S = 5.0


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Where the server keeps its state, and its limits."""

    db_url: str = "sqlite:///fleet/fleet.db"     # sqlite:///FILE or postgresql://...
    store_url: str = "fleet/blobs"               # a folder or s3://bucket/prefix
    keys_dir: str = "fleet/keys"                 # TUF private keys; root.json for enrolment goes here
    admin_token: str | None = None               # EDGEKILN_ADMIN_TOKEN / --admin-token-file
    s3_endpoint: str | None = None               # S3-compatible endpoint (MinIO, moto, ...)
    expiry: TufExpiry = field(default_factory=TufExpiry)
    max_bundle_bytes: int = 512 * 1024 * 1024    # uploads above this are refused (413)
    max_json_bytes: int = 64 * 1024              # any other request body above this is refused (413)
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES  # a bundle whose files unpack to more is refused (422)
    spool_dir: str = ""                          # uploads in flight, one upload-<pid>-<random>/ folder each
                                                 # ("": a spool/ folder beside keys_dir)
    mqtt_url: str | None = None                  # mqtt[s]://host:port of the broker the server publishes to
    mqtt_advertise: str | None = None            # the broker URL devices are told (default: mqtt_url)
    mqtt_ca: str | None = None                   # CA of the broker's TLS certificate (default: the system's)
    mqtt_password: str | None = field(default=None, repr=False)  # the edgekiln-server user's password
    mqtt_broker_dir: str | None = None           # rewrite passwd/acl here and SIGHUP the broker on device changes
    push_poll_s: float = 900.0                   # devices' safety poll while a push channel is up
    telemetry_every_s: float = 300.0             # devices' telemetry period
    notice_sweep_s: float = 2.0                  # notices changed by other server processes show within this

    @property
    def spool(self) -> Path:
        return Path(self.spool_dir) if self.spool_dir else Path(self.keys_dir).parent / "spool"

    @classmethod
    def local(cls, folder: str | Path, *, admin_token: str, **kw: Any) -> "ServerConfig":
        """Everything (SQLite file, blobs, keys) inside one folder."""
        folder = Path(folder)
        kw.setdefault("spool_dir", str(folder / "spool"))
        return cls(db_url=f"sqlite:///{folder / 'fleet.db'}", store_url=str(folder / "blobs"),
                   keys_dir=str(folder / "keys"), admin_token=admin_token, **kw)


class FleetServer:
    """The server's parts wired together (what the HTTP layer calls)."""

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] | None = None, db: Any = None,
                 store: Any = None, fault: Callable[[str], None] | None = None) -> None:
        from edgekiln.fleet.db import open_database
        from edgekiln.fleet.store import open_store

        check_admin_token(config.admin_token)  # first: a weak token leaves no database and no keys behind
        self.config = config
        self.clock = clock or time.time
        self.fault = fault or (lambda step: None)
        self.db = db if db is not None else open_database(config.db_url)
        self.store = store if store is not None else open_store(config.store_url, endpoint_url=config.s3_endpoint)
        self.tuf = TufRepository(self.db, config.keys_dir, expiry=config.expiry, clock=self.clock)
        self.tuf.initialize()
        self.registry = Registry(self.db, self.store, self.tuf, self.clock,
                                 max_unpacked_bytes=config.max_unpacked_bytes)
        self.rollouts = Rollouts(self.db, self.clock)
        self.director = make_director(self)
        self.registry.collect_garbage()
        clean_spool(config.spool)
        self.auth = Authenticator(self.registry, config.admin_token)
        self.hub = NoticeHub(self.db, self.rollouts, self.clock, sweep_s=config.notice_sweep_s)
        self.telemetry = TelemetryStore(self.db, self.clock)
        self.mqtt = start_mqtt(self)
        self._seen: dict[str, float] = {}
        self._info: dict[str, tuple[float, dict[str, Any]]] = {}
        self._seen_lock = threading.Lock()

    def close(self) -> None:
        """Stop the MQTT bridge and the notice worker (tests; a served process just exits)."""
        if self.mqtt is not None:
            self.mqtt.stop()
        self.hub.stop()

    def touch_due(self, device: str) -> bool:
        """Whether ``last_seen`` should be written now: at most every few seconds per device, so a
        poll is a pure read most of the time."""
        now = self.clock()
        with self._seen_lock:
            if now - self._seen.get(device, -1e18) < LAST_SEEN_EVERY_S:
                return False
            self._seen[device] = now
        return True

    def touch(self, device: str) -> None:
        self.db.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (self.clock(), device))

    def device_info(self, name: str) -> dict[str, Any]:
        """The device's group and channel, cached for a few seconds (a channel change on another
        server process shows within that time; on this one at once)."""
        now = time.monotonic()
        hit = self._info.get(name)
        if hit is not None and now - hit[0] < DEVICE_INFO_TTL_S:
            return hit[1]
        info = self.registry.device(name)
        if info is None:
            raise FleetError("unknown token", 401)
        self._info[name] = (now, info)
        return info


def create_app(config: ServerConfig, *, clock: Callable[[], float] | None = None, db: Any = None,
               store: Any = None, fault: Callable[[str], None] | None = None) -> Any:
    """Build the FastAPI app. ``clock`` (epoch seconds), ``db``, ``store`` and ``fault`` (called with
    each publish step name; raise in it to simulate a crash) are for tests."""
    fleet = FleetServer(config, clock=clock, db=db, store=store, fault=fault)
    app = FastAPI(title="edgekiln update server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fleet = fleet
    app.add_middleware(BodyLimit, limit=config.max_json_bytes, per_path=[(UPLOAD_PATH, config.max_bundle_bytes)])

    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(EdgekilnError)
    async def _edgekiln_error(request: Request, exc: EdgekilnError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    # NOTE: the dependencies and the polled endpoints are async. On SQLite they call the database
    # directly: sub-millisecond indexed reads in-process, cheaper than a threadpool hop. A network
    # database (PostgreSQL) would block the event loop for a round trip, so there they use the pool.
    inline = fleet.db.dialect == "sqlite"

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args) if inline else await run_in_threadpool(fn, *args)

    async def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
        if fleet.auth.cached(authorization):
            return fleet.auth.principal(authorization)
        return await call(fleet.auth.principal, authorization)

    async def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
        if p.kind != "admin":
            raise FleetError("this endpoint needs the admin token", 403)
        return p

    async def device(p: Annotated[Principal, Depends(principal)]) -> str:
        if p.kind != "device" or p.device is None:
            raise FleetError("this endpoint needs a device token", 403)
        return p.device

    # NOTE: this module has no `from __future__ import annotations`: FastAPI must see these local
    # aliases as objects, not as strings it would look up in the module's globals.
    Caller = Annotated[Principal, Depends(principal)]
    Admin = Annotated[Principal, Depends(admin)]
    Device = Annotated[str, Depends(device)]

    async def json_body(request: Request) -> dict[str, Any]:
        return parse_json_object(await request.body())

    Body = Annotated[dict[str, Any], Depends(json_body)]
    RolloutId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:  # the only unauthenticated endpoint: says nothing but "up" (and MQTT's state)
        return {"ok": True, "mqtt": None if fleet.mqtt is None else fleet.mqtt.status}

    # -- admin ---------------------------------------------------------------------------------
    @app.post("/v1/devices", status_code=201)
    def add_device(body: Body, _: Admin) -> dict[str, Any]:
        name, group = body.get("name"), body.get("group")
        token = fleet.registry.add_device(name, group)  # type: ignore[arg-type]
        fleet.rollouts.device_joined(group)  # type: ignore[arg-type]
        mqtt_bridge.device_added(fleet, name, token)  # type: ignore[arg-type]
        return {"name": name, "group": group, "token": token}

    @app.delete("/v1/devices/{name}")
    def remove_device(name: str, _: Admin) -> dict[str, Any]:
        fleet.registry.remove_device(name)
        fleet.auth.forget(name)
        fleet.director.forget(name)
        fleet._info.pop(name, None)
        mqtt_bridge.device_removed(fleet, name)
        return {}

    @app.get("/v1/devices")
    def list_devices(_: Admin) -> list[dict[str, Any]]:
        latest, now = fleet.telemetry.latest(), fleet.clock()
        return [{**d, "telemetry": telemetry_view(latest.get(d["name"]), now)} for d in fleet.registry.devices()]

    @app.post("/v1/groups", status_code=201)
    def set_group(body: Body, _: Admin) -> dict[str, Any]:
        out = fleet.registry.set_group(body.get("name"), body.get("channel", "stable"))  # type: ignore[arg-type]
        fleet._info.clear()
        fleet.hub.poke()
        return out

    @app.get("/v1/groups")
    def list_groups(_: Admin) -> list[dict[str, Any]]:
        return fleet.registry.groups()

    @app.post("/v1/models/{model}/versions/{version}", status_code=201)
    async def publish(model: str, version: str, request: Request, _: Admin,
                      channel: str = "stable") -> dict[str, Any]:
        check_name(model, "model")
        check_name(channel, "channel")
        number = parse_version(version)
        if await run_in_threadpool(fleet.registry.exists, model, number):
            raise FleetError(f"{model} version {number} is already published; versions are immutable", 409)
        with store_full_is_507(), upload_folder(config.spool) as tmp:
            spooled, digest, length = Path(tmp) / "bundle.tar", hashlib.sha256(), 0
            with open(spooled, "wb") as fh:
                async for chunk in request.stream():
                    length += len(chunk)
                    if length > config.max_bundle_bytes:
                        raise FleetError(f"bundle larger than the server's limit of {config.max_bundle_bytes} bytes",
                                         413)
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if length == 0:
                raise FleetError("empty upload: send the bundle .tar as the request body", 422)
            fleet.fault("spooled")
            published = await run_in_threadpool(fleet.registry.publish, model, number, channel, spooled,
                                                 digest.hexdigest(), length, fleet.fault)
        return published.to_dict()

    @app.get("/v1/models")
    def list_models(_: Admin) -> list[dict[str, Any]]:
        return fleet.registry.versions()

    @app.post("/v1/rollouts", status_code=201)
    def start_rollout(body: Body, _: Admin) -> dict[str, Any]:
        waves = body.get("waves", [100])
        if not isinstance(waves, list) or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in waves):
            raise FleetError("waves must be a list of percentages", 422)
        spec = RolloutSpec(model=body.get("model"), version=body.get("version"), group=body.get("group"),  # type: ignore[arg-type]
                           waves=tuple(waves), success_threshold=body.get("success_threshold", 1.0),
                           failure_threshold=body.get("failure_threshold", 0.2))
        out = fleet.rollouts.start(spec)
        fleet.hub.poke()
        return out

    @app.get("/v1/rollouts")
    def list_rollouts(_: Admin) -> list[dict[str, Any]]:
        return fleet.rollouts.list()

    @app.get("/v1/rollouts/{rid}")
    def rollout_status(rid: RolloutId, _: Admin) -> dict[str, Any]:
        return fleet.rollouts.status(rid)

    @app.post("/v1/rollouts/{rid}/pause")
    def pause(rid: RolloutId, _: Admin) -> dict[str, Any]:
        out = fleet.rollouts.set_paused(rid, True)
        fleet.hub.poke()
        return out

    @app.post("/v1/rollouts/{rid}/resume")
    def resume(rid: RolloutId, _: Admin) -> dict[str, Any]:
        out = fleet.rollouts.set_paused(rid, False)
        fleet.hub.poke()
        return out

    # -- device --------------------------------------------------------------------------------
    @app.get("/v1/device/assignment")
    async def assignment(name: Device) -> dict[str, Any]:
        info = await call(fleet.device_info, name)
        if fleet.touch_due(name):
            await run_in_threadpool(fleet.touch, name)
        return await call(fleet.rollouts.assignment, name, info["group_name"])

    @app.post("/v1/device/report")
    def report(body: Body, name: Device) -> dict[str, Any]:
        info = fleet.device_info(name)
        fleet.rollouts.report(name, info["group_name"], body)
        fleet.hub.poke()   # a report can start the next wave or halt the rollout
        with fleet._seen_lock:
            fleet._seen[name] = fleet.clock()
        return {}

    notices.add_routes(app, fleet, device=device)
    telemetry.add_routes(app, fleet, admin=admin, device=device)

    # -- TUF -----------------------------------------------------------------------------------
    @app.get("/tuf/metadata/{filename}")
    async def metadata(filename: str, p: Caller) -> Response:
        if p.device and fleet.touch_due(p.device):
            await run_in_threadpool(fleet.touch, p.device)
        if fleet.tuf.refresh_due():
            await run_in_threadpool(fleet.tuf.refresh)
        data = await call(fleet.tuf.get_file, filename)
        if data is None:
            raise FleetError(f"no metadata file '{filename}'", 404)
        return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})

    @app.get("/director/metadata/{filename}")
    async def director_metadata(filename: str, name: Device) -> Response:
        info = await call(fleet.device_info, name)
        data = await run_in_threadpool(fleet.director.get_file, name, info["group_name"], filename)
        if data is None:
            raise FleetError(f"no director metadata file '{filename}'", 404)
        return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})

    @app.get("/tuf/targets/{path:path}")
    def target(path: str, p: Caller, range: Annotated[str | None, Header()] = None) -> Response:  # noqa: A002
        m = TARGET_PATH.match(path)
        row = fleet.registry.version_by_path(path) if m else None
        if row is None:
            raise FleetError(f"no target '{path[:200]}'", 404)
        if p.device is not None:
            info = fleet.device_info(p.device)
            if row["channel"] != info["channel"] and \
                    not fleet.rollouts.was_assigned(p.device, row["model"], int(row["version"])):
                raise FleetError(f"target '{path}' is neither assigned to this device nor in its channel", 403)
        length = int(row["length"])
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{row["sha256"]}"'}
        start, end, status = 0, length - 1, 200
        if range is not None:
            r = RANGE.match(range.strip())
            if not r or (r["start"] is None and r["end"] is None):
                raise FleetError(f"unsupported Range header '{range[:100]}' (use bytes=N- or bytes=N-M)", 416)
            if r["start"] is None:  # suffix range: the last N bytes
                start, end = max(0, length - int(r["end"])), length - 1
            else:
                start = int(r["start"])
                end = min(int(r["end"]), length - 1) if r["end"] is not None else length - 1
            if start >= length or end < start:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{length}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{length}"
        headers["Content-Length"] = str(end - start + 1)
        return StreamingResponse(fleet.store.read(row["blob_key"], start, end), status_code=status,
                                 media_type="application/octet-stream", headers=headers)

    return app


def parse_version(text: str) -> int:
    """A version from a URL: ASCII digits without a leading zero, below 2**31 (``int()`` would take
    ``٥`` as 5 and fail on ``²``)."""
    if not VERSION_TEXT.fullmatch(text):
        raise FleetError(f"version '{text[:20]}' must be an integer >= 1 written in ASCII digits, "
                         "without leading zeros", 422)
    return check_version(int(text))


_UPLOADS_HERE: set[str] = set()   # this process's upload folders in flight


@contextmanager
def upload_folder(spool: Path) -> Iterator[Path]:
    """A fresh ``SPOOL/upload-<pid>-<random>/`` for one upload, removed afterwards. A server killed
    mid-upload leaves it behind; :func:`clean_spool` removes it at the next start."""
    spool.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"upload-{os.getpid()}-", dir=spool))
    _UPLOADS_HERE.add(folder.name)
    try:
        yield folder
    finally:
        _UPLOADS_HERE.discard(folder.name)
        shutil.rmtree(folder, ignore_errors=True)


def clean_spool(spool: Path) -> list[str]:
    """Remove upload folders whose server process is gone; keep those of live processes (several
    servers on one host may share a spool). Returns the removed names."""
    removed = []
    for entry in spool.glob("upload-*") if spool.is_dir() else ():
        m = SPOOL_ENTRY.match(entry.name)
        pid = int(m["pid"]) if m else 0
        if pid <= 0:
            continue  # not a name upload_folder makes: not ours to remove
        if pid == os.getpid():
            alive = entry.name in _UPLOADS_HERE
        else:
            try:
                os.kill(pid, 0)   # signal 0: only asks whether the process exists
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:   # a process of another user: alive
                alive = True
        if not alive:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


@contextmanager
def store_full_is_507() -> Iterator[None]:
    """A full disk or quota while spooling or storing an upload is the server's problem, said so (507)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise FleetError(f"the server's bundle store is full ({errno.errorcode[exc.errno]}): free space or "
                         "raise the quota", 507) from None
