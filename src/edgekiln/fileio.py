"""Atomic artifact writes: a crash never leaves a half-written file that looks complete.

Every artifact is written to a temporary file in the same directory, flushed and fsynced,
then renamed over the destination (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``mode`` (e.g. ``0o600`` for a secret) is set on the temporary file before the rename, so the
    file is never visible with wider permissions; the default is what a plain ``open()`` gives.

    >>> import tempfile, pathlib
    >>> p = atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "a.bin", b"xy")
    >>> p.read_bytes()
    b'xy'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # NOTE: mkstemp creates 0600 files; artifacts get the permissions a plain open() would give.
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def build_lock(entry: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``<entry>.lock`` (``flock``) while a shared cache entry is built.

    Two processes that need the same entry (pytest-xdist workers, two ``make test`` runs) take turns:
    the second waits, then finds the entry the first one built. Check for the entry again inside the
    lock, and build it to a temporary path renamed into place, so a crash never leaves a half entry.
    The lock is released when the holder exits, even on ``kill -9``.

    >>> import tempfile, pathlib
    >>> with build_lock(pathlib.Path(tempfile.mkdtemp()) / "entry") as lock:
    ...     lock.name
    'entry.lock'
    """
    import fcntl

    lock = Path(entry).with_name(Path(entry).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield lock
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_onnx(path: str | os.PathLike[str], model: Any) -> Path:
    """Serialize an ``onnx.ModelProto`` with all weights inside the one file (no side file)."""
    return atomic_write_bytes(path, model.SerializeToString())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename/creation/deletion inside the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
