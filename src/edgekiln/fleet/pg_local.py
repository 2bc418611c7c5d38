"""A throwaway PostgreSQL server for tests and benchmarks (initdb + pg_ctl in a temporary folder).

PostgreSQL refuses to run as root, so under root the cluster is created and run as an
unprivileged user (``postgres`` when the Debian package created it, else ``nobody``) in a folder
that user owns. It listens on loopback only, with trust authentication, and is removed on exit.

    with LocalPostgres() as url:       # postgresql://fleet@127.0.0.1:PORT/fleet
        server = create_app(ServerConfig(db_url=url, ...))
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edgekiln.errors import EdgekilnError

PG_BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    for d in PG_BIN_DIRS:
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


class LocalPostgres:
    def __init__(self) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise EdgekilnError("PostgreSQL is not installed (no initdb/pg_ctl; apt-get install postgresql)")
        self.folder: Path | None = None
        self.user: str | None = None
        self.url = ""

    def _run(self, *args: str) -> None:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=120, user=self.user)
        if out.returncode != 0:
            raise EdgekilnError(f"{Path(args[0]).name} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")

    def __enter__(self) -> str:
        assert self.bin is not None
        self.folder = Path(tempfile.mkdtemp(prefix="edgekiln-pg-"))
        if os.geteuid() == 0:
            self.user = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        data = self.folder / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "fleet", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {self.folder} -c fsync=off -c max_connections=100"
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.folder / "log"), "-w",
                  "start")
        self.url = f"postgresql://fleet@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return self.url

    def fresh_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def __exit__(self, *exc: object) -> None:
        if self.folder is None:
            return
        assert self.bin is not None
        subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, user=self.user)
        shutil.rmtree(self.folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
