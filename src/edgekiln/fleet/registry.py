"""The model registry: immutable versions on channels, device groups and devices.

Publishing is atomic. The uploaded ``.tar`` is spooled and hashed, validated as a deployment
bundle (its manifest read from the tar, every model file checked against its SHA-256), copied
into the blob store under its content hash, and then *one* database transaction records the
version and the new signed TUF metadata. Only that commit makes the version visible; a crash at
any earlier point leaves at most an unreferenced blob (deleted by a later server start once a
day old), and a retry succeeds.

Before that transaction, deltas are made (:mod:`edgekiln.fleet.delta`) from the model's previous
version and from the (at most two) versions most devices run, each stored as a blob and signed as
the target ``M/V/delta-from-B.bsdiff4`` in the same signing pass as the bundle.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fleet import delta as deltas_mod
from edgekiln.fleet.bundle_tar import MAX_UNPACKED_BYTES, BundleRefused, check_members, unpacked_size

log = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ORPHAN_AGE_S = 86400.0
MAX_DELTA_BASES = 3   # the previous version and the two versions most devices run
DELTA_BUDGET_S = 30.0  # no further base is diffed once a publish spent this long diffing (the publish client waits up to 300 s: client.PUBLISH_TIMEOUT_S)
# NOTE: kept here until db.SCHEMA takes it (one CREATE ... IF NOT EXISTS at start, both engines)
DELTAS_TABLE = ("CREATE TABLE IF NOT EXISTS deltas (model TEXT NOT NULL, version INTEGER NOT NULL, "
                "base_version INTEGER NOT NULL, target_path TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, "
                "length BIGINT NOT NULL, blob_key TEXT NOT NULL, PRIMARY KEY (model, version, base_version))")
PUBLISH_STEPS = ("spooled", "validated", "stored", "registered", "signed-targets", "signed-snapshot", "signed-timestamp")


class FleetError(EdgekilnError):
    """A refused request, with the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise FleetError(f"{what} '{value}' is not a valid name ([a-z0-9][a-z0-9._-]{{0,63}})", 422)
    return value


def check_version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
        raise FleetError(f"version {value!r} must be an integer >= 1", 422)
    return value


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def target_path(model: str, version: int) -> str:
    return f"{model}/{version}/bundle.tar"


@dataclass(frozen=True)
class Published:
    model: str
    version: int
    channel: str
    target_path: str
    sha256: str
    length: int
    deltas: tuple[dict[str, Any], ...] = ()   # {base_version, length, ratio, diff_s} of each delta made

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "deltas": list(self.deltas)}


@dataclass(frozen=True)
class _Delta:
    base_version: int
    base_sha256: str
    target_path: str
    sha256: str
    length: int
    blob_key: str
    ratio: float
    diff_s: float


def validate_bundle_tar(path: Path, *, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> tuple[str, int]:
    """Check that ``path`` is an uncompressed tar of a valid bundle whose members are safe to extract
    (:func:`~edgekiln.fleet.bundle_tar.check_members`, the agent's own check); return the manifest's
    name and the bytes its files take unpacked."""
    from edgekiln.runtime.manifest import MANIFEST_NAME, Manifest

    try:
        with tarfile.open(path, mode="r:") as tar:
            try:
                checked = check_members(tar, max_bytes=max_unpacked_bytes)
            except BundleRefused as exc:
                raise FleetError(str(exc), 422) from None
            members = {str(rel): m for m, rel in checked if m.isfile()}
            unpacked = unpacked_size(tar)
            if MANIFEST_NAME not in members:
                raise FleetError(f"upload is not a bundle: no {MANIFEST_NAME} at the top of the tar", 422)
            try:
                data = json.loads(tar.extractfile(members[MANIFEST_NAME]).read())  # type: ignore[union-attr]
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise FleetError(f"bundle {MANIFEST_NAME} is not valid JSON ({exc})", 422) from None
            try:
                manifest = Manifest.from_dict(data, MANIFEST_NAME)
            except EdgekilnError as exc:
                raise FleetError(f"invalid bundle: {exc}", 422) from None
            needed = [(v.file, v.sha256) for v in manifest.variants]
            needed += [(f, None) for f in (manifest.sample_inputs, manifest.sample_outputs) if f]
            for file, digest in needed:
                member = members.get(str(PurePosixPath(file)))
                if member is None:
                    raise FleetError(f"invalid bundle: {file} named in the manifest is not in the tar", 422)
                if digest is not None:
                    h = hashlib.sha256()
                    fh = tar.extractfile(member)
                    while chunk := fh.read(1 << 20):  # type: ignore[union-attr]
                        h.update(chunk)
                    if h.hexdigest() != digest:
                        raise FleetError(f"invalid bundle: {file} does not match its SHA-256 in the manifest", 422)
    except tarfile.TarError as exc:
        raise FleetError(f"upload is not an uncompressed tar ({exc})", 422) from None
    return manifest.name, unpacked


def _latency(p50: Any, p95: Any) -> dict[str, float] | None:
    """Stored latencies as ``{p50, p95}``; None when either is missing or not a finite number (rows
    written before reports were checked may hold NaN, which JSON cannot carry)."""
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (p50, p95))
    return {"p50": float(p50), "p95": float(p95)} if ok else None


class Registry:
    """Versions, groups and devices over a :mod:`~edgekiln.fleet.db` database and a blob store."""

    def __init__(self, db: Any, store: Any, tuf: Any, clock: Callable[[], float], *,
                 max_unpacked_bytes: int = MAX_UNPACKED_BYTES, make_deltas: bool = True) -> None:
        self.db, self.store, self.tuf, self.clock = db, store, tuf, clock
        self.max_unpacked_bytes = max_unpacked_bytes
        self.make_deltas = make_deltas
        db.execute(DELTAS_TABLE)

    # -- versions ------------------------------------------------------------------------------
    def exists(self, model: str, version: int) -> bool:
        return bool(self.db.query("SELECT 1 FROM versions WHERE model = ? AND version = ?", (model, version)))

    def publish(self, model: str, version: int, channel: str, spooled: Path, sha256: str, length: int,
                fault: Callable[[str], None] | None = None) -> Published:
        """Make ``spooled`` (an already hashed upload) version ``version`` of ``model`` on ``channel``."""
        check_name(model, "model")
        check_version(version)
        check_name(channel, "channel")
        fault = fault or (lambda step: None)
        if self.exists(model, version):
            raise FleetError(f"{model} version {version} is already published; versions are immutable", 409)
        manifest_name, unpacked = validate_bundle_tar(spooled, max_unpacked_bytes=self.max_unpacked_bytes)
        fault("validated")
        blob_key = f"blobs/{sha256[:2]}/{sha256}"
        self.store.put(blob_key, spooled)
        fault("stored")
        path = target_path(model, version)
        made = self._deltas_for(model, version, spooled, sha256, length) if self.make_deltas else []
        with self.db.transaction(write_lock=True) as tx:
            if tx.query("SELECT 1 FROM versions WHERE model = ? AND version = ?", (model, version)):
                raise FleetError(f"{model} version {version} is already published; versions are immutable", 409)
            tx.execute("INSERT INTO versions (model, version, channel, target_path, sha256, length, blob_key, "
                       "manifest_name, published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (model, version, channel, path, sha256, length, blob_key, manifest_name, self.clock()))
            fault("registered")
            custom = {"model": model, "version": version, "channel": channel, "unpacked_bytes": unpacked}
            entries = [(path, length, sha256, custom)]
            for d in made:
                self._insert_delta(tx, model, version, d)
                entries.append((d.target_path, d.length, d.sha256, deltas_mod.delta_custom(
                    model, version, d.base_version, d.base_sha256, sha256, length)))
            self.tuf.add_targets(tx, entries, fault)
        return Published(model, version, channel, path, sha256, length,
                         tuple({"base_version": d.base_version, "length": d.length, "ratio": round(d.ratio, 4),
                                "diff_s": round(d.diff_s, 3)} for d in made))

    # -- deltas --------------------------------------------------------------------------------
    def delta_bases(self, model: str, version: int) -> list[int]:
        """The versions below ``version`` a delta is made from: the previous one, then the (at most
        two) versions most devices of the model run."""
        prev = self.db.query("SELECT MAX(version) AS v FROM versions WHERE model = ? AND version < ?",
                             (model, version))
        active = self.db.query("SELECT active_version AS v, COUNT(*) AS n FROM devices WHERE model = ? AND "
                               "active_version IS NOT NULL AND active_version < ? GROUP BY active_version "
                               "ORDER BY n DESC, active_version DESC LIMIT 2", (model, version))
        bases: list[int] = []
        for row in [*prev, *active]:
            if row["v"] is not None and int(row["v"]) not in bases:
                bases.append(int(row["v"]))
        return bases[:MAX_DELTA_BASES]

    def _deltas_for(self, model: str, version: int, spooled: Path, sha256: str, length: int) -> list[_Delta]:
        made: list[_Delta] = []
        started = time.monotonic()
        for base in self.delta_bases(model, version):
            if time.monotonic() - started > DELTA_BUDGET_S:
                log.info("%s v%d: no delta from v%d (the publish spent %.0f s diffing already)", model, version,
                         base, time.monotonic() - started)
                break
            rows = self.db.query("SELECT sha256, blob_key FROM versions WHERE model = ? AND version = ?",
                                 (model, base))
            if not rows:
                continue
            try:
                d = self._make_delta(model, version, base, rows[0]["sha256"], rows[0]["blob_key"], spooled, length)
            except (OSError, EdgekilnError) as exc:   # NOTE: a delta is an optimization: never fail a publish for it
                log.warning("%s v%d: no delta from v%d (%s)", model, version, base, exc)
                continue
            if d is not None:
                made.append(d)
        return made

    def _make_delta(self, model: str, version: int, base: int, base_sha256: str, base_key: str, spooled: Path,
                    length: int) -> _Delta | None:
        with tempfile.TemporaryDirectory(prefix=".delta-", dir=spooled.parent) as tmp:
            base_tar = Path(tmp) / "base.tar"
            with open(base_tar, "wb") as out:
                for chunk in self.store.read(base_key):
                    out.write(chunk)
            started = time.perf_counter()
            patch, why = deltas_mod.explain_delta(base_tar, spooled)
            diff_s = time.perf_counter() - started
            if patch is None:
                log.info("%s v%d: no delta from v%d (%s)", model, version, base, why)
                return None
            return self._store_delta(model, version, base, base_sha256, patch, Path(tmp) / "delta",
                                     ratio=len(patch) / max(1, length), diff_s=diff_s)

    def _store_delta(self, model: str, version: int, base: int, base_sha256: str, patch: bytes, tmp: Path, *,
                     ratio: float, diff_s: float) -> _Delta:
        digest = hashlib.sha256(patch).hexdigest()
        tmp.write_bytes(patch)
        key = f"blobs/{digest[:2]}/{digest}"
        self.store.put(key, tmp)
        return _Delta(base, base_sha256, deltas_mod.delta_path(model, version, base), digest, len(patch), key,
                      ratio, diff_s)

    def _insert_delta(self, tx: Any, model: str, version: int, d: _Delta) -> None:
        tx.execute("DELETE FROM deltas WHERE target_path = ?", (d.target_path,))
        tx.execute("INSERT INTO deltas (model, version, base_version, target_path, sha256, length, blob_key) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (model, version, d.base_version, d.target_path, d.sha256,
                                                    d.length, d.blob_key))

    def add_delta(self, model: str, version: int, base_version: int, blob: bytes) -> str:
        """Test hook: sign ``blob`` as the delta from ``base_version`` to ``version`` (both published)
        without checking it, as a buggy or compromised delta builder would. Returns its target path."""
        rows = {r["version"]: r for r in self.db.query(
            "SELECT version, sha256, length FROM versions WHERE model = ? AND version IN (?, ?)",
            (model, version, base_version))}
        if version not in rows or base_version not in rows:
            raise FleetError(f"{model} v{version} or v{base_version} is not published", 404)
        with tempfile.TemporaryDirectory(prefix=".delta-") as tmp:
            d = self._store_delta(model, version, base_version, rows[base_version]["sha256"], blob,
                                  Path(tmp) / "delta", ratio=len(blob) / max(1, int(rows[version]["length"])),
                                  diff_s=0.0)
        custom = deltas_mod.delta_custom(model, version, base_version, d.base_sha256, rows[version]["sha256"],
                                         int(rows[version]["length"]))
        with self.db.transaction(write_lock=True) as tx:
            self._insert_delta(tx, model, version, d)
            self.tuf.add_targets(tx, [(d.target_path, d.length, d.sha256, custom)])
        return d.target_path

    def collect_garbage(self, min_age_s: float = ORPHAN_AGE_S) -> list[str]:
        """Delete blobs no version references (left by a publish that crashed after storing its file)
        once they are ``min_age_s`` old; younger ones may belong to a publish still in flight on
        another server process. Returns the deleted keys."""
        used = {row["blob_key"] for row in self.db.query("SELECT blob_key FROM versions")}
        used |= {row["blob_key"] for row in self.db.query("SELECT blob_key FROM deltas")}
        now = time.time()  # NOTE: wall time, not the injected clock: it is compared with file times
        orphans = [key for key, mtime in self.store.list("blobs") if key not in used and now - mtime >= min_age_s]
        for key in orphans:
            self.store.delete(key)
        return orphans

    def versions(self) -> list[dict[str, Any]]:
        return self.db.query("SELECT model, version, channel, sha256, length, published FROM versions "
                             "ORDER BY model, version")

    def version_by_path(self, path: str) -> dict[str, Any] | None:
        """The version row of a bundle path; for a delta path, the row of the version it leads to with
        the delta's ``target_path``, ``sha256``, ``length`` and ``blob_key``."""
        if deltas_mod.parse_delta_path(path) is not None:
            rows = self.db.query("SELECT v.model, v.version, v.channel, d.target_path, d.sha256, d.length, "
                                 "d.blob_key FROM deltas d JOIN versions v ON v.model = d.model AND "
                                 "v.version = d.version WHERE d.target_path = ?", (path,))
        else:
            rows = self.db.query("SELECT * FROM versions WHERE target_path = ?", (path,))
        return rows[0] if rows else None

    # -- groups and devices --------------------------------------------------------------------
    def set_group(self, name: str, channel: str) -> dict[str, Any]:
        check_name(name, "group")
        check_name(channel, "channel")
        self.db.execute("INSERT INTO groups (name, channel) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET channel = excluded.channel", (name, channel))
        return {"name": name, "channel": channel}

    def groups(self) -> list[dict[str, Any]]:
        return self.db.query("SELECT g.name, g.channel, COUNT(d.name) AS devices FROM groups g "
                             "LEFT JOIN devices d ON d.group_name = g.name GROUP BY g.name, g.channel ORDER BY g.name")

    def add_device(self, name: str, group: str) -> str:
        """Register a device and return its token (only its hash is stored)."""
        check_name(name, "device")
        check_name(group, "group")
        token = "ekd_" + secrets.token_urlsafe(32)
        with self.db.transaction(write_lock=True) as tx:
            if tx.query("SELECT 1 FROM devices WHERE name = ?", (name,)):
                raise FleetError(f"device '{name}' already exists", 409)
            tx.execute("INSERT INTO groups (name, channel) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       (group, "stable"))
            tx.execute("INSERT INTO devices (name, group_name, token_hash, created) VALUES (?, ?, ?, ?)",
                       (name, group, token_hash(token), self.clock()))
        return token

    def remove_device(self, name: str) -> None:
        """Revoke a device: its token stops working; its rollout history is kept, its adaptation
        reports are deleted (a device added later under the name is not adapted)."""
        check_name(name, "device")
        with self.db.transaction(write_lock=True) as tx:
            if not tx.execute("DELETE FROM devices WHERE name = ?", (name,)):
                raise FleetError(f"device '{name}' does not exist", 404)
            tx.execute("DELETE FROM device_adaptations WHERE device = ?", (name,))

    def devices(self) -> list[dict[str, Any]]:
        """Every device; ``adapted`` is the id of the newest on-device adaptation it reported for the
        version it runs (None when it runs the version as published)."""
        rows = self.db.query(
            "SELECT d.name, d.group_name, d.model, d.active_version, d.status, d.last_seen, d.last_error, "
            "d.latency_p50, d.latency_p95, (SELECT a.id FROM device_adaptations a WHERE a.device = d.name AND "
            "a.status = 'adapted' AND a.model = d.model AND a.version = d.active_version ORDER BY a.seq DESC "
            "LIMIT 1) AS adapted FROM devices d ORDER BY d.name")
        return [{"name": r["name"], "group": r["group_name"], "model": r["model"],
                 "active_version": r["active_version"], "status": r["status"], "last_seen": r["last_seen"],
                 "last_error": r["last_error"], "latency_ms": _latency(r["latency_p50"], r["latency_p95"]),
                 "adapted": r["adapted"]} for r in rows]

    def device(self, name: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT d.name, d.group_name, g.channel FROM devices d JOIN groups g "
                             "ON g.name = d.group_name WHERE d.name = ?", (name,))
        return rows[0] if rows else None

    def device_by_token_hash(self, digest: str) -> str | None:
        rows = self.db.query("SELECT name, token_hash FROM devices WHERE token_hash = ?", (digest,))
        if rows and hmac.compare_digest(rows[0]["token_hash"], digest):
            return rows[0]["name"]
        return None

