"""The server's TUF repository: root, targets, snapshot and timestamp, signed with Ed25519.

Signed metadata lives in the database (table ``tuf_metadata``), so that one transaction makes a
published version visible in the registry *and* in the metadata at once; a crash before the
commit leaves the previous metadata in force. Private keys live in the key folder (one PKCS#8
PEM per role, created at first start, mode 0600); the newest root is also written to
``KEYS/root.json``, the file a device is enrolled with.

    >>> import tempfile
    >>> from edgekiln.fleet.db import open_database
    >>> repo = TufRepository(open_database(":memory:"), tempfile.mkdtemp())
    >>> repo.initialize(); sorted(repo.versions())
    ['root', 'snapshot', 'targets', 'timestamp']
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_bytes

ROLES = ("root", "targets", "snapshot", "timestamp")
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


def _load_or_create_signer(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import CryptoSigner

    if path.is_file():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise EdgekilnError(f"{path}: not a PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise EdgekilnError(f"{path}: not an Ed25519 key")
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        atomic_write_bytes(path, pem)
        os.chmod(path, 0o600)
    return CryptoSigner(key)


class TufRepository:
    """Create, extend and serve the signed metadata; ``fault(step)`` lets tests crash between steps."""

    def __init__(self, db: Any, keys_dir: str | Path, *, expiry: TufExpiry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.keys_dir = Path(keys_dir)
        self.expiry = expiry or TufExpiry()
        self.clock = clock
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        self.signers = {role: _load_or_create_signer(self.keys_dir / f"{role}.pem") for role in ROLES}
        self._refresh_due = 0.0  # NOTE: clock time before which no role can be stale; saves parsing per poll

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
        """Create version 1 of every role when the database has none; check the keys otherwise."""
        from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

        with self.db.transaction(write_lock=True) as tx:
            root = self._latest(tx, "root")
            if root is None:
                root = Metadata(Root(expires=self._expires("root"), consistent_snapshot=False))
                for role in ROLES:
                    root.signed.add_key(self.signers[role].public_key, role)
                self._store(tx, root, "root")
                self._store(tx, Metadata(Targets(expires=self._expires("targets"))), "targets")
                self._store(tx, Metadata(Snapshot(expires=self._expires("snapshot"))), "snapshot")
                self._store(tx, Metadata(Timestamp(expires=self._expires("timestamp"))), "timestamp")
            else:
                for role in ROLES:
                    keyid = self.signers[role].public_key.keyid
                    if keyid not in root.signed.roles[role].keyids:
                        raise EdgekilnError(f"{self.keys_dir / (role + '.pem')}: key {keyid[:12]}... is not the "
                                            f"{role} key of the repository's root v{root.signed.version}; "
                                            "use the key folder this database was created with")
        self.refresh()
        self.write_root_file()

    def write_root_file(self) -> Path:
        data = self.get_file("root.json")
        assert data is not None
        return atomic_write_bytes(self.keys_dir / "root.json", data)

    def add_target(self, tx: Any, path: str, length: int, sha256: str, custom: dict[str, Any],
                   fault: Callable[[str], None] | None = None) -> int:
        """Inside the caller's transaction: a new targets version listing ``path``, then snapshot and
        timestamp; returns the new targets version."""
        from tuf.api.metadata import TargetFile

        fault = fault or (lambda step: None)
        targets = self._latest(tx, "targets")
        targets.signed.targets[path] = TargetFile(length, {"sha256": sha256}, path, unrecognized_fields={"custom": custom})
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
        return self.clock() >= self._refresh_due

    def refresh(self) -> bool:
        """Re-sign roles that passed half of their validity, so a quiet server never serves expired
        metadata; returns whether anything was re-signed."""
        if self.clock() < self._refresh_due:
            return False
        now = _dt.datetime.fromtimestamp(self.clock(), _dt.UTC)

        def stale(md: Any, role: str) -> bool:
            return md.signed.expires - now < _dt.timedelta(days=self.expiry.days(role) / 2)

        with self.db.transaction() as tx:
            current = {role: self._latest(tx, role) for role in ROLES}
        if not any(md is not None and stale(md, role) for role, md in current.items()):
            self._refresh_due = min((md.signed.expires.timestamp() - self.expiry.days(role) * 43200
                                     for role, md in current.items() if md is not None), default=0.0)
            return False
        with self.db.transaction(write_lock=True) as tx:
            current = {role: self._latest(tx, role) for role in ROLES}  # again, under the lock
            if not any(stale(md, role) for role, md in current.items()):
                return False
            root = current["root"]
            root_bumped = stale(root, "root")
            if root_bumped:
                root.signed.version += 1
                root.signed.expires = self._expires("root")
                self._store(tx, root, "root")
            targets = current["targets"]
            bump_targets = stale(targets, "targets")
            if bump_targets:
                targets.signed.version += 1
                targets.signed.expires = self._expires("targets")
                self._store(tx, targets, "targets")
            if bump_targets or stale(current["snapshot"], "snapshot"):
                self._bump_snapshot(tx, targets.signed.version)
            self._bump_timestamp(tx)
        if root_bumped:
            self.write_root_file()
        return True

