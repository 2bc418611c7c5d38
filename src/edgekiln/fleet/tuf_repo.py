"""The server's TUF repository: root, targets, snapshot and timestamp, signed with Ed25519.

Signed metadata lives in the database (table ``tuf_metadata``), so that one transaction makes a
published version visible in the registry *and* in the metadata at once; a crash before the
commit leaves the previous metadata in force. Keys live in the key folder (see
:mod:`edgekiln.fleet.keys`): the online targets, snapshot and timestamp keys, and every root
version as a file signed offline, which the server checks and imports at start and whenever
the folder changes (a rotation), re-signing the roles the new root hands to new keys. Only in
dev mode (``KEYS/root.pem``, made by ``dev_init`` for an empty folder) does the server sign a
new root itself when the old one nears its expiry. The newest root is also written to
``KEYS/root.json``, the file a device is enrolled with.

    >>> import tempfile
    >>> from edgekiln.fleet.db import open_database
    >>> repo = TufRepository(open_database(":memory:"), tempfile.mkdtemp())
    >>> repo.initialize(); sorted(repo.versions())
    ['root', 'snapshot', 'targets', 'timestamp']
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
_FILE = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,9})\.)?(?P<role>root|targets|snapshot|timestamp)\.json$")


@dataclass(frozen=True, kw_only=True)
class TufExpiry:
    """How long each role's metadata stays valid, in days (a device refuses expired metadata)."""

    timestamp_days: float = 1.0
    snapshot_days: float = 7.0
    targets_days: float = 30.0
    root_days: float = 365.0

    def days(self, role: str) -> float:
        return float(getattr(self, f"{role}_days"))


class TufRepository:
    """Create, extend and serve the signed metadata; ``fault(step)`` lets tests crash between steps."""

    def __init__(self, db: Any, keys_dir: str | Path, *, expiry: TufExpiry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.keys_dir = Path(keys_dir)
        self.expiry = expiry or TufExpiry()
        self.clock = clock
        from edgekiln.fleet import keys

        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        if not keys.is_initialized(self.keys_dir) or keys.is_dev(self.keys_dir):
            keys.dev_init(self.keys_dir, self.expiry, now=self.clock())
        self.root_signer = keys.load_online_signer(self.keys_dir / "root.pem") if keys.is_dev(self.keys_dir) else None
        self.signers: dict[str, Any] = {}
        self._refresh_due = 0.0  # NOTE: clock time before which no role can be stale; saves parsing per poll
        self._keys_stamp: tuple[int, int] | None = None  # NOTE: mtimes of KEYS and KEYS/roots at the last import

    # -- reading -------------------------------------------------------------------------------
    def versions(self, tx: Any = None) -> dict[str, int]:
        rows = (tx or self.db).query("SELECT role, MAX(version) AS v FROM tuf_metadata GROUP BY role")
        return {r["role"]: int(r["v"]) for r in rows}

    def get_file(self, filename: str) -> bytes | None:
        """The bytes of ``timestamp.json``, ``N.root.json``, ``N.targets.json``, ... or None."""
        m = _FILE.match(filename)
        if not m:
            return None
        role, version = m["role"], m["version"]
        if version is None:
            if role == "root":  # NOTE: TUF clients ask for N.root.json; plain root.json is the newest
                rows = self.db.query("SELECT data FROM tuf_metadata WHERE role = ? ORDER BY version DESC LIMIT 1",
                                     (role,))
            else:
                self.refresh()
                rows = self.db.query("SELECT data FROM tuf_metadata WHERE role = ? ORDER BY version DESC LIMIT 1",
                                     (role,))
        elif role == "timestamp":
            return None  # timestamp is never fetched by version
        else:
            rows = self.db.query("SELECT data FROM tuf_metadata WHERE role = ? AND version = ?", (role, int(version)))
        return bytes(rows[0]["data"]) if rows else None

    def _latest(self, tx: Any, role: str) -> Any:
        from tuf.api.metadata import Metadata

        rows = tx.query("SELECT data FROM tuf_metadata WHERE role = ? ORDER BY version DESC LIMIT 1", (role,))
        return Metadata.from_bytes(bytes(rows[0]["data"])) if rows else None

    def target_paths(self) -> set[str]:
        with self.db.transaction() as tx:
            md = self._latest(tx, "targets")
        return set(md.signed.targets) if md is not None else set()

    # -- writing -------------------------------------------------------------------------------
    def _expires(self, role: str) -> _dt.datetime:
        now = _dt.datetime.fromtimestamp(self.clock(), _dt.UTC).replace(microsecond=0)
        return now + _dt.timedelta(days=self.expiry.days(role))

    def _store(self, tx: Any, md: Any, role: str) -> None:
        md.signatures.clear()
        md.sign(self.signers[role])
        tx.execute("INSERT INTO tuf_metadata (role, version, data) VALUES (?, ?, ?)",
                   (role, md.signed.version, md.to_bytes()))

    def initialize(self) -> None:
        """Import the roots from the key folder, then create version 1 of the other roles when the
        database has none; refuses keys that are not the ones the newest root names."""
        from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

        from edgekiln.fleet import keys

        self.import_roots(force=True)
        with self.db.transaction(write_lock=True) as tx:
            root = self._latest(tx, "root")
            if root is None:
                raise EdgekilnError(f"{self.keys_dir}: no roots/1.root.json; {keys.INIT_HINT}")
            if self._latest(tx, "targets") is None:
                self._store(tx, Metadata(Targets(expires=self._expires("targets"))), "targets")
                self._store(tx, Metadata(Snapshot(expires=self._expires("snapshot"))), "snapshot")
                self._store(tx, Metadata(Timestamp(expires=self._expires("timestamp"))), "timestamp")
        self.refresh()
        self.write_root_file()

    def _keys_changed(self) -> bool:
        return self._stamp() != self._keys_stamp

    def _stamp(self) -> tuple[int, int]:
        roots = self.keys_dir / "roots"
        return (self.keys_dir.stat().st_mtime_ns, roots.stat().st_mtime_ns if roots.is_dir() else 0)

    def _load_signers(self, root: Any) -> dict[str, Any]:
        from edgekiln.fleet import keys

        version = root.signed.version
        if self.root_signer is not None and self.root_signer.public_key.keyid not in root.signed.roles["root"].keyids:
            raise EdgekilnError(f"{self.keys_dir / 'root.pem'}: key {self.root_signer.public_key.keyid[:12]}... is "
                                f"not the root key of the repository's root v{version}; use the key folder this "
                                "database was created with")
        return {role: keys.signer_for(self.keys_dir, role, root.signed.roles[role].keyids, version)
                for role in ONLINE_ROLES}

    def import_roots(self, *, force: bool = False) -> bool:
        """Import ``KEYS/roots/N.root.json`` above the database's root, each checked against the one
        before it; then re-sign every role the new root no longer accepts. Returns whether any came in."""
        from edgekiln.fleet import keys

        stamp = self._stamp()
        if not force and stamp == self._keys_stamp:
            return False
        self._keys_stamp = stamp
        with self.db.transaction() as tx:
            current = self._latest(tx, "root")
        pending = keys.pending_roots(self.keys_dir, "image", current.signed.version if current is not None else 0)
        if current is None and not pending and (self.keys_dir / "root.json").is_file():
            pending = [(self.keys_dir / "root.json").read_bytes()]   # a key folder from before roots/
        if not pending:
            if current is not None and (force or not self.signers):
                self.signers = self._load_signers(current)
            return False
        chain = keys.verify_roots(current.to_bytes() if current is not None else None, pending)
        self.signers = self._load_signers(chain[-1])
        with self.db.transaction(write_lock=True) as tx:
            for md, data in zip(chain, pending, strict=True):
                # NOTE: several server processes may import the same root; the first one wins
                tx.execute("INSERT INTO tuf_metadata (role, version, data) VALUES (?, ?, ?) "
                           "ON CONFLICT (role, version) DO NOTHING", ("root", md.signed.version, data))
            self._resign_for(tx, chain[-1])
        log.info("imported root v%d from %s", chain[-1].signed.version, self.keys_dir / "roots")
        self._refresh_due = 0.0
        self.write_root_file()
        return True

    def _resign_for(self, tx: Any, root: Any) -> None:
        """Inside the caller's transaction: a new version of each role ``root`` does not accept, and of
        the roles that list it (snapshot lists targets, timestamp lists snapshot)."""
        from tuf.api.exceptions import UnsignedMetadataError

        latest = {role: self._latest(tx, role) for role in ONLINE_ROLES}
        if latest["targets"] is None:
            return  # initialize() creates them, signed with the new keys

        def accepted(role: str) -> bool:
            try:
                root.verify_delegate(role, latest[role])
            except UnsignedMetadataError:
                return False
            return True

        refused = {role for role in ONLINE_ROLES if not accepted(role)}
        targets = latest["targets"]
        if "targets" in refused:
            targets.signed.version += 1
            targets.signed.expires = self._expires("targets")
            self._store(tx, targets, "targets")
        if refused & {"targets", "snapshot"}:
            self._bump_snapshot(tx, targets.signed.version)
        if refused:
            self._bump_timestamp(tx)

    def write_root_file(self) -> Path:
        data = self.get_file("root.json")
        assert data is not None
        return atomic_write_bytes(self.keys_dir / "root.json", data)

    def add_target(self, tx: Any, path: str, length: int, sha256: str, custom: dict[str, Any],
                   fault: Callable[[str], None] | None = None) -> int:
        """Inside the caller's transaction: a new targets version listing ``path``, then snapshot and
        timestamp; returns the new targets version."""
        return self.add_targets(tx, [(path, length, sha256, custom)], fault)

    def add_targets(self, tx: Any, entries: list[tuple[str, int, str, dict[str, Any]]],
                    fault: Callable[[str], None] | None = None) -> int:
        """Inside the caller's transaction: one new targets version listing every ``(path, length,
        sha256, custom)`` of ``entries`` (a bundle and its deltas, in one signing pass), then snapshot
        and timestamp; returns the new targets version."""
        from tuf.api.metadata import TargetFile

        fault = fault or (lambda step: None)
        targets = self._latest(tx, "targets")
        for path, length, sha256, custom in entries:
            targets.signed.targets[path] = TargetFile(length, {"sha256": sha256}, path,
                                                      unrecognized_fields={"custom": custom})
        targets.signed.version += 1
        targets.signed.expires = self._expires("targets")
        self._store(tx, targets, "targets")
        fault("signed-targets")
        self._bump_snapshot(tx, targets.signed.version)
        fault("signed-snapshot")
        self._bump_timestamp(tx)
        fault("signed-timestamp")
        return targets.signed.version

    def _bump_snapshot(self, tx: Any, targets_version: int) -> None:
        from tuf.api.metadata import MetaFile

        snap = self._latest(tx, "snapshot")
        snap.signed.meta["targets.json"] = MetaFile(targets_version)
        snap.signed.version += 1
        snap.signed.expires = self._expires("snapshot")
        self._store(tx, snap, "snapshot")

    def _bump_timestamp(self, tx: Any) -> None:
        from tuf.api.metadata import MetaFile

        snap_version = self._latest(tx, "snapshot").signed.version
        ts = self._latest(tx, "timestamp")
        ts.signed.snapshot_meta = MetaFile(snap_version)
        ts.signed.version += 1
        ts.signed.expires = self._expires("timestamp")
        self._store(tx, ts, "timestamp")

    def refresh_due(self) -> bool:
        return self.clock() >= self._refresh_due or self._keys_changed()

    def refresh(self) -> bool:
        """Import new roots (a key rotation), and re-sign roles that passed half of their validity, so
        a quiet server never serves expired metadata; returns whether anything was re-signed."""
        try:
            imported = self.import_roots()
        except EdgekilnError as exc:  # NOTE: a bad root file must not take the running server down
            log.error("%s", exc)
            imported = False
        if self.clock() < self._refresh_due:
            return imported
        now = _dt.datetime.fromtimestamp(self.clock(), _dt.UTC)

        def stale(md: Any, role: str) -> bool:
            return md.signed.expires - now < _dt.timedelta(days=self.expiry.days(role) / 2)

        from edgekiln.fleet import keys

        # dev mode: the root key is online, so the roots are renewed here
        if self.root_signer is not None and keys.renew_stale_roots(self.keys_dir, self.root_signer,
                                                                   expiry=self.expiry, now=self.clock()):
            imported = self.import_roots(force=True) or imported
        with self.db.transaction() as tx:
            current = {role: self._latest(tx, role) for role in ROLES}
        if self.root_signer is None:
            # NOTE: without the root key, an old root is the operator's to renew: say so, twice a day at most
            root = current.pop("root")
            if root is not None and root.signed.expires - now < _dt.timedelta(days=keys.ROOT_WARN_DAYS):
                log.warning("root v%d expires %s: run `edgekiln keys renew-root --keys %s --root-key FILE`",
                            root.signed.version, root.signed.expires, self.keys_dir)
        if not any(md is not None and stale(md, role) for role, md in current.items()):
            self._refresh_due = min((md.signed.expires.timestamp() - self.expiry.days(role) * 43200
                                     for role, md in current.items() if md is not None), default=0.0)
            return imported
        with self.db.transaction(write_lock=True) as tx:
            current = {role: self._latest(tx, role) for role in ONLINE_ROLES}  # again, under the lock
            if not any(stale(md, role) for role, md in current.items()):
                return imported
            targets = current["targets"]
            bump_targets = stale(targets, "targets")
            if bump_targets:
                targets.signed.version += 1
                targets.signed.expires = self._expires("targets")
                self._store(tx, targets, "targets")
            if bump_targets or stale(current["snapshot"], "snapshot"):
                self._bump_snapshot(tx, targets.signed.version)
            self._bump_timestamp(tx)
        return True

