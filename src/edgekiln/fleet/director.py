"""Signed per-device instructions: the director repository (Uptane's layout).

The image repository (:mod:`~edgekiln.fleet.tuf_repo`) says *what a bundle is*; the director
says *what this device must run*. Each device has its own small TUF repository here: its
targets metadata lists 0 or 1 target at the fixed path ``assignment``, whose length and sha256
are the bundle's and whose ``custom`` names ``model``, ``version``, ``target_path``,
``rollout_id``, ``device`` and ``device_id`` (the first 32 hex digits of the SHA-256 of the
device token, so the device can check the binding without knowing its own name). The device
acts only on this signed assignment, and checks that the image repository agrees with it.

All devices share one director root (``KEYS/director-root.json``, signed offline by the root
key), which binds targets, snapshot and timestamp to the online key ``KEYS/director.pem``.
Metadata lives in the database table ``director_metadata`` (root rows under ``device = ''``;
the other roles keep their newest 2 versions). A poll re-signs only when the assignment changed
or a role passed half of its validity; a memory cache keeps the other polls read-only.

    >>> import tempfile
    >>> from edgekiln.fleet.server import FleetServer, ServerConfig
    >>> fleet = FleetServer(ServerConfig.local(tempfile.mkdtemp(), admin_token="doctest-admin-token-7f3k9q"))
    >>> token = fleet.registry.add_device("cam-1", "lab")
    >>> fleet.director.get_file("cam-1", "lab", "timestamp.json")[:1], fleet.director.get_file("cam-1", "lab", "x.json")
    (b'{', None)
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fleet.agent_metadata import ASSIGNMENT  # the one target path of a device's director targets

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
KEEP_VERSIONS = 2
_FILE = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,9})\.)?(?P<role>root|targets|snapshot|timestamp)\.json$")


class Director:
    """One TUF repository per device over the ``director_metadata`` table.

    ``assignment(device, group)`` is :meth:`Rollouts.assignment`; ``expiry`` a
    :class:`~edgekiln.fleet.tuf_repo.TufExpiry` (the same validity as the image repository).
    """

    def __init__(self, db: Any, keys_dir: str | Path, *, assignment: Callable[[str, str], dict[str, Any]],
                 expiry: Any, clock: Callable[[], float]) -> None:
        self.db, self.keys_dir, self.assignment = db, Path(keys_dir), assignment
        self.expiry, self.clock = expiry, clock
        self._cache: dict[str, tuple[str, float]] = {}   # device -> (wanted assignment as JSON, re-sign due)
        self.signer: Any = None
        self._keys_stamp: tuple[int, int] | None = None   # mtimes of KEYS and KEYS/roots at the last import
        self.import_roots()

    # -- root ----------------------------------------------------------------------------------
    def root_version(self, tx: Any = None) -> int:
        rows = (tx or self.db).query("SELECT MAX(version) AS v FROM director_metadata WHERE device = '' "
                                     "AND role = 'root'")
        return int(rows[0]["v"] or 0)

    def import_roots(self) -> int:
        """Store the director roots of the key folder above the database's version (each checked
        against the previous one and itself) and load the online key the newest root names.
        Returns the newest root version."""
        from edgekiln.fleet import keys

        self._keys_stamp = self._stamp()
        with self.db.transaction(write_lock=True) as tx:
            have = self.root_version(tx)
            trusted = None
            if have:
                trusted = bytes(tx.query("SELECT data FROM director_metadata WHERE device = '' AND role = 'root' "
                                         "AND version = ?", (have,))[0]["data"])
            pending = keys.pending_roots(self.keys_dir, "director", have)
            if not have and not pending and (self.keys_dir / "director-root.json").is_file():
                pending = [(self.keys_dir / "director-root.json").read_bytes()]   # a folder without roots/
            for md in keys.verify_roots(trusted, pending):
                tx.execute("INSERT INTO director_metadata (device, role, version, data) VALUES ('', 'root', ?, ?) "
                           "ON CONFLICT (device, role, version) DO NOTHING", (md.signed.version, md.to_bytes()))
            newest = pending[-1] if pending else trusted
            if newest is None:
                raise EdgekilnError(f"{self.keys_dir / 'director-root.json'}: no director root; run "
                                    "`edgekiln keys init KEYS --root-key FILE` first")
        from tuf.api.metadata import Metadata

        root = Metadata.from_bytes(newest).signed
        keyids = root.roles["timestamp"].keyids
        self.signer = keys.signer_for(self.keys_dir, "director", keyids, root.version)
        for role in ONLINE_ROLES:
            if self.signer.public_key.keyid not in root.roles[role].keyids:
                raise EdgekilnError(f"{self.keys_dir / 'director.pem'}: not the director's {role} key in "
                                    f"director root v{root.version}")
        self._cache.clear()
        return int(root.version)

    def _stamp(self) -> tuple[int, int]:
        roots = self.keys_dir / "roots"
        return self.keys_dir.stat().st_mtime_ns, roots.stat().st_mtime_ns if roots.is_dir() else 0

    # -- serving -------------------------------------------------------------------------------
    def get_file(self, device: str, group: str, filename: str) -> bytes | None:
        """The bytes of ``N.root.json``, ``timestamp.json``, ``[N.]snapshot.json`` or
        ``[N.]targets.json`` of ``device``'s repository, or None (the route answers 404)."""
        m = _FILE.match(filename)
        if not m:
            return None
        role, version = m["role"], m["version"]
        if self._stamp() != self._keys_stamp:
            self.import_roots()   # NOTE: `keys rotate director` renamed director.pem and wrote roots/N
        if role == "root":
            sql = ("SELECT data FROM director_metadata WHERE device = '' AND role = 'root' "
                   + ("AND version = ?" if version else "ORDER BY version DESC LIMIT 1"))
            rows = self.db.query(sql, (int(version),) if version else ())
            return bytes(rows[0]["data"]) if rows else None
        if role == "timestamp":
            if version:
                return None
            self.ensure(device, group)   # NOTE: clients read timestamp first; it pins snapshot and targets
        sql = ("SELECT data FROM director_metadata WHERE device = ? AND role = ? "
               + ("AND version = ?" if version else "ORDER BY version DESC LIMIT 1"))
        rows = self.db.query(sql, (device, role, int(version)) if version else (device, role))
        return bytes(rows[0]["data"]) if rows else None

    def wanted(self, device: str, group: str) -> dict[str, Any] | None:
        """What ``device``'s targets must say now: the ``assignment`` target's fields, or None."""
        a = self.assignment(device, group)
        if not a:
            return None
        rows = self.db.query("SELECT v.sha256, v.length, d.token_hash FROM versions v, devices d "
                             "WHERE v.model = ? AND v.version = ? AND d.name = ?", (a["model"], a["version"], device))
        if not rows:
            return None
        return {"length": int(rows[0]["length"]), "sha256": rows[0]["sha256"],
                "custom": {"model": a["model"], "version": int(a["version"]), "target_path": a["target_path"],
                           "rollout_id": a.get("rollout_id"), "device": device,
                           "device_id": rows[0]["token_hash"][:32]}}

    def ensure(self, device: str, group: str) -> bool:
        """Sign a new targets, snapshot and timestamp for ``device`` if its assignment changed or a
        role passed half of its validity; returns whether it signed."""
        want = self.wanted(device, group)
        key = json.dumps(want, sort_keys=True)
        hit = self._cache.get(device)
        if hit is not None and hit[0] == key and self.clock() < hit[1]:
            return False
        with self.db.transaction(write_lock=True) as tx:
            current = {role: self._latest(tx, device, role) for role in ONLINE_ROLES}
            # NOTE: checked again under the lock: another server process may have signed it already.
            signed = (all(current.values()) and _target_json(current["targets"]) == key
                      and all(self.signer.public_key.keyid in md.signatures for md in current.values()))
            due = self._due(current) if signed else 0.0
            if signed and self.clock() < due:
                self._cache[device] = (key, due)
                return False
            self._sign(tx, device, want, current)
            due = self._due({role: self._latest(tx, device, role) for role in ONLINE_ROLES})
        self._cache[device] = (key, due)
        return True

    def forget(self, device: str) -> None:
        """Delete a removed device's metadata."""
        self.db.execute("DELETE FROM director_metadata WHERE device = ?", (device,))
        self._cache.pop(device, None)

    # -- signing -------------------------------------------------------------------------------
    def _latest(self, tx: Any, device: str, role: str) -> Any:
        from tuf.api.metadata import Metadata

        rows = tx.query("SELECT data FROM director_metadata WHERE device = ? AND role = ? ORDER BY version DESC "
                        "LIMIT 1", (device, role))
        return Metadata.from_bytes(bytes(rows[0]["data"])) if rows else None

    def _expires(self, role: str) -> _dt.datetime:
        now = _dt.datetime.fromtimestamp(self.clock(), _dt.UTC).replace(microsecond=0)
        return now + _dt.timedelta(days=self.expiry.days(role))

    def _due(self, current: dict[str, Any]) -> float:
        """The clock time at which the first role passes half of its validity."""
        return min(md.signed.expires.timestamp() - self.expiry.days(role) * 43200 for role, md in current.items())

    def _sign(self, tx: Any, device: str, want: dict[str, Any] | None, current: dict[str, Any]) -> None:
        from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

        def version(role: str) -> int:
            return current[role].signed.version + 1 if current[role] is not None else 1

        targets = Targets(version=version("targets"), expires=self._expires("targets"))
        if want is not None:
            targets.targets[ASSIGNMENT] = TargetFile(want["length"], {"sha256": want["sha256"]}, ASSIGNMENT,
                                                     unrecognized_fields={"custom": want["custom"]})
        snapshot = Snapshot(version=version("snapshot"), expires=self._expires("snapshot"),
                            meta={"targets.json": MetaFile(targets.version)})
        timestamp = Timestamp(version=version("timestamp"), expires=self._expires("timestamp"),
                              snapshot_meta=MetaFile(snapshot.version))
        for role, signed in (("targets", targets), ("snapshot", snapshot), ("timestamp", timestamp)):
            md = Metadata(signed)
            md.sign(self.signer)
            tx.execute("INSERT INTO director_metadata (device, role, version, data) VALUES (?, ?, ?, ?)",
                       (device, role, signed.version, md.to_bytes()))
            tx.execute("DELETE FROM director_metadata WHERE device = ? AND role = ? AND version <= ?",
                       (device, role, signed.version - KEEP_VERSIONS))


def _target_json(targets_md: Any) -> str:
    """The stored targets' ``assignment`` in the form :meth:`Director.wanted` gives, as JSON."""
    info = targets_md.signed.targets.get(ASSIGNMENT)
    if info is None:
        return json.dumps(None)
    return json.dumps({"length": info.length, "sha256": info.hashes.get("sha256"),
                       "custom": info.unrecognized_fields.get("custom")}, sort_keys=True)


def make_director(fleet: Any) -> Director:
    """The director of a :class:`~edgekiln.fleet.server.FleetServer`."""
    return Director(fleet.db, fleet.config.keys_dir, assignment=fleet.rollouts.assignment,
                    expiry=fleet.config.expiry, clock=fleet.clock)
