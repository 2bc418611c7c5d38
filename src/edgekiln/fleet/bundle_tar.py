"""The one check of a bundle tar's members, shared by the server (at publish) and the agent
(before extracting): plain relative paths, regular files and folders only, no duplicates, no
sparse members, bounded count and unpacked size.

A sparse (PAX ``GNU.sparse.*``) member is refused: a 10 KiB tar can declare 100 MB of holes that
extraction would write out in full. ``unpacked_size`` is signed into the target's ``custom`` so
a device can check its free space before downloading.

:func:`write_reproducible` writes a bundle folder as the tar that is published: sorted names, zero
mtimes and owners, mode 0644, PAX format. The same files always give the same bytes, which is
what lets a device rebuild the tar of its active slot as the base of a delta update.

    >>> import io, tarfile
    >>> buf = io.BytesIO()
    >>> with tarfile.open(fileobj=buf, mode="w") as t:
    ...     info = tarfile.TarInfo("manifest.json"); info.size = 2
    ...     t.addfile(info, io.BytesIO(b"{}"))
    >>> with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
    ...     [str(rel) for _, rel in check_members(t)], unpacked_size(t)
    (['manifest.json'], 2)
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from edgekiln.errors import EdgekilnError

MAX_BUNDLE_FILES = 256
MAX_UNPACKED_BYTES = 2 * 1024**3
ALLOWED_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE)


class BundleRefused(EdgekilnError):
    """A bundle tar whose members are unsafe to extract (the server answers 422)."""


def check_members(tar: tarfile.TarFile, *, max_bytes: int = MAX_UNPACKED_BYTES,
                  max_files: int = MAX_BUNDLE_FILES) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    """Every member with its normalized relative path (the archive's "." entry left out), or
    :class:`BundleRefused` naming the first bad member."""
    members: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    total, seen = 0, set()
    for member in tar:  # NOTE: lazily, so a tar of a million headers stops at max_files, not in getmembers()
        raw = member.name
        pure = PurePosixPath(raw)
        if pure.is_absolute() or ".." in pure.parts or "\\" in raw:
            raise BundleRefused(f"bundle member '{raw[:200]}' is not a plain relative path")
        if member.type not in ALLOWED_TYPES:
            kind = "link" if (member.issym() or member.islnk()) else "special file (FIFO, device, ...)"
            raise BundleRefused(f"bundle member '{raw[:200]}' is a {kind}; bundles may hold only files and folders")
        if member.issparse():
            raise BundleRefused(f"bundle member '{raw[:200]}' is a sparse file")
        parts = [p for p in pure.parts if p not in ("", ".")]
        if not parts:
            continue
        rel = PurePosixPath(*parts)
        if str(rel) in seen:
            raise BundleRefused(f"bundle member '{raw[:200]}' appears twice")
        seen.add(str(rel))
        total += member.size if member.isfile() else 0
        if len(members) >= max_files:
            raise BundleRefused(f"bundle has more than {max_files} files")
        if total > max_bytes:
            raise BundleRefused(f"bundle unpacks to more than {max_bytes} bytes")
        members.append((member, rel))
    return members


def unpacked_size(tar: tarfile.TarFile) -> int:
    """Bytes the regular files take once extracted (call after :func:`check_members`)."""
    return sum(m.size for m in tar.getmembers() if m.isfile())


def write_reproducible(folder: str | Path, out: str | Path) -> Path:
    """Write the bundle folder's files as an uncompressed POSIX tar, byte-for-byte reproducible
    (sorted names, zero mtimes and owners, mode 0644, no folder entries), so the same files always
    have the same SHA-256; refuses a folder without ``manifest.json`` and symlinks."""
    root, out = Path(folder), Path(out)
    if not (root / "manifest.json").is_file():
        raise EdgekilnError(f"{root}: not a bundle folder (no manifest.json)")
    # NOTE: Path order (part by part), as edgekiln has always written bundles: devices rebuild
    # tars published by earlier versions, so the order must never change.
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            if path.is_symlink():
                raise EdgekilnError(f"{path}: bundles may not hold symlinks")
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    return out
