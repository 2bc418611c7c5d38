"""The device's A/B slot layout: two unpacked bundles, one of them active, switched atomically.

```
STATE/state.json       what the agent knows (active version, pending update, outbox of reports)
STATE/slots/a|b/       an unpacked bundle each
STATE/slots/a|b.json   the slot's seal: written (atomically) only after every file of the slot
                       was written and fsynced; a slot folder without its seal is half-written.
                       A slot adapted on the device (``edgekiln learn``) has ``adaptation`` in it
STATE/active           symlink -> slots/a or slots/b, switched by rename() of a new symlink
STATE/download/        partial and verified downloads
STATE/tuf/             trusted TUF metadata
STATE/.reserve         256 KiB held back (posix_fallocate) so state.json can be written on a full disk
```

The commit point of an install is the ``rename()`` of the new ``active`` symlink: before it the
old slot is active, after it the new one, never anything in between. Every other step is
repeatable, so :meth:`SlotStore.recover` only has to throw away what a crash left half done and
make ``state.json`` agree with the symlink (the symlink is the truth).

A full disk is :class:`NoSpace`, never a crash: :meth:`SlotStore.check_space` refuses an update
before downloading it; a download or unpack that hits ENOSPC anyway deletes what it wrote; and
``write_state`` gives up ``STATE/.reserve`` to record the failure, re-creating it later.

Imports only the standard library and ``edgekiln.runtime`` (numpy + onnxruntime): this runs on
the device.

>>> store = SlotStore("/var/lib/edgekiln")                         # doctest: +SKIP
>>> store.recover(); store.active()                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_json, fsync_dir
from edgekiln.fleet.bundle_tar import MAX_BUNDLE_FILES, check_members

SLOT_NAMES = ("a", "b")
ACTIVE_LINK = "active"
TEMP_LINK_PREFIX = ".active.new."
STATE_FILE = "state.json"
HISTORY_KEEP = 50
RESERVE_FILE = ".reserve"
RESERVE_BYTES = 256 << 10
SPACE_MARGIN = 1 << 20          # state.json, TUF metadata, file-system block rounding
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

Checkpoint = Callable[[str], None]


def _no_checkpoint(_name: str) -> None:
    return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class NoSpace(EdgekilnError):
    """The device's disk is too full for an update. ``needed`` and ``free`` are bytes; ``free`` is
    measured on the state folder's file system when the error is made. Not the bundle's fault:
    the agent retries it later and does not reject the version."""

    def __init__(self, where: str | Path, *, needed: int, free: int | None = None, note: str = "") -> None:
        self.needed = int(needed)
        self.free = free_bytes(where) if free is None else int(free)
        super().__init__(f"no space left on the device (need {self.needed} bytes, {self.free} free)"
                         + (f": {note}" if note else ""))


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged process may still write on ``path``'s file system (0 if unknown)."""
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return 0


@dataclass(frozen=True)
class SlotInfo:
    """A sealed slot: what was installed into it."""

    name: str
    path: Path
    model: str
    version: int
    target_path: str
    sha256: str
    adaptation: dict[str, Any] | None = None   # set when learned on the device (``fleet.adapt``)


def empty_state() -> dict[str, Any]:
    return {"active_version": None, "active_slot": None, "model": None, "pending": None, "last_error": None,
            "history": [], "outbox": [], "rejected": {}, "last_check": None}


class SlotStore:
    """The state folder of one device. ``checkpoint(name)`` is called between durable steps (the
    kill -9 tests hook a crash there; see ``edgekiln.fleet.agent_crash``)."""

    def __init__(self, root: str | Path, *, checkpoint: Checkpoint | None = None) -> None:
        self.root = Path(root)
        self.slots_dir = self.root / "slots"
        self.download_dir = self.root / "download"
        self.tuf_dir = self.root / "tuf"
        self.checkpoint = checkpoint or _no_checkpoint

    # --- layout -------------------------------------------------------------------------------
    def ensure_layout(self) -> None:
        for d in (self.root, self.slots_dir, self.download_dir, self.tuf_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._ensure_reserve()

    # --- free space ---------------------------------------------------------------------------
    def space_needed(self, target_path: str, length: int, custom: Mapping[str, Any] | None = None) -> int:
        """Bytes the update to ``target_path`` (signed ``length``; ``custom["unpacked_bytes"]``,
        else the length) still needs at its peak, plus :data:`SPACE_MARGIN`.

        Downloading grows the ``.part`` to ``length``, then python-tuf copies it to the final
        ``.tar``; unpacking frees the ``.part`` and the inactive slot and writes the bundle out.
        Bytes already on disk (a resumed ``.part``, a complete ``.tar``) are not needed again.
        """
        quoted = quote(target_path, safe="")
        have = min(_size(self.download_dir / (quoted + ".part")), length)
        final = _size(self.download_dir / (quoted + ".tar"))
        raw = (custom or {}).get("unpacked_bytes")
        unpacked = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else length
        inactive = _tree_bytes(self.slot_path(self.inactive_name()))
        if final == length:     # verified earlier: only the unpack is left, and the .part goes
            return max(0, unpacked - inactive - have) + SPACE_MARGIN
        download = (length - have) + (length - min(final, length))
        after_unpack = download - length + unpacked - inactive
        return max(download, after_unpack) + SPACE_MARGIN

    def check_space(self, needed: int) -> None:
        """Raise :class:`NoSpace` unless ``needed`` bytes are free on the state folder's file system."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = free_bytes(self.root)
        if free < needed:
            raise NoSpace(self.root, needed=needed, free=free, note="the update was not downloaded")

    def _ensure_reserve(self) -> bool:
        """Hold :data:`RESERVE_BYTES` in ``STATE/.reserve``; False when the disk has no room for it."""
        path = self.root / RESERVE_FILE
        try:
            if path.stat().st_size >= RESERVE_BYTES:
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            path.unlink(missing_ok=True)   # a partial reserve would only hide free space
            return False
        return True

    def slot_path(self, name: str) -> Path:
        if name not in SLOT_NAMES:
            raise EdgekilnError(f"slot '{name}' is not one of {SLOT_NAMES}")
        return self.slots_dir / name

    def seal_path(self, name: str) -> Path:
        return self.slots_dir / f"{name}.json"

    def active_name(self) -> str | None:
        """The slot the ``active`` symlink names, or None (fresh device)."""
        link = self.root / ACTIVE_LINK
        if not link.is_symlink():
            return None
        target = PurePosixPath(os.readlink(link))
        if len(target.parts) == 2 and target.parts[0] == "slots" and target.parts[1] in SLOT_NAMES:
            return target.parts[1]
        return None

    def sealed(self, name: str) -> SlotInfo | None:
        """The slot's seal, or None when the slot is missing or half-written."""
        seal, path = self.seal_path(name), self.slot_path(name)
        if not seal.is_file() or not path.is_dir():
            return None
        try:
            data = json.loads(seal.read_text())
            adaptation = data.get("adaptation")
            return SlotInfo(name=name, path=path, model=str(data["model"]), version=int(data["version"]),
                            target_path=str(data["target_path"]), sha256=str(data["sha256"]),
                            adaptation=adaptation if isinstance(adaptation, dict) else None)
        except (ValueError, KeyError, TypeError):
            return None

    def active(self) -> SlotInfo | None:
        name = self.active_name()
        return self.sealed(name) if name else None

    def inactive_name(self) -> str:
        return "b" if self.active_name() == "a" else "a"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``STATE/.lock`` (flock) for one cycle: two agents on one state folder would corrupt it.
        The kernel drops the lock when the process dies, so a kill -9 never leaves it stuck."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EdgekilnError(f"{self.root}: another agent is running on this state folder") from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # --- state.json ---------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        state = empty_state()
        if path.is_file():
            try:
                loaded = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                # NOTE: cannot happen with atomic writes; if the disk corrupted it, the symlink and
                # the seals still say what is installed, so start from them rather than refuse to run.
                loaded = {}
            if isinstance(loaded, dict):
                state.update(loaded)
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        """Write ``state.json`` atomically. On a full disk the reserve is given up for it (so a
        failure can always be recorded) and taken back by a later write once there is room."""
        state["history"] = list(state.get("history") or [])[-HISTORY_KEEP:]
        path = self.root / STATE_FILE
        try:
            atomic_write_json(path, state)
        except OSError as exc:
            reserve = self.root / RESERVE_FILE
            if exc.errno not in NO_SPACE_ERRNOS or not reserve.exists():
                raise
            reserve.unlink()
            try:
                atomic_write_json(path, state)
            except OSError as again:
                if again.errno not in NO_SPACE_ERRNOS:
                    raise
                raise NoSpace(self.root, needed=RESERVE_BYTES, note="state.json could not be written") from None
        fsync_dir(self.root)
        self._ensure_reserve()

    # --- recovery -----------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Repair whatever the last crash left; return one line per repair (empty when clean).

        - a stale temporary symlink from an interrupted switch is removed;
        - an inactive slot without a seal (interrupted unpack) is deleted;
        - ``state.json`` is made to agree with the ``active`` symlink; an update (or an on-device
          adaptation) that reached the switch before the crash is recorded and its report is queued;
        - downloads other than the pending update's are deleted.
        """
        self.ensure_layout()
        notes: list[str] = []
        for tmp in self.root.glob(TEMP_LINK_PREFIX + "*"):
            tmp.unlink(missing_ok=True)
            notes.append(f"removed stale temporary symlink {tmp.name}")
        # temporary files of interrupted atomic writes (ours, and python-tuf's NamedTemporaryFile)
        leftovers = [*self.slots_dir.glob(".*"), *self.root.glob(f".{STATE_FILE}.*.tmp"), *self.tuf_dir.glob("tmp*")]
        for tmp in leftovers:
            _remove(tmp)
            notes.append(f"removed leftover {tmp.name}")
        active = self.active_name()
        if active and self.sealed(active) is None:
            # NOTE: the switch happens only after the seal, so this is disk damage, not a crash. The
            # other slot (the previous good model) is the best there is.
            other = "b" if active == "a" else "a"
            if self.sealed(other):
                self._point_active_at(other)
                notes.append(f"active slot {active} had no seal; switched back to slot {other}")
            else:
                (self.root / ACTIVE_LINK).unlink()
                notes.append(f"active slot {active} had no seal and no other slot is sealed; nothing is active")
            active = self.active_name()
        for name in SLOT_NAMES:
            if name != active and self.slot_path(name).exists() and self.sealed(name) is None:
                self.clear_slot(name)
                notes.append(f"removed half-written slot {name}")
        notes += self._reconcile_state()
        notes += self._clean_downloads()
        return notes

    def _clean_downloads(self) -> list[str]:
        """Keep only the pending update's download (it resumes); anything else is left over."""
        pending = self.read_state().get("pending") or {}
        keep = set()
        if pending.get("target_path"):
            quoted = quote(str(pending["target_path"]), safe="")
            keep = {quoted + ".part", quoted + ".tar"}
        notes = []
        for path in self.download_dir.iterdir():
            if path.name not in keep:
                _remove(path)
                notes.append(f"removed leftover download {path.name}")
        return notes

    def _reconcile_state(self) -> list[str]:
        state = self.read_state()
        info = self.active()
        notes: list[str] = []
        have = (info.model, info.version, info.name) if info else (None, None, None)
        adapted = info.adaptation if info else None
        if (state.get("model"), state.get("active_version"), state.get("active_slot")) == have \
                and adaptation_id(state.get("adaptation")) == adaptation_id(adapted):
            return notes
        pending = state.get("pending") or {}
        entry: dict[str, Any] = {}
        if info and pending.get("model") == info.model and pending.get("version") == info.version:
            # Crashed after the switch, before state.json and the report were written.
            state["pending"] = None
            state["last_error"] = None
            entry = {"model": info.model, "version": info.version, "status": "installed"}
            notes.append(f"update to {info.model} v{info.version} had been switched before the crash: completed")
        elif info and adapted and adaptation_id(adapted) != adaptation_id(state.get("adaptation")):
            # NOTE: an adaptation (fleet.adapt) killed after its switch, before state.json: the seal
            # holds its record, so the report the device owes the server is rebuilt from it.
            from edgekiln.fleet.adapt import report_record

            entry = {"model": info.model, "version": info.version, "status": "adapted",
                     "adaptation": report_record(adapted)}
            state["last_adaptation"] = {"id": adaptation_id(adapted), "status": "adapted"}
            notes.append(f"adaptation {adaptation_id(adapted)} had been switched before the crash: completed")
        else:
            notes.append("state.json did not match the active slot: corrected")
        if entry:
            extra = {"superseded_adaptation": adaptation_id(state["adaptation"])} \
                if state.get("adaptation") and not adapted else {}
            history = {k: v for k, v in entry.items() if k != "adaptation"}
            state["history"] = [*state.get("history", []),
                                {**history, "time": now_iso(), "note": "after restart", **extra}]
            state["outbox"] = [*state.get("outbox", []), dict(entry)]
        state.update(model=have[0], active_version=have[1], active_slot=have[2], adaptation=adapted)
        self.write_state(state)
        return notes

    # --- install steps ------------------------------------------------------------------------
    def clear_slot(self, name: str) -> None:
        """Unseal first, then delete: a crash in between leaves an unsealed slot, which recovery removes."""
        if name == self.active_name():
            raise EdgekilnError(f"refusing to clear slot {name}: it is the active slot")
        seal = self.seal_path(name)
        if seal.exists():
            seal.unlink()
            fsync_dir(self.slots_dir)
        path = self.slot_path(name)
        if path.exists() or path.is_symlink():
            _remove(path)
            fsync_dir(self.slots_dir)

    def unpack(self, tar_path: str | Path, name: str, *, max_bytes: int = 2 << 30) -> Path:
        """Unpack a bundle ``.tar`` into slot ``name`` (cleared first), fsyncing every file and folder.

        Every member is checked before anything is written (:func:`~edgekiln.fleet.bundle_tar.check_members`):
        only regular files and folders with plain relative paths; absolute paths, ``..``, links,
        device files and sparse files are refused. A full disk clears the slot and raises :class:`NoSpace`.
        """
        self.clear_slot(name)
        dest = self.slot_path(name)
        try:
            tar = tarfile.open(tar_path, mode="r:")  # noqa: SIM115 - closed by the `with` below
        except (tarfile.TarError, OSError) as exc:
            raise EdgekilnError(f"{tar_path}: not a readable .tar ({exc})") from None
        members: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        with tar:
            try:
                members = check_members(tar, max_bytes=max_bytes, max_files=MAX_BUNDLE_FILES)
                dest.mkdir(parents=True)
                fsync_dir(self.slots_dir)
                self.checkpoint("slot-created")
                self._extract(tar, dest, members)
                fsync_dir(self.slots_dir)
            except tarfile.TarError as exc:
                raise EdgekilnError(f"{tar_path}: damaged .tar ({exc})") from None
            except OSError as exc:
                if exc.errno not in NO_SPACE_ERRNOS:
                    raise
                self.clear_slot(name)
                needed = sum(m.size for m, _ in members if m.isfile())
                raise NoSpace(self.root, needed=needed, note=f"while unpacking into slot {name}; the slot was "
                              "cleared") from None
        self.checkpoint("slot-fsynced")
        return dest

    def _extract(self, tar: tarfile.TarFile, dest: Path,
                 members: list[tuple[tarfile.TarInfo, PurePosixPath]]) -> None:
        dirs = {dest}
        for member, rel in members:
            target = dest.joinpath(*rel.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                dirs.add(target)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(target.parent)
            src = tar.extractfile(member)
            if src is None:
                raise EdgekilnError(f"bundle member {member.name} cannot be read")
            with src, open(target, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                self.checkpoint(f"written:{rel}")
                os.fsync(out.fileno())
            self.checkpoint(f"fsynced:{rel}")
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)

    def seal(self, name: str, *, model: str, version: int, target_path: str, sha256: str,
             adaptation: dict[str, Any] | None = None) -> SlotInfo:
        """Mark slot ``name`` as completely written (not yet as healthy: the switch says that).
        ``adaptation`` is the record of a slot learned on the device (``edgekiln.fleet.adapt``)."""
        atomic_write_json(self.seal_path(name), {"model": model, "version": version, "target_path": target_path,
                                                 "sha256": sha256, "sealed": now_iso(),
                                                 **({"adaptation": adaptation} if adaptation else {})})
        fsync_dir(self.slots_dir)
        self.checkpoint("slot-sealed")
        info = self.sealed(name)
        assert info is not None
        return info

    def switch(self, name: str) -> None:
        """Make slot ``name`` active: a new symlink beside ``active`` is renamed over it (atomic)."""
        if self.sealed(name) is None:
            raise EdgekilnError(f"refusing to activate slot {name}: it is not sealed (half-written)")
        self._point_active_at(name)

    def _point_active_at(self, name: str) -> None:
        tmp = self.root / f"{TEMP_LINK_PREFIX}{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(f"slots/{name}", tmp)
        self.checkpoint("temp-symlink-created")
        os.replace(tmp, self.root / ACTIVE_LINK)
        self.checkpoint("symlink-renamed")
        fsync_dir(self.root)
        self.checkpoint("state-dir-fsynced")


def adaptation_id(record: Any) -> str | None:
    """The id of an on-device adaptation record (a slot seal's or state.json's ``adaptation``), or None."""
    return str(record.get("id")) if isinstance(record, dict) and record.get("id") else None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tree_bytes(path: Path) -> int:
    """Disk blocks the files under ``path`` take (what deleting them frees)."""
    total = 0
    for sub in path.rglob("*") if path.is_dir() else ():
        with contextlib.suppress(OSError):
            st = sub.lstat()
            total += st.st_blocks * 512 if sub.is_file() and not sub.is_symlink() else 0
    return total
