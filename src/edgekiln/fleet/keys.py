"""The update server's key folder: online role keys, the offline root key, and signed roots.

Two TUF repositories share one offline root key: the *image* repository (``root.json``: the
bundles) and the *director* repository (``director-root.json``: one signed assignment per
device). The server holds only the online keys; every root version is signed offline and
handed to the server as a file, which it checks against the root before it and imports::

    KEYS/targets.pem, snapshot.pem, timestamp.pem   image repository roles (0600)
    KEYS/director.pem                                director targets, snapshot and timestamp (0600)
    KEYS/root.json, director-root.json               the newest roots: what devices are enrolled with
    KEYS/roots/N.root.json, N.director-root.json     every root version, imported by the server
    KEYS/ROLE.<keyid12>.retired.pem                  a rotated-out key, kept for the record
    KEYS/root.pem                                    only in dev mode (``dev_init``): the root key online

``keys rotate ROLE`` writes the new key to ``ROLE.next.pem``, then root v+1, then renames the key
into place; the server picks, from ``ROLE.pem`` and ``ROLE.next.pem``, the key its newest root
names, so it keeps signing correctly at every step of a rotation.

    >>> import tempfile
    >>> k = Path(tempfile.mkdtemp()) / "keys"
    >>> _ = init_keys(k, k.parent / "root-offline.pem", expiry=TufExpiry())
    >>> sorted(p.name for p in k.iterdir())
    ['director-root.json', 'director.pem', 'root.json', 'roots', 'snapshot.pem', 'targets.pem', 'timestamp.pem']
    >>> rotate(k, "timestamp", k.parent / "root-offline.pem", expiry=TufExpiry())
    2
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_bytes
from edgekiln.fleet.tuf_repo import TufExpiry

ONLINE_KEYS = ("targets", "snapshot", "timestamp", "director")
#: repository -> (file name of its root, the key file of each of its online roles)
REPOS: dict[str, tuple[str, dict[str, str]]] = {
    "image": ("root.json", {"targets": "targets", "snapshot": "snapshot", "timestamp": "timestamp"}),
    "director": ("director-root.json", {"targets": "director", "snapshot": "director", "timestamp": "director"}),
}
ROOT_WARN_DAYS = 30.0
INIT_HINT = "run `edgekiln keys init KEYS --root-key FILE` first"


# -- key files ---------------------------------------------------------------------------------
def _create_key(path: Path) -> Any:
    """A new Ed25519 key in a file that is 0600 from its creation (never briefly readable)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, 0o600)  # NOTE: os.open's mode is masked by the umask; 0600 is all we want anyway
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return key


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise EdgekilnError(f"{path}: key file not found") from None
    if mode & 0o077:
        raise EdgekilnError(f"{path} is readable by group/others (mode {mode:04o}): chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise EdgekilnError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgekilnError(f"{path}: not an Ed25519 key")
    return key


def load_online_signer(path: str | os.PathLike[str]) -> Any:
    """A securesystemslib signer for one key file; a key readable by group or others is refused."""
    from securesystemslib.signer import CryptoSigner

    return CryptoSigner(_load_key(Path(path)))


def signer_for(keys_dir: str | os.PathLike[str], name: str, keyids: list[str], root_version: int) -> Any:
    """The signer among ``NAME.pem`` and ``NAME.next.pem`` (a rotation in progress) that the root names."""
    keys_dir = Path(keys_dir)
    found = None
    for path in (keys_dir / f"{name}.pem", keys_dir / f"{name}.next.pem"):
        if path.is_file():
            signer = load_online_signer(path)
            if signer.public_key.keyid in keyids:
                return signer
            found = found or signer
    if found is None:
        raise EdgekilnError(f"{keys_dir / (name + '.pem')}: key file not found; {INIT_HINT}")
    raise EdgekilnError(f"{keys_dir / (name + '.pem')}: key {found.public_key.keyid[:12]}... is not the {name} key "
                        f"of the repository's root v{root_version}; use the key folder this database was created with")


def is_dev(keys_dir: str | os.PathLike[str]) -> bool:
    """Dev mode: the root key is in the key folder, so the server may sign roots itself."""
    return (Path(keys_dir) / "root.pem").is_file()


def is_initialized(keys_dir: str | os.PathLike[str]) -> bool:
    keys_dir = Path(keys_dir)
    return (keys_dir / "root.json").is_file() or any((keys_dir / f"{n}.pem").is_file() for n in ONLINE_KEYS)


def require_initialized(keys_dir: str | os.PathLike[str]) -> None:
    """What ``serve`` calls first: an empty key folder is an error (no keys are made up silently)."""
    if not is_initialized(keys_dir):
        raise EdgekilnError(f"{keys_dir}: no keys; {INIT_HINT}")


# -- roots -------------------------------------------------------------------------------------
def _expires(days: float, now: float | None = None) -> _dt.datetime:
    now_dt = _dt.datetime.fromtimestamp(time.time() if now is None else now, _dt.UTC).replace(microsecond=0)
    return now_dt + _dt.timedelta(days=days)


def _new_root(root_signer: Any, online: dict[str, Any], expires: _dt.datetime) -> Any:
    from tuf.api.metadata import Metadata, Root

    md = Metadata(Root(expires=expires, consistent_snapshot=False))
    md.signed.add_key(root_signer.public_key, "root")
    for role, signer in online.items():
        md.signed.add_key(signer.public_key, role)
    md.sign(root_signer)
    return md


def _root_path(keys_dir: Path, repo: str, version: int) -> Path:
    return keys_dir / "roots" / f"{version}.{REPOS[repo][0]}"


def _write_root(keys_dir: Path, repo: str, md: Any) -> Path:
    """Publish a signed root: ``roots/N.NAME`` (never overwritten) and the newest ``NAME``."""
    data = md.to_bytes()
    path = _root_path(keys_dir, repo, md.signed.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise EdgekilnError(f"{path} already exists: another rotation ran at the same time?") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    atomic_write_bytes(keys_dir / REPOS[repo][0], data)
    return path


_ROOT_FILE = re.compile(r"^(?P<version>[1-9][0-9]{0,9})\.(?P<name>root|director-root)\.json$")


def root_versions(keys_dir: str | os.PathLike[str], repo: str) -> list[int]:
    folder = Path(keys_dir) / "roots"
    if not folder.is_dir():
        return []
    name = REPOS[repo][0]
    return sorted(int(m["version"]) for p in folder.iterdir()
                  if (m := _ROOT_FILE.match(p.name)) and f"{m['name']}.json" == name)


def latest_root(keys_dir: str | os.PathLike[str], repo: str) -> Any:
    """The newest signed root of ``repo`` (``"image"`` or ``"director"``) in the key folder, or None."""
    from tuf.api.metadata import Metadata

    keys_dir = Path(keys_dir)
    versions = root_versions(keys_dir, repo)
    path = _root_path(keys_dir, repo, versions[-1]) if versions else keys_dir / REPOS[repo][0]
    return Metadata.from_bytes(path.read_bytes()) if path.is_file() else None


def pending_roots(keys_dir: str | os.PathLike[str], repo: str, after: int) -> list[bytes]:
    """``roots/N.*.json`` for N = after+1, after+2, ... (stopping at the first gap), unverified."""
    keys_dir = Path(keys_dir)
    out: list[bytes] = []
    version = after + 1
    while (path := _root_path(keys_dir, repo, version)).is_file():
        out.append(path.read_bytes())
        version += 1
    return out


def verify_roots(trusted: bytes | None, pending: list[bytes]) -> list[Any]:
    """Check each new root against the one before it and itself (TUF's rule); return them parsed.

    ``trusted`` None means ``pending[0]`` is trusted on first use (it came with the key folder).
    """
    from tuf.api.metadata import Metadata, Root

    out: list[Any] = []
    previous = Metadata.from_bytes(trusted) if trusted is not None else None
    for data in pending:
        try:
            md = Metadata.from_bytes(data)
            if not isinstance(md.signed, Root):
                raise ValueError("not a root")
            if previous is not None:
                if md.signed.version != previous.signed.version + 1:
                    raise ValueError(f"version {md.signed.version}, expected {previous.signed.version + 1}")
                previous.verify_delegate("root", md)
            md.verify_delegate("root", md)
        except Exception as exc:  # noqa: BLE001 - any parse or signature failure refuses the root
            raise EdgekilnError(f"refusing a new root: {type(exc).__name__}: {exc}") from None
        out.append(md)
        previous = md
    return out


# -- creating and rotating ---------------------------------------------------------------------
def _root_signer(root_key: Path, *, create: bool) -> Any:
    from securesystemslib.signer import CryptoSigner

    if create and not root_key.exists():
        return CryptoSigner(_create_key(root_key))
    return CryptoSigner(_load_key(root_key))


def _online_signers(keys_dir: Path) -> dict[str, Any]:
    from securesystemslib.signer import CryptoSigner

    out = {}
    for name in ONLINE_KEYS:
        path = keys_dir / f"{name}.pem"
        out[name] = load_online_signer(path) if path.is_file() else CryptoSigner(_create_key(path))
    return out


def _prepare_folder(keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)


def _write_first_roots(keys_dir: Path, root_signer: Any, signers: dict[str, Any], expiry: TufExpiry,
                       now: float | None = None) -> None:
    for repo, (name, roles) in REPOS.items():
        if not root_versions(keys_dir, repo) and not (keys_dir / name).is_file():
            online = {role: signers[key] for role, key in roles.items()}
            _write_root(keys_dir, repo, _new_root(root_signer, online, _expires(expiry.root_days, now)))


def init_keys(keys_dir: str | os.PathLike[str], root_key: str | os.PathLike[str], *, expiry: TufExpiry) -> Path:
    """``keys init``: the online keys and both roots v1, signed by ``root_key`` (created if missing,
    and kept outside the key folder: the server never needs it). Returns ``KEYS/root.json``."""
    keys_dir, root_key = Path(keys_dir), Path(root_key)
    if root_key.resolve().is_relative_to(keys_dir.resolve()):
        raise EdgekilnError(f"{root_key}: keep the root key outside {keys_dir} (offline); serve does not need it")
    if is_initialized(keys_dir):
        raise EdgekilnError(f"{keys_dir} already holds keys; use `edgekiln keys rotate` to replace one")
    root_signer = _root_signer(root_key, create=True)
    _prepare_folder(keys_dir)
    _write_first_roots(keys_dir, root_signer, _online_signers(keys_dir), expiry)
    return keys_dir / "root.json"


def dev_init(keys_dir: str | os.PathLike[str], expiry: TufExpiry, *, now: float | None = None) -> Path:
    """Dev mode: like :func:`init_keys` with the root key online at ``KEYS/root.pem``; creates only
    what is missing, so it also completes an older key folder. Returns ``KEYS/root.json``."""
    keys_dir = Path(keys_dir)
    _prepare_folder(keys_dir)
    root_signer = _root_signer(keys_dir / "root.pem", create=True)
    _write_first_roots(keys_dir, root_signer, _online_signers(keys_dir), expiry, now)
    return keys_dir / "root.json"


def _current_root(keys_dir: Path, repo: str, root_signer: Any) -> Any:
    """The newest root of ``repo``, after checking ``root_signer`` may sign its successor."""
    current = latest_root(keys_dir, repo)
    if current is None:
        raise EdgekilnError(f"{keys_dir}: no {REPOS[repo][0]}; {INIT_HINT}")
    if root_signer.public_key.keyid not in current.signed.roles["root"].keyids:
        raise EdgekilnError(f"the root key {root_signer.public_key.keyid[:12]}... is not the root key of "
                            f"{keys_dir / REPOS[repo][0]} v{current.signed.version}")
    return current


def _next_root(keys_dir: Path, repo: str, root_signer: Any, expiry: TufExpiry,
               replace: dict[str, Any] | None = None, now: float | None = None) -> Any:
    md = _current_root(keys_dir, repo, root_signer)
    for role, signer in (replace or {}).items():
        for keyid in list(md.signed.roles[role].keyids):
            md.signed.revoke_key(keyid, role)
        md.signed.add_key(signer.public_key, role)
    md.signed.version += 1
    md.signed.expires = _expires(expiry.root_days, now)
    md.signatures.clear()
    md.sign(root_signer)
    return md


def rotate(keys_dir: str | os.PathLike[str], role: str, root_key: str | os.PathLike[str], *,
           expiry: TufExpiry) -> int:
    """Replace one online key (``timestamp``, ``snapshot``, ``targets`` or ``director``): a new key,
    root v+1 naming it (signed by ``root_key``), the old key kept as ``ROLE.<keyid12>.retired.pem``.
    Returns the new root version. A running server picks it up at its next request."""
    from securesystemslib.signer import CryptoSigner

    keys_dir = Path(keys_dir)
    if role not in ONLINE_KEYS:
        raise EdgekilnError(f"keys rotate: unknown role '{role}' (use {', '.join(ONLINE_KEYS)})")
    root_signer = _root_signer(Path(root_key), create=False)
    old = load_online_signer(keys_dir / f"{role}.pem")
    repo = "director" if role == "director" else "image"
    roles = [r for r, name in REPOS[repo][1].items() if name == role]
    current = _current_root(keys_dir, repo, root_signer)   # NOTE: checked before any file is made
    nxt = keys_dir / f"{role}.next.pem"
    # NOTE: a leftover ROLE.next.pem is an interrupted rotation; its root may already be out, so reuse it
    new = load_online_signer(nxt) if nxt.is_file() else CryptoSigner(_create_key(nxt))
    if all(new.public_key.keyid in current.signed.roles[r].keyids for r in roles):
        md = current  # the interrupted rotation already published its root
    else:
        md = _next_root(keys_dir, repo, root_signer, expiry, {r: new for r in roles})
        _write_root(keys_dir, repo, md)
    retired = keys_dir / f"{role}.{old.public_key.keyid[:12]}.retired.pem"
    if not retired.exists():
        os.link(keys_dir / f"{role}.pem", retired)
    os.replace(nxt, keys_dir / f"{role}.pem")
    _fsync_dir(keys_dir)
    return int(md.signed.version)


def renew_root(keys_dir: str | os.PathLike[str], root_key: str | os.PathLike[str], *,
               expiry: TufExpiry) -> dict[str, int]:
    """Both roots v+1 with a fresh expiry, same keys; returns the new version of each."""
    keys_dir = Path(keys_dir)
    root_signer = _root_signer(Path(root_key), create=False)
    out = {}
    for repo in REPOS:
        md = _next_root(keys_dir, repo, root_signer, expiry)
        _write_root(keys_dir, repo, md)
        out[repo] = int(md.signed.version)
    return out


def renew_stale_roots(keys_dir: str | os.PathLike[str], root_signer: Any, *, expiry: TufExpiry,
                      now: float) -> list[str]:
    """Dev mode only: sign root v+1 of each repository past half its validity; returns those renewed.
    Another server process may do the same at once: the loser's exclusive create fails, harmlessly."""
    keys_dir = Path(keys_dir)
    renewed = []
    for repo in REPOS:
        current = latest_root(keys_dir, repo)
        left = current.signed.expires.timestamp() - now if current is not None else None
        if left is not None and left < expiry.root_days * 43200:
            md = _next_root(keys_dir, repo, root_signer, expiry, now=now)
            try:
                _write_root(keys_dir, repo, md)
            except EdgekilnError:
                continue
            renewed.append(repo)
    return renewed


def serve_warnings(keys_dir: str | os.PathLike[str], now: float | None = None) -> list[str]:
    """One-line warnings for ``serve``: the root key online, or a root expiring within 30 days."""
    now = time.time() if now is None else now
    out = []
    if is_dev(keys_dir):
        out.append(f"warning: {Path(keys_dir) / 'root.pem'} is online (dev mode): move it offline; the server does "
                   "not need it, `edgekiln keys rotate|renew-root --root-key FILE` do")
    for repo, (name, _) in REPOS.items():
        md = latest_root(keys_dir, repo)
        if md is not None and md.signed.expires.timestamp() - now < ROOT_WARN_DAYS * 86400:
            out.append(f"warning: {Path(keys_dir) / name} expires {md.signed.expires:%Y-%m-%d}; "
                       "run `edgekiln keys renew-root` with the root key")
    return out
