"""`Index` on a PostgreSQL server, shared by every replica of a cluster.

Same semantics as `SQLiteIndex` (numbered versions never reused; pending, ready and deleted
rows; aliases; lineage; per-file sha256), with these differences:

- The schema is versioned in a `schema_version` table and migrated on open, under a
  transaction-scoped advisory lock so that replicas starting together migrate once.
- Writers never read-then-write: `allocate` bumps `adapters.next_version` with one
  `UPDATE ... RETURNING` (the row lock serialises concurrent uploads from any number of
  processes), and deletes / alias moves lock the version row they depend on.
- Writer liveness is a session-level advisory lock held on a dedicated connection for the
  duration of an upload (`hold_writer`): PostgreSQL drops it when the writer's connection
  closes, including when the process is SIGKILLed, so any replica can tell a dead writer's
  pending row from a live one without trusting pids or clocks.
- Every delete and alias change is announced with `NOTIFY` on `CHANNEL` inside the same
  transaction (delivered only if it commits); `listen` runs a loop that hands them to a
  callback, which is how replicas evict deleted versions within a second.

The connection URL may carry a password; it is only ever shown through `redact_url`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from adapterhub_server.registry.errors import (
    AdapterVersionNotFoundError,
    AliasNotFoundError,
    RegistryError,
    VersionConflictError,
)
from adapterhub_server.registry.factory import is_postgres_url, redact_url
from adapterhub_server.registry.index_rows import file_rows, metadata_values
from adapterhub_server.registry.local import SQLiteIndex
from adapterhub_server.registry.records import FileRecord, PendingVersion, VersionRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""1: the first layout (the SQLite index's schema 2, plus NOTIFY events)."""

CHANNEL = "adapterhub_registry"
"""NOTIFY channel; payload: JSON {"event": "deleted" | "alias", "name", "version", ...}."""

_MIGRATION_LOCK = 0x41484231  # pg_advisory_xact_lock key for migrations ("AHB1")
_WRITER_LOCK_CLASS = 0x41485752  # first key of writer leases ("AHWR")

_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS adapters (
    name          TEXT PRIMARY KEY,
    next_version  INTEGER NOT NULL,
    created       DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name             TEXT NOT NULL REFERENCES adapters(name),
    version          INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'ready', 'deleted')),
    created          DOUBLE PRECISION NOT NULL,
    deleted          DOUBLE PRECISION,
    writer           TEXT,
    writer_pid       INTEGER,
    writer_host      TEXT,
    base_model_id    TEXT,
    base_fingerprint TEXT,
    rank             INTEGER,
    alpha            DOUBLE PRECISION,
    target_modules   TEXT NOT NULL DEFAULT '[]',
    description      TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    lineage          TEXT,
    kind             TEXT,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS versions_by_status ON versions(status, name, version);
CREATE TABLE IF NOT EXISTS files (
    name      TEXT NOT NULL,
    version   INTEGER NOT NULL,
    filename  TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    size      BIGINT NOT NULL,
    PRIMARY KEY (name, version, filename),
    FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS aliases (
    name     TEXT NOT NULL,
    alias    TEXT NOT NULL,
    version  INTEGER NOT NULL,
    updated  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES versions(name, version)
)
"""

MIGRATIONS: dict[int, str] = {1: _SCHEMA_1}
"""Schema version -> the statements that reach it from the previous one."""

_VERSION_COLUMNS = (
    "name, version, status, created, deleted, base_model_id, base_fingerprint, rank, alpha, "
    "target_modules, description, metadata, lineage, kind"
)


def migrate_schema(
    cur: psycopg.Cursor,
    *,
    version_table: str,
    migrations: dict[int, str],
    lock_key: int,
    what: str,
) -> None:
    """Bring the tables versioned in `version_table` up to `max(migrations)`, inside the
    caller's transaction and under advisory lock `lock_key`, so that replicas starting
    together migrate once. A newer schema than this code knows is refused."""
    latest = max(migrations)
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
    cur.execute(f"CREATE TABLE IF NOT EXISTS {version_table} (version INTEGER NOT NULL)")
    cur.execute(f"SELECT max(version) FROM {version_table}")
    found = cur.fetchone()[0] or 0
    if found > latest:
        raise RegistryError(
            f"{what} has schema {found}; this version of adapterhub understands up to {latest}"
        )
    for version in range(found + 1, latest + 1):
        for statement in migrations[version].split(";"):
            if statement.strip():
                cur.execute(statement)
        cur.execute(f"DELETE FROM {version_table}")
        cur.execute(f"INSERT INTO {version_table} (version) VALUES (%s)", (version,))
        logger.info("%s migrated to schema %d", what, version)


def _secrets(url: str) -> list[str]:
    parts = urllib.parse.urlsplit(url)
    found = []
    if parts.password:
        found += [parts.password, urllib.parse.unquote(parts.password)]
    for key, value in urllib.parse.parse_qsl(parts.query):
        if key.lower() == "password" and value:
            found.append(value)
    return [s for s in found if s]


def _writer_key(token: str) -> int:
    return int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "big") & 0x7FFFFFFF


class WriterLease:
    """A live writer's advisory lock, on its own connection (see `hold_writer`)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def release(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.close()


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.conn: psycopg.Connection | None = None
        self.pid = -1


class PostgresIndex:
    """`Index` in a PostgreSQL database; safe for many processes on many hosts."""

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        if not is_postgres_url(url):
            raise RegistryError(f"not a PostgreSQL URL: {redact_url(url)}")
        self.url = url
        self.display_url = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self._slots = {"read": _Slot(), "write": _Slot()}
        self._migrate()

    # -- connections --------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in _secrets(self.url):
            text = text.replace(secret, "***")
        return text

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        """A new connection; errors name the redacted URL only."""
        try:
            return psycopg.connect(
                self.url,
                autocommit=autocommit,
                connect_timeout=max(1, int(self.connect_timeout_s)),
            )
        except psycopg.Error as exc:
            raise RegistryError(
                f"cannot connect to the registry index at {self.display_url}: "
                f"{self._scrub(str(exc)).strip()}"
            ) from None

    def _connection(self, kind: str, slot: _Slot) -> psycopg.Connection:
        # A connection must not cross fork(), and a broken one is replaced.
        if slot.conn is None or slot.pid != os.getpid() or slot.conn.closed:
            conn = self.connect()
            if kind == "read":
                # One snapshot for the several SELECTs of one call.
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
            slot.conn, slot.pid = conn, os.getpid()
        return slot.conn

    @contextlib.contextmanager
    def transaction(self, kind: str) -> Iterator[psycopg.Cursor]:
        """A transaction on this process's `read` (repeatable-read, read-only) or `write`
        connection; committed on exit, rolled back on an exception. Other tables in the
        same database (the fine-tuning store's) use it too."""
        slot = self._slots[kind]
        with slot.lock:
            conn = self._connection(kind, slot)
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except BaseException as exc:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
                if isinstance(exc, psycopg.OperationalError):
                    # A dropped connection (server restart, idle timeout): the next call
                    # reconnects. Not retried here: a write might have been applied.
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                    slot.conn = None
                    raise RegistryError(
                        f"registry index {self.display_url}: {self._scrub(str(exc)).strip()}"
                    ) from None
                raise

    def _write(self) -> contextlib.AbstractContextManager[psycopg.Cursor]:
        return self.transaction("write")

    def _read(self) -> contextlib.AbstractContextManager[psycopg.Cursor]:
        return self.transaction("read")

    def close(self) -> None:
        for slot in self._slots.values():
            with slot.lock:
                if slot.conn is not None and slot.pid == os.getpid():
                    with contextlib.suppress(psycopg.Error):
                        slot.conn.close()
                slot.conn = None

    def _migrate(self) -> None:
        with self._write() as cur:
            migrate_schema(
                cur,
                version_table="schema_version",
                migrations=MIGRATIONS,
                lock_key=_MIGRATION_LOCK,
                what=f"registry index {self.display_url}",
            )

    # -- writer liveness ----------------------------------------------------------------

    def hold_writer(self, token: str) -> WriterLease:
        """Hold `token`'s advisory lock until the lease is released or this process dies."""
        conn = self.connect(autocommit=True)
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (_WRITER_LOCK_CLASS, _writer_key(token)))
        return WriterLease(conn)

    def writer_alive(self, token: str) -> bool:
        with self._read() as cur:
            cur.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND "
                "classid = %s::int8::oid AND objid = %s::int8::oid AND objsubid = 2 AND granted)",
                (_WRITER_LOCK_CLASS, _writer_key(token)),
            )
            return bool(cur.fetchone()[0])

    # -- notifications ------------------------------------------------------------------

    @staticmethod
    def _notify(cur: psycopg.Cursor, **event: Any) -> None:
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(event, sort_keys=True)))

    def listen(
        self,
        callback: Callable[[dict[str, Any]], None],
        stop: threading.Event,
        *,
        ready: threading.Event | None = None,
        poll_s: float = 0.5,
    ) -> None:
        """Call `callback(event)` for every change announced on `CHANNEL` until `stop` is
        set; reconnects after errors. Events missed while disconnected are not replayed
        (`callback({"event": "reconnected"})` is called so the caller can resynchronise)."""
        first = True
        while not stop.is_set():
            try:
                with self.connect(autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if ready is not None:
                        ready.set()
                    if not first:
                        callback({"event": "reconnected"})
                    first = False
                    while not stop.is_set():
                        for note in conn.notifies(timeout=poll_s, stop_after=1):
                            try:
                                event = json.loads(note.payload)
                            except ValueError:
                                continue
                            try:
                                callback(event)
                            except Exception:
                                logger.exception("registry event handler failed on %s", event)
            except (RegistryError, psycopg.Error) as exc:
                logger.warning(
                    "registry event listener (%s): %s; retrying",
                    self.display_url,
                    self._scrub(str(exc)),
                )
                stop.wait(1.0)

    # -- rows <-> records ---------------------------------------------------------------

    @staticmethod
    def _files(cur: psycopg.Cursor, name: str, version: int) -> dict[str, FileRecord]:
        cur.execute(
            "SELECT filename, sha256, size FROM files WHERE name = %s AND version = %s "
            "ORDER BY filename",
            (name, version),
        )
        return {f: FileRecord(sha256=h, size=s) for f, h, s in cur.fetchall()}

    @staticmethod
    def _aliases_of(cur: psycopg.Cursor, name: str) -> dict[str, int]:
        cur.execute("SELECT alias, version FROM aliases WHERE name = %s ORDER BY alias", (name,))
        return dict(cur.fetchall())

    def _records(self, cur: psycopg.Cursor, rows: list[tuple[Any, ...]]) -> list[VersionRecord]:
        alias_cache: dict[str, dict[str, int]] = {}
        out = []
        for row in rows:
            name, version = row[0], row[1]
            if name not in alias_cache:
                alias_cache[name] = self._aliases_of(cur, name)
            files = self._files(cur, name, version)
            out.append(SQLiteIndex._record(row, files, alias_cache[name]))
        return out

    def _select(self, cur: psycopg.Cursor, where: str, params: tuple[Any, ...]) -> list[Any]:
        cur.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE {where}", params)
        return self._records(cur, cur.fetchall())

    # -- Index --------------------------------------------------------------------------

    def allocate(self, name: str, *, writer: str, pid: int, host: str, created: float) -> int:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO adapters (name, next_version, created) VALUES (%s, 1, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, created),
            )
            # The row lock this UPDATE takes serialises concurrent allocations.
            cur.execute(
                "UPDATE adapters SET next_version = next_version + 1 WHERE name = %s "
                "RETURNING next_version - 1",
                (name,),
            )
            (version,) = cur.fetchone()
            cur.execute(
                "INSERT INTO versions (name, version, status, created, writer, writer_pid, "
                "writer_host) VALUES (%s, %s, 'pending', %s, %s, %s, %s)",
                (name, version, created, writer, pid, host),
            )
        return version

    def commit(self, record: VersionRecord, *, alias: str | None = None) -> None:
        with self._write() as cur:
            cur.execute(
                "UPDATE versions SET status = 'ready', writer = NULL, base_model_id = %s, "
                "base_fingerprint = %s, rank = %s, alpha = %s, target_modules = %s, "
                "description = %s, metadata = %s, lineage = %s, kind = %s "
                "WHERE name = %s AND version = %s AND status = 'pending'",
                (*metadata_values(record), record.name, record.version),
            )
            if cur.rowcount != 1:
                raise RegistryError(
                    f"{record.key} is no longer pending (was its writer judged dead?)"
                )
            cur.executemany(
                "INSERT INTO files (name, version, filename, sha256, size) "
                "VALUES (%s, %s, %s, %s, %s)",
                file_rows(record),
            )
            if alias is not None:
                self._upsert_alias(cur, record.name, alias, record.version, record.created)

    def insert_record(self, record: VersionRecord, *, next_version: int) -> None:
        """Insert a ready or deleted row as-is, keeping its number (`registry copy`);
        `next_version` raises the adapter's counter to at least that value."""
        with self._write() as cur:
            cur.execute(
                "INSERT INTO adapters (name, next_version, created) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET next_version = "
                "GREATEST(adapters.next_version, excluded.next_version)",
                (record.name, next_version, record.created),
            )
            cur.execute(
                "INSERT INTO versions (name, version, status, created, deleted, base_model_id, "
                "base_fingerprint, rank, alpha, target_modules, description, metadata, "
                "lineage, kind) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    record.name,
                    record.version,
                    record.status,
                    record.created,
                    record.deleted,
                    *metadata_values(record),
                ),
            )
            cur.executemany(
                "INSERT INTO files (name, version, filename, sha256, size) "
                "VALUES (%s, %s, %s, %s, %s)",
                file_rows(record),
            )

    def next_version(self, name: str) -> int:
        """The number the next version of `name` would get (1 if it is unknown)."""
        with self._read() as cur:
            cur.execute("SELECT next_version FROM adapters WHERE name = %s", (name,))
            row = cur.fetchone()
        return row[0] if row else 1

    def discard_pending(self, name: str, version: int) -> bool:
        with self._write() as cur:
            cur.execute(
                "DELETE FROM versions WHERE name = %s AND version = %s AND status = 'pending'",
                (name, version),
            )
            return cur.rowcount == 1

    def pending(self) -> list[PendingVersion]:
        with self._read() as cur:
            cur.execute(
                "SELECT name, version, writer, created, writer_pid, writer_host FROM versions "
                "WHERE status = 'pending' ORDER BY name, version"
            )
            rows = cur.fetchall()
        return [
            PendingVersion(
                name=n, version=v, writer=w or "", created=c, writer_pid=p, writer_host=h
            )
            for n, v, w, c, p, h in rows
        ]

    def get(self, name: str, version: int) -> VersionRecord | None:
        with self._read() as cur:
            records = self._select(cur, "name = %s AND version = %s", (name, version))
        return records[0] if records else None

    def latest(self, name: str) -> VersionRecord | None:
        with self._read() as cur:
            records = self._select(
                cur, "name = %s AND status = 'ready' ORDER BY version DESC LIMIT 1", (name,)
            )
        return records[0] if records else None

    def versions(self, name: str, *, include_deleted: bool = False) -> list[VersionRecord]:
        statuses = ["ready", "deleted"] if include_deleted else ["ready"]
        with self._read() as cur:
            return self._select(
                cur, "name = %s AND status = ANY(%s) ORDER BY version", (name, statuses)
            )

    def ready_versions(self) -> list[VersionRecord]:
        with self._read() as cur:
            return self._select(cur, "status = 'ready' ORDER BY name, version", ())

    def all_versions(self) -> list[VersionRecord]:
        """Every ready and deleted row, by name then version (`registry copy`)."""
        with self._read() as cur:
            return self._select(cur, "status <> 'pending' ORDER BY name, version", ())

    def known_name(self, name: str) -> bool:
        with self._read() as cur:
            cur.execute("SELECT 1 FROM adapters WHERE name = %s", (name,))
            return cur.fetchone() is not None

    def mark_deleted(
        self, name: str, version: int, *, force: bool, deleted: float
    ) -> VersionRecord:
        with self._write() as cur:
            # The row lock orders this against a concurrent set_alias on the same version.
            cur.execute(
                "SELECT 1 FROM versions WHERE name = %s AND version = %s AND status = 'ready' "
                "FOR UPDATE",
                (name, version),
            )
            if cur.fetchone() is None:
                raise AdapterVersionNotFoundError(
                    f"adapter {name}@{version} does not exist", param="model"
                )
            record = self._select(cur, "name = %s AND version = %s", (name, version))[0]
            if record.aliases and not force:
                raise VersionConflictError(
                    f"{record.key} is the target of alias(es) {', '.join(record.aliases)}; "
                    "move or delete them first (or force the deletion to drop them too)",
                    param="version",
                )
            cur.execute("DELETE FROM aliases WHERE name = %s AND version = %s", (name, version))
            cur.execute(
                "UPDATE versions SET status = 'deleted', deleted = %s "
                "WHERE name = %s AND version = %s",
                (deleted, name, version),
            )
            self._notify(cur, event="deleted", name=name, version=version)
        return record

    def _upsert_alias(
        self, cur: psycopg.Cursor, name: str, alias: str, version: int, updated: float
    ) -> int | None:
        cur.execute(
            "SELECT version FROM aliases WHERE name = %s AND alias = %s FOR UPDATE",
            (name, alias),
        )
        row = cur.fetchone()
        cur.execute(
            "INSERT INTO aliases (name, alias, version, updated) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, "
            "updated = excluded.updated",
            (name, alias, version, updated),
        )
        self._notify(
            cur,
            event="alias",
            name=name,
            alias=alias,
            version=version,
            previous=row[0] if row else None,
        )
        return row[0] if row else None

    def set_alias(self, name: str, alias: str, version: int, *, updated: float) -> int | None:
        with self._write() as cur:
            cur.execute(
                "SELECT status FROM versions WHERE name = %s AND version = %s FOR SHARE",
                (name, version),
            )
            row = cur.fetchone()
            if row is None or row[0] != "ready":
                state = "was deleted" if row and row[0] == "deleted" else "does not exist"
                raise AdapterVersionNotFoundError(
                    f"cannot point alias {alias!r} at {name}@{version}: that version {state}",
                    param="version",
                )
            return self._upsert_alias(cur, name, alias, version, updated)

    def delete_alias(self, name: str, alias: str) -> int:
        with self._write() as cur:
            cur.execute(
                "DELETE FROM aliases WHERE name = %s AND alias = %s RETURNING version",
                (name, alias),
            )
            row = cur.fetchone()
            if row is None:
                raise AliasNotFoundError(f"adapter {name!r} has no alias {alias!r}", param="alias")
            self._notify(cur, event="alias", name=name, alias=alias, version=None, previous=row[0])
        return row[0]

    def resolve_alias(self, name: str, alias: str) -> int | None:
        with self._read() as cur:
            cur.execute("SELECT version FROM aliases WHERE name = %s AND alias = %s", (name, alias))
            row = cur.fetchone()
        return row[0] if row else None

    def aliases(self, name: str) -> dict[str, int]:
        with self._read() as cur:
            return self._aliases_of(cur, name)
