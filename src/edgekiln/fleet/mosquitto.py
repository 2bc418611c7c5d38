"""The MQTT broker's files (Mosquitto 2.x): device users, topic ACL, config; and a broker for tests.

Each device's MQTT user is its ``device_id`` (``sha256(token)[:32]``, as in the director's
targets) and its password is derived from the HTTP token, so a sniffed MQTT password is not the
token. The server writes the ``passwd`` file itself, in Mosquitto's ``$7$`` format, with no
``mosquitto_passwd`` needed:

    >>> user, pw = mqtt_credentials("ekd_example-token")
    >>> len(user), len(pw)
    (32, 64)
    >>> password_line(user, pw).startswith(user + ":$7$101$")
    True

The ACL lets each device read only its own notice topic and write only its own telemetry topic;
the server user (``edgekiln-server``) writes every notice and reads every telemetry topic.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError

SERVER_USER = "edgekiln-server"
TOPIC_PREFIX = "edgekiln/devices"
SHARED_TELEMETRY = f"$share/edgekiln/{TOPIC_PREFIX}/+/telemetry"
PBKDF2_ITERATIONS = 101
ACL = f"""# written by edgekiln; rewritten on device add/remove
user {SERVER_USER}
topic write {TOPIC_PREFIX}/+/notice
topic read {TOPIC_PREFIX}/+/telemetry

pattern read {TOPIC_PREFIX}/%u/notice
pattern write {TOPIC_PREFIX}/%u/telemetry
"""


def device_id(token: str) -> str:
    """A device's public id: the first 32 hex digits of ``sha256(token)``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:32]


def notice_topic(dev_id: str) -> str:
    return f"{TOPIC_PREFIX}/{dev_id}/notice"


def telemetry_topic(dev_id: str) -> str:
    return f"{TOPIC_PREFIX}/{dev_id}/telemetry"


def mqtt_credentials(token: str) -> tuple[str, str]:
    """``(username, password)`` for a device token: its ``device_id`` and
    ``hmac_sha256(token, "edgekiln-mqtt-v1")`` in hex. Both sides derive it; nothing is sent."""
    pw = hmac.new(token.encode("utf-8"), b"edgekiln-mqtt-v1", hashlib.sha256).hexdigest()
    return device_id(token), pw


def password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    """One ``passwd`` line in Mosquitto 2's ``$7$`` format (PBKDF2-HMAC-SHA512).

    NOTE: 101 iterations (mosquitto_passwd uses the same count) are enough here: every password
    is 256 random bits derived from the token, so there is nothing to brute-force."""
    if ":" in user or "\n" in user or "\n" in password:
        raise EdgekilnError(f"MQTT user name {user[:40]!r} may not contain ':' or a newline")
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return (f"{user}:$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_broker_files(folder: str | Path, entries: Iterable[str], *, server_password: str, port: int = 8883,
                       tls: tuple[str | Path, str | Path] | None = None, bind: str = "127.0.0.1") -> Path:
    """Write ``passwd`` (the server user plus ``entries``, which are :func:`password_line` lines),
    ``acl`` and ``mosquitto.conf`` into ``folder``, each atomically with mode 0600; return the config.

    ``tls`` is ``(certfile, keyfile)`` for an mqtts listener; without it the listener is plain MQTT
    (fit for loopback only). Mosquitto reads ``passwd`` and ``acl`` again on SIGHUP (:func:`reload`)."""
    folder = Path(folder).resolve()
    write_users(folder, entries, server_password=server_password)
    # NOTE: started as root, Mosquitto switches to user 'mosquitto' and then cannot read a 0600
    # passwd file; `user` keeps it as the user who owns the files (as root it logs a harmless warning).
    conf = [
        "# written by edgekiln (edgekiln broker config / serve --mqtt-broker-dir)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {folder / 'passwd'}",
        f"acl_file {folder / 'acl'}",
        "persistence false",
        f"pid_file {folder / 'mosquitto.pid'}",
        f"user {getpass.getuser()}",
        "log_dest stderr",
        "max_packet_size 65536",
        f"listener {int(port)} {bind}",
    ]
    if tls is not None:
        conf += [f"certfile {Path(tls[0]).resolve()}", f"keyfile {Path(tls[1]).resolve()}"]
    _atomic_write(folder / "mosquitto.conf", "\n".join(conf) + "\n")
    return folder / "mosquitto.conf"


def write_users(folder: str | Path, entries: Iterable[str], *, server_password: str) -> None:
    """Rewrite ``passwd`` (the server user plus ``entries``) and ``acl`` in ``folder``, atomically,
    mode 0600; a running broker reads them on :func:`reload`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [password_line(SERVER_USER, server_password)]
    lines += [e.strip() for e in entries if e.strip() and not e.startswith(SERVER_USER + ":")]
    _atomic_write(folder / "passwd", "\n".join(lines) + "\n")
    _atomic_write(folder / "acl", ACL)


def reload(folder: str | Path) -> bool:
    """Ask the broker that wrote ``folder/mosquitto.pid`` to re-read its passwd and acl (SIGHUP).
    Returns False when no broker runs from that folder."""
    try:
        pid = int((Path(folder) / "mosquitto.pid").read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True


def find_mosquitto() -> str | None:
    """The ``mosquitto`` binary on PATH or in /usr/sbin (where Debian puts it), or None."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """A real Mosquitto on 127.0.0.1 for tests, the benchmark and the demo.

    ``users`` maps user names to plain passwords (e.g. from :func:`mqtt_credentials`); the server
    user's password is ``server_password`` (random when not given). With ``tls=(cert, key)`` the
    listener is mqtts. ``with MosquittoBroker(d) as url:`` gives ``mqtt[s]://127.0.0.1:PORT``;
    :meth:`stop`, :meth:`kill` and :meth:`start` restart it on the same port."""

    def __init__(self, folder: str | Path, *, port: int | None = None,
                 tls: tuple[str | Path, str | Path] | None = None, users: Mapping[str, str] | None = None,
                 server_password: str | None = None) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise EdgekilnError("mosquitto not found on PATH or in /usr/sbin (apt-get install mosquitto; "
                                f"PATH={os.environ.get('PATH', '')})")
        self.binary, self.folder, self.tls = binary, Path(folder).resolve(), tls
        self.port = port or _free_port()
        self.server_password = server_password or base64.urlsafe_b64encode(os.urandom(24)).decode()
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"
        self.lines = {user: password_line(user, pw) for user, pw in (users or {}).items()}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write()

    def write(self) -> None:
        write_broker_files(self.folder, self.lines.values(), server_password=self.server_password,
                           port=self.port, tls=self.tls)

    def add_user(self, user: str, password: str) -> None:
        """Admit a user: rewrite the files and reload a running broker."""
        self.lines[user] = password_line(user, password)
        self.write()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def start(self, timeout_s: float = 10.0) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return self.url
        log = open(self.folder / "mosquitto.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.folder / "mosquitto.conf")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = (self.folder / "mosquitto.log").read_text(errors="replace")[-600:]
                raise EdgekilnError(f"mosquitto exited with code {self.proc.returncode}: {tail.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self.url
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise EdgekilnError(f"mosquitto did not listen on port {self.port} "
                                        f"within {timeout_s:g} s") from None
                time.sleep(0.01)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
