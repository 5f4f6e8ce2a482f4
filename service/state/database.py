"""PostgreSQL connections for the shared state (`KINSHIP_STATE_URL`): a small pool, errors as UNAVAILABLE, migrations.

Several replicas share merge jobs, fingerprints, pair results and Hub records through one
database (docs/operations.md). Here is all that touches the connection itself:

- `Database.run(work)` runs `work(connection)` in one transaction on a pooled connection. A lost
  connection (the server restarted, the network dropped) is closed and the work retried once on a
  fresh one; if that fails too, the caller gets `StateUnavailable` (UNAVAILABLE, reason
  STATE_UNAVAILABLE), never a stack trace, and the next call tries again: service recovers by
  itself when the database is back. A small pool of our own rather than psycopg_pool, because its
  background reconnection backs off exponentially for minutes, and we want the first call after
  the database returns to succeed.
- `migrate(database)` applies the numbered SQL files of `migrations/` not yet recorded in the
  `schema_version` table, in one transaction under an advisory lock, so replicas starting together
  apply each file exactly once; a database whose schema is newer than this code refuses to start.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

import psycopg
from psycopg import conninfo

from kinship_service.config import ConfigError
from kinship_service.errors import Unavailable
from kinship_service.server import metrics

log = logging.getLogger("kinship.state")

T = TypeVar("T")

LOST_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
"""What psycopg raises when the database cannot be reached or the connection broke."""
MIGRATION_LOCK = 0x6B696E73  # "kins": the advisory lock key held while migrating
MAX_CONNECTIONS = 10
"""Connections one process opens at most (a replica: front + heavy-work process, 20); callers beyond wait."""
MAX_IDLE_CONNECTIONS = MAX_CONNECTIONS
_MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


class StateUnavailable(Unavailable):
    """The shared-state database cannot be reached now (UNAVAILABLE; retry)."""

    default_reason = "STATE_UNAVAILABLE"
    detail = ""
    """The driver's one-line explanation (connection refused, authentication failed, ...)."""


class StateStartupError(ConfigError):
    """The server cannot start with this `KINSHIP_STATE_URL` (unreachable, refused, or a newer schema)."""


def describe_url(url: str) -> str:
    """`user@host:port/dbname` of a connection URL, without its password (for messages and logs)."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable URL"
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"{user}{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class Database:
    """Connections to one PostgreSQL database (thread-safe): `run` a transaction, retried once on a lost connection."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.where = describe_url(url)
        self.connect_timeout = connect_timeout
        self._idle: list[psycopg.Connection[tuple[object, ...]]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = False

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        try:
            return psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout)), application_name="kinship-server"
            )
        except LOST_CONNECTION_ERRORS as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, exc: BaseException) -> StateUnavailable:
        """The UNAVAILABLE error for a failure to reach the database (the message never holds the password)."""
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error = StateUnavailable(
            f"the shared state database ({self.where}, KINSHIP_STATE_URL) cannot be reached: {detail}; "
            "retry in a few seconds; operators: check that PostgreSQL is up and reachable from the replicas"
        )
        error.detail = detail
        return error

    def _take(self) -> tuple[psycopg.Connection[tuple[object, ...]], bool]:
        """An idle connection (reused: True) or a new one."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not conn.broken:
                    return conn, True
        return self._connect(), False

    def _give_back(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        with self._lock:
            if not self._closed and not conn.closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def run(self, work: Callable[[psycopg.Connection[tuple[object, ...]]], T]) -> T:
        """`work(connection)` in one transaction; StateUnavailable when the database cannot be reached.

        A reused connection that turns out dead is replaced (with every idle one) and the work
        retried once on a new connection, so a database restart costs no failed call when it is
        already back. Other errors (the work's
        own, constraint violations) pass through after the transaction was rolled back.
        """
        started = time.perf_counter()
        outcome = "error"
        if not self._slots.acquire(timeout=self.connect_timeout):
            metrics.STATE_UNAVAILABLE.inc()
            error = StateUnavailable(
                f"all {MAX_CONNECTIONS} connections of this process to the shared state database ({self.where}) stayed "
                f"busy for {self.connect_timeout:g} s; retry with backoff"
            )
            error.detail = "every connection busy"
            raise error
        try:
            for attempt in (1, 2):
                try:
                    conn, reused = self._take()
                except StateUnavailable:
                    outcome = "unavailable"
                    raise
                try:
                    with conn.transaction():
                        result = work(conn)
                except LOST_CONNECTION_ERRORS as exc:
                    conn.close()
                    self.close()  # the other idle connections are most likely dead too: the retry opens a new one
                    if reused and attempt == 1:
                        continue
                    outcome = "unavailable"
                    log.warning("shared state database unreachable", extra={"database": self.where, "error": str(exc)})
                    raise self.unavailable(exc) from None
                except BaseException:
                    self._give_back(conn)
                    raise
                self._give_back(conn)
                outcome = "ok"
                return result
            raise AssertionError("unreachable")  # the loop returns or raises
        finally:
            self._slots.release()
            metrics.STATE_SECONDS.labels(outcome).observe(time.perf_counter() - started)
            if outcome == "unavailable":
                metrics.STATE_UNAVAILABLE.inc()

    def close(self) -> None:
        """Close every idle connection; later calls open new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped with the code, in order."""
    found = []
    for entry in resources.files("kinship_service.state").joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


def latest_version() -> int:
    """The schema version this code knows."""
    return len(migrations())


def migrate(database: Database) -> int:
    """Bring the schema up to this code's version (see the module docstring); the version now.

    Raises StateStartupError when the database's schema is newer than the code.
    """
    known = migrations()

    def work(conn: psycopg.Connection[tuple[object, ...]]) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = int(row[0]) if row is not None else 0  # type: ignore[call-overload]  # an integer column
        if current > len(known):
            raise StateStartupError(
                f"KINSHIP_STATE_URL: the database {database.where} has schema version {current}, newer than this "
                f"server knows ({len(known)}); a newer release migrated it: run that release (or newer) here too"
            )
        for version, name, sql in known[current:]:
            conn.execute(sql.encode())
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
            log.info("shared state schema migrated", extra={"version": version, "migration": name})
        return len(known)

    return database.run(work)


_DATABASES: dict[str, Database] = {}
_DATABASES_LOCK = threading.Lock()


def open_database(url: str, connect_timeout: float = 5.0) -> Database:
    """The process's Database for `url`, connected and migrated on first use.

    Raises StateStartupError (naming KINSHIP_STATE_URL) when the database cannot be reached or
    refuses the connection, or its schema is newer than the code: the server must not start then.
    """
    with _DATABASES_LOCK:
        database = _DATABASES.get(url)
        if database is not None:
            return database
        try:
            conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError:  # libpq's message quotes the URL, password included: not repeated here
            raise StateStartupError(
                "KINSHIP_STATE_URL is not a URL libpq can parse; use postgresql://user:password@host:port/dbname "
                "(percent-encode special characters in the password)"
            ) from None
        database = Database(url, connect_timeout=connect_timeout)
        try:
            migrate(database)
        except StateUnavailable as exc:
            raise StateStartupError(
                f"KINSHIP_STATE_URL: cannot use the shared state database {database.where} ({exc.detail}); check the URL "
                "(host, port, database, user, password) and that PostgreSQL is up and reachable from here"
            ) from None
        except psycopg.Error as exc:  # connected, but refused: permissions, a broken schema
            raise StateStartupError(f"KINSHIP_STATE_URL: the database {database.where} refused the schema set-up: {exc}") from None
        _DATABASES[url] = database
        return database
