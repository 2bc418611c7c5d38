"""The update server (`edgekiln serve`): registry, signed TUF metadata, staged rollouts.

The protocol is docs/fleet-protocol.md. This module is the FastAPI adapter, so it imports
FastAPI at the top; nothing on the device side imports it. Storage, clock and fault hooks are injected, so tests
run the real app in-process:

    >>> import tempfile, httpx
    >>> from fastapi.testclient import TestClient
    >>> app = create_app(ServerConfig.local(tempfile.mkdtemp(), admin_token="a" * 32))
    >>> with TestClient(app) as c:
    ...     c.post("/v1/devices", json={"name": "cam-1", "group": "lab"},
    ...            headers={"Authorization": "Bearer " + "a" * 32}).status_code
    201
"""

import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgekiln.errors import EdgekilnError
from edgekiln.fleet.auth import Authenticator, Principal
from edgekiln.fleet.registry import FleetError, Registry, check_name, check_version
from edgekiln.fleet.rollout import Rollouts, RolloutSpec
from edgekiln.fleet.tuf_repo import TufExpiry, TufRepository

UPLOAD_PATH = re.compile(r"^/v1/models/[^/]+/versions/[^/]+$")
TARGET_PATH = re.compile(r"^(?P<model>[a-z0-9][a-z0-9._-]{0,63})/(?P<version>[1-9][0-9]{0,9})/bundle\.tar$")
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

    @classmethod
    def local(cls, folder: str | Path, *, admin_token: str, **kw: Any) -> "ServerConfig":
        """Everything (SQLite file, blobs, keys) inside one folder."""
        folder = Path(folder)
        return cls(db_url=f"sqlite:///{folder / 'fleet.db'}", store_url=str(folder / "blobs"),
                   keys_dir=str(folder / "keys"), admin_token=admin_token, **kw)


class FleetServer:
    """The server's parts wired together (what the HTTP layer calls)."""

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] | None = None, db: Any = None,
                 store: Any = None, fault: Callable[[str], None] | None = None) -> None:
        from edgekiln.fleet.db import open_database
        from edgekiln.fleet.store import open_store

        self.config = config
        self.clock = clock or time.time
        self.fault = fault or (lambda step: None)
        self.db = db if db is not None else open_database(config.db_url)
        self.store = store if store is not None else open_store(config.store_url, endpoint_url=config.s3_endpoint)
        self.tuf = TufRepository(self.db, config.keys_dir, expiry=config.expiry, clock=self.clock)
        self.tuf.initialize()
        self.registry = Registry(self.db, self.store, self.tuf, self.clock)
        self.rollouts = Rollouts(self.db, self.clock)
        self.registry.collect_garbage()
        self.auth = Authenticator(self.registry, config.admin_token)
        self._seen: dict[str, float] = {}
        self._info: dict[str, tuple[float, dict[str, Any]]] = {}
        self._seen_lock = threading.Lock()

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
    app.add_middleware(BodyLimit, upload_limit=config.max_bundle_bytes, json_limit=config.max_json_bytes)

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
        import json

        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FleetError("request body is not valid JSON", 400) from None
        if not isinstance(body, dict):
            raise FleetError("request body must be a JSON object", 422)
        return body

    Body = Annotated[dict[str, Any], Depends(json_body)]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:  # the only unauthenticated endpoint: says nothing but "up"
        return {"ok": True}

    # -- admin ---------------------------------------------------------------------------------
    @app.post("/v1/devices", status_code=201)
    def add_device(body: Body, _: Admin) -> dict[str, Any]:
        name, group = body.get("name"), body.get("group")
        token = fleet.registry.add_device(name, group)  # type: ignore[arg-type]
        fleet.rollouts.device_joined(group)  # type: ignore[arg-type]
        return {"name": name, "group": group, "token": token}

    @app.delete("/v1/devices/{name}")
    def remove_device(name: str, _: Admin) -> dict[str, Any]:
        fleet.registry.remove_device(name)
        fleet.auth.forget(name)
        fleet._info.pop(name, None)
        return {}

    @app.get("/v1/devices")
    def list_devices(_: Admin) -> list[dict[str, Any]]:
        return fleet.registry.devices()

    @app.post("/v1/groups", status_code=201)
    def set_group(body: Body, _: Admin) -> dict[str, Any]:
        out = fleet.registry.set_group(body.get("name"), body.get("channel", "stable"))  # type: ignore[arg-type]
        fleet._info.clear()
        return out

    @app.get("/v1/groups")
    def list_groups(_: Admin) -> list[dict[str, Any]]:
        return fleet.registry.groups()

    @app.post("/v1/models/{model}/versions/{version}", status_code=201)
    async def publish(model: str, version: str, request: Request, _: Admin,
                      channel: str = "stable") -> dict[str, Any]:
        check_name(model, "model")
        check_name(channel, "channel")
        number = check_version(int(version)) if version.isdigit() and len(version) < 11 else check_version(version)
        if await run_in_threadpool(fleet.registry.exists, model, number):
            raise FleetError(f"{model} version {number} is already published; versions are immutable", 409)
        with tempfile.TemporaryDirectory(prefix="edgekiln-upload-") as tmp:
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
        return fleet.rollouts.start(spec)

    @app.get("/v1/rollouts")
    def list_rollouts(_: Admin) -> list[dict[str, Any]]:
        return fleet.rollouts.list()

    @app.get("/v1/rollouts/{rid}")
    def rollout_status(rid: int, _: Admin) -> dict[str, Any]:
        return fleet.rollouts.status(rid)

    @app.post("/v1/rollouts/{rid}/pause")
    def pause(rid: int, _: Admin) -> dict[str, Any]:
        return fleet.rollouts.set_paused(rid, True)

    @app.post("/v1/rollouts/{rid}/resume")
    def resume(rid: int, _: Admin) -> dict[str, Any]:
        return fleet.rollouts.set_paused(rid, False)

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
        with fleet._seen_lock:
            fleet._seen[name] = fleet.clock()
        return {}

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


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware refusing request bodies above a size (413), declared or streamed."""

    def __init__(self, app: Any, *, upload_limit: int, json_limit: int) -> None:
        self.app, self.upload_limit, self.json_limit = app, upload_limit, json_limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if UPLOAD_PATH.match(scope.get("path", "")) else self.json_limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_413(send, limit)
            return
        seen, started = 0, False

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_413(send, limit)


async def _send_413(send: Any, limit: int) -> None:
    body = b'{"detail": "request body larger than the limit of %d bytes"}' % limit
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
