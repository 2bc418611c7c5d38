"""The update server's metadata database: SQLite (embedded default) or PostgreSQL, one interface.

All SQL in the fleet package is written once, with ``?`` placeholders and syntax both engines
accept (``INSERT ... ON CONFLICT``, ``RETURNING``); the PostgreSQL adapter only rewrites the
placeholders. :func:`open_database` picks the engine from the URL:

    >>> db = open_database("sqlite:///:memory:")
    >>> with db.transaction() as tx:
    ...     _ = tx.execute("CREATE TABLE t (x INTEGER)")
    ...     _ = tx.execute("INSERT INTO t VALUES (?)", (3,))
    >>> db.query("SELECT x FROM t")
    [{'x': 3}]
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from edgekiln.errors import EdgekilnError

Row = dict[str, Any]

# NOTE: one schema for both engines; {id}, {blob} are the only dialect differences.
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL, version INTEGER NOT NULL, channel TEXT NOT NULL, target_path TEXT NOT NULL,
    sha256 TEXT NOT NULL, length BIGINT NOT NULL, blob_key TEXT NOT NULL, manifest_name TEXT NOT NULL,
    published DOUBLE PRECISION NOT NULL, PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS tuf_metadata (
    role TEXT NOT NULL, version INTEGER NOT NULL, data {blob} NOT NULL, PRIMARY KEY (role, version));
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, channel TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY, group_name TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL, model TEXT, active_version INTEGER, status TEXT,
    last_seen DOUBLE PRECISION, last_error TEXT, latency_p50 DOUBLE PRECISION, latency_p95 DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS rollouts (
    id {id}, model TEXT NOT NULL, version INTEGER NOT NULL, group_name TEXT NOT NULL, waves TEXT NOT NULL,
    success_threshold DOUBLE PRECISION NOT NULL, failure_threshold DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL, wave INTEGER NOT NULL, created DOUBLE PRECISION NOT NULL, reason TEXT);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id INTEGER NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, status TEXT,
    error TEXT, updated DOUBLE PRECISION, PRIMARY KEY (rollout_id, device));
CREATE TABLE IF NOT EXISTS director_metadata (
    device TEXT NOT NULL, role TEXT NOT NULL, version INTEGER NOT NULL, data {blob} NOT NULL,
    PRIMARY KEY (device, role, version));
CREATE TABLE IF NOT EXISTS device_notices (
    device TEXT PRIMARY KEY, device_id TEXT NOT NULL, rev TEXT NOT NULL, seq BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS device_mqtt (device TEXT PRIMARY KEY, device_id TEXT NOT NULL UNIQUE, pw_line TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_telemetry (
    device TEXT PRIMARY KEY, received DOUBLE PRECISION NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry_history (
    id {id}, device TEXT NOT NULL, received DOUBLE PRECISION NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_adaptations (
    seq {id}, device TEXT NOT NULL, received DOUBLE PRECISION NOT NULL, model TEXT NOT NULL,
    version INTEGER NOT NULL, id TEXT NOT NULL, status TEXT NOT NULL, summary TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rollouts_by_group ON rollouts (group_name, id);
CREATE INDEX IF NOT EXISTS adaptations_by_device ON device_adaptations (device, seq);
CREATE INDEX IF NOT EXISTS notices_by_seq ON device_notices (seq);
CREATE INDEX IF NOT EXISTS telemetry_by_device ON telemetry_history (device, id);
CREATE INDEX IF NOT EXISTS rollout_devices_by_device ON rollout_devices (device);
CREATE INDEX IF NOT EXISTS devices_by_group ON devices (group_name);
"""


class Tx(Protocol):
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...


class Database(Protocol):
    """What the server needs from a database: statements, and transactions that commit or roll back."""

    dialect: str

    def transaction(self, *, write_lock: bool = False) -> Any: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def close(self) -> None: ...


class _Base:
    dialect = "base"

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.transaction() as tx:
            return tx.query(sql, params)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.transaction() as tx:
            return tx.execute(sql, params)

    def transaction(self, *, write_lock: bool = False) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def create_schema(self, blob: str, ident: str) -> None:
        with self.transaction(write_lock=True) as tx:
            for statement in SCHEMA.format(blob=blob, id=ident).split(";"):
                if statement.strip():
                    tx.execute(statement)


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cur = self.conn.execute(sql, tuple(params))
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, tuple(params)).rowcount


class SqliteDatabase(_Base):
    """SQLite in WAL mode, one connection per thread; writers are serialized by ``BEGIN IMMEDIATE``."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._memory = path == ":memory:"
        self._shared: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        if not self._memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.create_schema("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT")

    def _connect(self) -> sqlite3.Connection:
        if self._memory:  # NOTE: an in-memory database exists per connection: share one.
            if self._shared is None:
                self._shared = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self, *, write_lock: bool = False) -> Iterator[_SqliteTx]:
        conn = self._connect()
        lock = self._lock if self._memory else _NullLock()
        with lock:
            conn.execute("BEGIN IMMEDIATE" if write_lock else "BEGIN")
            try:
                yield _SqliteTx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.conn.cursor() as cur:
            cur.execute(_pg_sql(sql), tuple(params))
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, _pg_row(row), strict=True)) for row in cur.fetchall()]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.conn.cursor() as cur:
            cur.execute(_pg_sql(sql), tuple(params))
            return cur.rowcount


def _pg_sql(sql: str) -> str:
    # NOTE: our SQL never holds a literal '?' or '%', so the rewrite is a plain replace.
    return sql.replace("?", "%s")


def _pg_row(row: Sequence[Any]) -> list[Any]:
    return [bytes(v) if isinstance(v, memoryview) else v for v in row]


class PostgresDatabase(_Base):
    """PostgreSQL through psycopg 3 with a small fixed pool of connections."""

    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        import psycopg

        self.url = url
        self._pool: queue.Queue[Any] = queue.Queue()
        try:
            for _ in range(pool_size):
                self._pool.put(psycopg.connect(url, autocommit=False))
        except psycopg.OperationalError as exc:
            self.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgekilnError(f"cannot connect to PostgreSQL at {redact_url(url)}: {first}") from None
        self.create_schema("BYTEA", "BIGSERIAL PRIMARY KEY")

    @contextmanager
    def transaction(self, *, write_lock: bool = False) -> Iterator[_PgTx]:
        conn = self._pool.get()
        try:
            if conn.closed or conn.broken:
                import psycopg

                conn = psycopg.connect(self.url, autocommit=False)
            try:
                tx = _PgTx(conn)
                if write_lock:  # NOTE: serializes writers across server processes sharing the database
                    tx.execute("SELECT pg_advisory_xact_lock(8008)")
                yield tx
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        finally:
            self._pool.put(conn)

    def close(self) -> None:
        while not self._pool.empty():
            self._pool.get_nowait().close()


def redact_url(url: str) -> str:
    """``url`` with its credentials hidden, for messages and logs.

    >>> redact_url("postgresql://fleet:secret@db:5432/fleet")
    'postgresql://***@db:5432/fleet'
    """
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def open_database(url: str) -> SqliteDatabase | PostgresDatabase:
    """``sqlite:///path/to/file.db``, ``sqlite:///:memory:``, a plain file path, or ``postgresql://...``."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    if url.startswith("sqlite:///"):
        return SqliteDatabase(url[len("sqlite:///"):] or ":memory:")
    if "://" in url:
        raise EdgekilnError(f"--db {url}: unsupported database URL (use sqlite:///FILE or postgresql://...)")
    return SqliteDatabase(url)
