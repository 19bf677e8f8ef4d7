"""Embedded store: version directories on the local file system and an SQLite (WAL) index.

Layout under the registry root:

    registry.db (+ -wal, -shm)             the index (see SCHEMA)
    adapters/<name>/<version>/             one immutable version: files 0444, directory 0555
        adapter_config.json
        adapter_model.safetensors
    .staging/<token>.lock                  a live writer holds an flock on it
    .staging/<token>.d/                    that writer's files until they are published
    .trash/                                versions being deleted (renamed here, then removed)

Staging lives under the root so that publishing is one `rename(2)` on one file system.
Writer liveness uses `flock`: the kernel drops the lock when the process dies, even on
SIGKILL, so a dead writer is detected without trusting pids (which get reused) or clocks.
SQLite WAL and flock need a local file system; a registry shared across machines should
implement `BlobStore` / `Index` on an object store and a database server instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from adapterhub_server.errors import InvalidRequestError
from adapterhub_server.registry.errors import (
    AdapterVersionNotFoundError,
    AliasNotFoundError,
    RegistryError,
    VersionConflictError,
)
from adapterhub_server.registry.index_rows import file_rows, metadata_values
from adapterhub_server.registry.interface import Staging
from adapterhub_server.registry.records import (
    LEGACY_KIND,
    FileRecord,
    Lineage,
    PendingVersion,
    VersionRecord,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "registry.db"
ADAPTERS_DIR = "adapters"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"

_FILE_MODE = 0o444
_DIR_MODE = 0o555
_WRITABLE_DIR_MODE = 0o755


@contextlib.contextmanager
def sqlite_transaction(conn: sqlite3.Connection, begin: str) -> Iterator[sqlite3.Connection]:
    """`begin` (e.g. ``BEGIN IMMEDIATE``) on a connection in autocommit mode; COMMIT on
    exit, ROLLBACK on an exception (also after a failed COMMIT, so the connection is usable
    again)."""
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename or create inside it) across power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_writable_tree(path: Path) -> None:
    # Versions are published read-only; unlinking their files needs a writable directory.
    for dirpath, dirnames, _ in os.walk(path):
        os.chmod(dirpath, _WRITABLE_DIR_MODE)
        for d in dirnames:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, d), _WRITABLE_DIR_MODE)


def _rmtree(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    with contextlib.suppress(OSError):
        _make_writable_tree(path)
    shutil.rmtree(path, ignore_errors=True)


class LocalBlobStore:
    """`BlobStore` on a local directory (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.adapters_dir = self.root / ADAPTERS_DIR
        self.staging_dir = self.root / STAGING_DIR
        self.trash_dir = self.root / TRASH_DIR
        for directory in (self.root, self.adapters_dir, self.staging_dir, self.trash_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # -- writing ------------------------------------------------------------------------

    def begin(self) -> Staging:
        while True:
            token = f"{os.getpid()}-{secrets.token_hex(8)}"
            lock_path = self.staging_dir / f"{token}.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A collector may have judged the brand-new, not yet locked file dead and
            # unlinked it; then this lock guards nothing. Start over with a fresh token.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        path = self.staging_dir / f"{token}.d"
        path.mkdir()
        return Staging(token=token, path=path, handle=fd)

    def publish(self, staging: Staging, name: str, version: int) -> None:
        for entry in staging.path.iterdir():
            os.chmod(entry, _FILE_MODE)
        fsync_dir(staging.path)
        final = self.version_path(name, version)
        for attempt in range(3):
            parent_created = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            if parent_created:
                fsync_dir(self.adapters_dir)
            if final.exists():
                # No path in the message: it reaches clients (the log has the root).
                logger.error("%s exists before %s@%d was published", final, name, version)
                raise RegistryError(
                    f"refusing to overwrite version {name}@{version}: it already has files"
                )
            try:
                os.rename(staging.path, final)
                break
            except FileNotFoundError:
                # gc removed the (empty) name directory between mkdir and rename.
                if attempt == 2:
                    raise
        fsync_dir(final.parent)
        # Read-only after the rename: moving a directory to a new parent needs write
        # permission on it (to update its ".." entry).
        os.chmod(final, _DIR_MODE)

    def abort(self, staging: Staging, name: str | None, version: int | None) -> None:
        _rmtree(staging.path)
        if name is not None and version is not None:
            self.remove(name, version)

    def release(self, staging: Staging) -> None:
        fd = staging.handle
        if not isinstance(fd, int):
            return
        # Unlink while still holding the lock, so nobody sees it unlocked and present.
        (self.staging_dir / f"{staging.token}.lock").unlink(missing_ok=True)
        os.close(fd)
        staging.handle = None

    def writer_alive(self, token: str) -> bool:
        if "/" in token or token.startswith("."):
            return False
        try:
            fd = os.open(self.staging_dir / f"{token}.lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)  # also drops the lock if we got it
        return False

    # -- reading ------------------------------------------------------------------------

    def version_path(self, name: str, version: int) -> Path:
        return self.adapters_dir / name / str(version)

    def open(self, name: str, version: int, filename: str) -> BinaryIO:
        if "/" in filename or filename.startswith("."):
            raise ValueError(f"invalid file name {filename!r}")
        return open(self.version_path(name, version) / filename, "rb")

    def list_files(self, name: str, version: int) -> Sequence[str]:
        path = self.version_path(name, version)
        try:
            return sorted(entry.name for entry in path.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- removal ------------------------------------------------------------------------

    def remove(self, name: str, version: int) -> bool:
        final = self.version_path(name, version)
        if not final.exists():
            return False
        # Rename first so the version disappears in one step; the slow unlinks come after.
        doomed = self.trash_dir / f"{name}@{version}-{secrets.token_hex(4)}"
        os.chmod(final, _WRITABLE_DIR_MODE)
        try:
            os.rename(final, doomed)
        except FileNotFoundError:
            return False  # a concurrent remover won
        fsync_dir(final.parent)
        _rmtree(doomed)
        return True

    def stored_versions(self) -> Iterator[tuple[str, int]]:
        for name_dir in sorted(self.adapters_dir.iterdir()):
            if not name_dir.is_dir():
                continue
            for version_dir in sorted(name_dir.iterdir()):
                if version_dir.name.isdigit():
                    yield name_dir.name, int(version_dir.name)

    def _remove_unknown(self, *, dry_run: bool) -> list[str]:
        # Entries under adapters/ that cannot be versions (stray files, links, bad names).
        removed = []
        for name_dir in sorted(self.adapters_dir.iterdir()):
            if not name_dir.is_dir() or name_dir.is_symlink():
                removed.append(str(name_dir))
                if not dry_run:
                    name_dir.unlink(missing_ok=True)
                continue
            for entry in sorted(name_dir.iterdir()):
                if not entry.name.isdigit() or entry.is_symlink() or not entry.is_dir():
                    removed.append(str(entry))
                    if not dry_run:
                        _rmtree(entry)
        return removed

    def collect_garbage(self, *, dry_run: bool = False) -> list[str]:
        removed: list[str] = self._remove_unknown(dry_run=dry_run)
        tokens = set()
        for entry in self.staging_dir.iterdir():
            stem, _, suffix = entry.name.rpartition(".")
            tokens.add(stem if suffix in ("lock", "d") else entry.name)
        for token in sorted(tokens):
            lock_path = self.staging_dir / f"{token}.lock"
            data_path = self.staging_dir / f"{token}.d"
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as exc:
                        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                            continue  # the writer is alive
                        raise
                elif data_path.exists() and time.time() - data_path.stat().st_mtime < 60:
                    # No lock file: either its writer died after cleanup started, or it
                    # is a writer between O_EXCL-create and mkdir; the age check keeps
                    # the latter safe.
                    continue
                for path in (data_path, self.staging_dir / token):
                    if path.exists() or path.is_symlink():
                        removed.append(str(path))
                        if not dry_run:
                            _rmtree(path)
                if fd is not None:
                    removed.append(str(lock_path))
                    if not dry_run:
                        lock_path.unlink(missing_ok=True)
            finally:
                if fd is not None:
                    os.close(fd)
        for entry in sorted(self.trash_dir.iterdir()):
            removed.append(str(entry))
            if not dry_run:
                _rmtree(entry)
        if removed and not dry_run:
            logger.info("removed %d stale staging/trash entries under %s", len(removed), self.root)
        return removed


# ---------------------------------------------------------------------------------------


SCHEMA_VERSION = 2
"""1: the first layout; 2: adds `versions.kind` (what an adapter version holds)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name          TEXT PRIMARY KEY,
    next_version  INTEGER NOT NULL,   -- never decreases: numbers are never reused
    created       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name             TEXT NOT NULL REFERENCES adapters(name),
    version          INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'ready', 'deleted')),
    created          REAL NOT NULL,
    deleted          REAL,
    writer           TEXT,            -- liveness token of the writer while pending
    writer_pid       INTEGER,
    writer_host      TEXT,
    base_model_id    TEXT,
    base_fingerprint TEXT,
    rank             INTEGER,
    alpha            REAL,
    target_modules   TEXT NOT NULL DEFAULT '[]',  -- JSON array
    description      TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',  -- JSON object
    lineage          TEXT,                        -- JSON object or NULL
    kind             TEXT,                        -- lora, dora, merge:ties, ... (records.adapter_kind)
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS versions_by_status ON versions(status, name, version);
CREATE TABLE IF NOT EXISTS files (
    name      TEXT NOT NULL,
    version   INTEGER NOT NULL,
    filename  TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    size      INTEGER NOT NULL,
    PRIMARY KEY (name, version, filename),
    FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS aliases (
    name     TEXT NOT NULL,
    alias    TEXT NOT NULL,
    version  INTEGER NOT NULL,
    updated  REAL NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES versions(name, version)
);
"""

_VERSION_COLUMNS = (
    "name, version, status, created, deleted, base_model_id, base_fingerprint, rank, alpha, "
    "target_modules, description, metadata, lineage, kind"
)


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _valid_text(text: str | bytes) -> str:
    """`text` with lone surrogates (which no encoder accepts) replaced by U+FFFD; a pair
    stored as two escapes becomes the character it encodes. A BLOB (bytes) is decoded."""
    if isinstance(text, bytes):
        return _decode_text(text)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _valid_json(value: Any) -> Any:
    if isinstance(value, str):
        return _valid_text(value)
    if isinstance(value, list):
        return [_valid_json(v) for v in value]
    if isinstance(value, dict):
        return {_valid_text(k): _valid_json(v) for k, v in value.items()}
    return value


def _decode_json(text: str | None, key: str, column: str) -> Any:
    """A JSON column as stored, made safe to encode again; None if it cannot be read.

    Pushes refuse text that is not valid Unicode (`records.encode_json_object`), but rows
    written before that check, or by other tools, may hold escaped lone surrogates: each is
    replaced rather than failing every listing that includes the row.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
        # Surrogates can only come from escapes (text_factory never decodes to one).
        return _valid_json(value) if "\\u" in text else value
    except (ValueError, RecursionError):
        logger.warning("%s: the index's %s column is not readable JSON; ignoring it", key, column)
        return None


def _decode_lineage(value: Any, key: str) -> Lineage | None:
    if not isinstance(value, dict):
        return None
    try:
        return Lineage.from_dict(value)
    except (InvalidRequestError, TypeError):
        logger.warning("%s: the index's lineage column is malformed; ignoring it", key)
        return None


class _Slot:
    """One connection of this process and the lock serialising its use."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.conn: sqlite3.Connection | None = None
        self.pid = -1


JOURNAL_MODE_ENV = "ADAPTERHUB_REGISTRY_JOURNAL_MODE"
JOURNAL_MODES = ("wal", "delete")


def journal_mode_from_env() -> str:
    """`wal` (default: one host), or `delete` for an index on a network file system shared by
    several hosts, where WAL's shared-memory index cannot work. Every process that opens the
    registry must use the same mode, hence an environment variable rather than a flag."""
    mode = os.environ.get(JOURNAL_MODE_ENV, "wal").strip().lower() or "wal"
    if mode not in JOURNAL_MODES:
        raise RegistryError(f"{JOURNAL_MODE_ENV}={mode!r}: expected one of {JOURNAL_MODES}")
    return mode


class SQLiteIndex:
    """`Index` in one SQLite file, safe for many processes and threads.

    WAL mode by default: readers never wait for writers, but every process must run on one
    host. `journal_mode="delete"` (the rollback journal) relies on file locks only, so
    several hosts can share the index over a network file system with working POSIX locks,
    at the price of readers and writers briefly waiting for each other.

    Every write is one `BEGIN IMMEDIATE` transaction: it takes the database's write lock
    up front, so two writers never both read the same `next_version`. `busy_timeout` makes
    a writer wait for the lock instead of failing.
    """

    def __init__(
        self, path: Path, *, busy_timeout_s: float = 30.0, journal_mode: str | None = None
    ) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.journal_mode = journal_mode or journal_mode_from_env()
        if self.journal_mode not in JOURNAL_MODES:
            raise RegistryError(f"journal_mode must be one of {JOURNAL_MODES}")
        # Two connections, each behind its own lock: a write waiting up to busy_timeout for
        # another process's transaction must not hold up reads on the engine's hot path
        # (WAL readers never wait for writers).
        self._slots = {"read": _Slot(), "write": _Slot()}
        with self._write() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            columns = {row[1] for row in conn.execute("PRAGMA table_info(versions)")}
            if "kind" not in columns:
                # An index written by schema 1: its rows read back as kind NULL (plain LoRA,
                # the only kind schema 1 servers accepted).
                conn.execute("ALTER TABLE versions ADD COLUMN kind TEXT")
            if found < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif found > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path} has index schema {found}; this version of adapterhub "
                    f"understands up to {SCHEMA_VERSION}"
                )

    # -- connection handling ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,  # explicit BEGIN/COMMIT below
            check_same_thread=False,  # each connection is guarded by its slot's lock
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            # Switching the journal mode needs a moment of exclusive access; when several
            # processes create the registry at once, some have to wait for it.
            try:
                mode = conn.execute(f"PRAGMA journal_mode = {self.journal_mode}").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if str(mode).lower() != self.journal_mode:
            logger.error("%s: cannot switch to journal mode %s", self.path, self.journal_mode)
            raise RegistryError(
                f"the registry index cannot switch to journal mode {self.journal_mode!r} (got "
                f"{mode!r}); every process opening the registry must use the same "
                f"{JOURNAL_MODE_ENV}"
            )
        # FULL: a commit is durable once it returns (NORMAL may lose the last ones).
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # Rows written by other tools (or older versions) may hold bytes that are not UTF-8;
        # a listing must not fail over one such row.
        conn.text_factory = _decode_text
        return conn

    def _connection(self, slot: _Slot) -> sqlite3.Connection:
        # A connection must not cross fork(): reopen in a child process.
        if slot.conn is None or slot.pid != os.getpid():
            slot.conn = self._connect()
            slot.pid = os.getpid()
        return slot.conn

    @contextlib.contextmanager
    def _transaction(self, kind: str, begin: str) -> Iterator[sqlite3.Connection]:
        slot = self._slots[kind]
        with slot.lock, sqlite_transaction(self._connection(slot), begin) as conn:
            yield conn

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: no read-then-upgrade deadlocks, and no
        # two writers reading the same next_version.
        return self._transaction("write", "BEGIN IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # One deferred transaction: the several SELECTs of one call see one snapshot.
        return self._transaction("read", "BEGIN")

    def close(self) -> None:
        for slot in self._slots.values():
            with slot.lock:
                if slot.conn is not None and slot.pid == os.getpid():
                    slot.conn.close()
                slot.conn = None

    # -- rows <-> records ---------------------------------------------------------------

    @staticmethod
    def _files(conn: sqlite3.Connection, name: str, version: int) -> dict[str, FileRecord]:
        rows = conn.execute(
            "SELECT filename, sha256, size FROM files WHERE name = ? AND version = ? "
            "ORDER BY filename",
            (name, version),
        )
        return {f: FileRecord(sha256=h, size=s) for f, h, s in rows}

    @staticmethod
    def _aliases_of(conn: sqlite3.Connection, name: str) -> dict[str, int]:
        rows = conn.execute(
            "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)
        )
        return dict(rows.fetchall())

    @staticmethod
    def _record(
        row: tuple[Any, ...], files: dict[str, FileRecord], aliases: dict[str, int]
    ) -> VersionRecord:
        (name, version, status, created, deleted, base_id, fingerprint, rank, alpha) = row[:9]
        targets, description, metadata, lineage, kind = row[9:]
        key = f"{name}@{version}"
        metadata = _decode_json(metadata, key, "metadata")
        targets = _decode_json(targets, key, "target_modules")
        lineage = _decode_json(lineage, key, "lineage") if lineage else None
        return VersionRecord(
            name=name,
            version=version,
            status=status,
            created=created,
            deleted=deleted,
            files=files,
            base_model_id=base_id,
            base_fingerprint=fingerprint,
            rank=rank,
            alpha=alpha,
            target_modules=tuple(t for t in targets if isinstance(t, str))
            if isinstance(targets, list)
            else (),
            description=_valid_text(description) if description is not None else None,
            metadata=metadata if isinstance(metadata, dict) else {},
            lineage=_decode_lineage(lineage, key),
            kind=_valid_text(kind)
            if kind is not None
            else (LEGACY_KIND if status == "ready" else None),
            aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
        )

    def _records(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]
    ) -> list[VersionRecord]:
        alias_cache: dict[str, dict[str, int]] = {}
        out = []
        for row in rows:
            name, version = row[0], row[1]
            if name not in alias_cache:
                alias_cache[name] = self._aliases_of(conn, name)
            out.append(self._record(row, self._files(conn, name, version), alias_cache[name]))
        return out

    # -- Index --------------------------------------------------------------------------

    def allocate(self, name: str, *, writer: str, pid: int, host: str, created: float) -> int:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO adapters (name, next_version, created) VALUES (?, 1, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (name, created),
            )
            (version,) = conn.execute(
                "SELECT next_version FROM adapters WHERE name = ?", (name,)
            ).fetchone()
            conn.execute(
                "UPDATE adapters SET next_version = next_version + 1 WHERE name = ?", (name,)
            )
            conn.execute(
                "INSERT INTO versions (name, version, status, created, writer, writer_pid, "
                "writer_host) VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                (name, version, created, writer, pid, host),
            )
        return version

    def commit(self, record: VersionRecord, *, alias: str | None = None) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE versions SET status = 'ready', writer = NULL, base_model_id = ?, "
                "base_fingerprint = ?, rank = ?, alpha = ?, target_modules = ?, "
                "description = ?, metadata = ?, lineage = ?, kind = ? "
                "WHERE name = ? AND version = ? AND status = 'pending'",
                (*metadata_values(record), record.name, record.version),
            )
            if cursor.rowcount != 1:
                raise RegistryError(
                    f"{record.key} is no longer pending (was its writer judged dead?)"
                )
            conn.executemany(
                "INSERT INTO files (name, version, filename, sha256, size) VALUES (?, ?, ?, ?, ?)",
                file_rows(record),
            )
            if alias is not None:
                self._upsert_alias(conn, record.name, alias, record.version, record.created)

    def insert_record(self, record: VersionRecord, *, next_version: int) -> None:
        """Insert a ready or deleted row as-is, keeping its number (`registry copy`);
        `next_version` raises the adapter's counter to at least that value."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO adapters (name, next_version, created) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET next_version = "
                "MAX(adapters.next_version, excluded.next_version)",
                (record.name, next_version, record.created),
            )
            conn.execute(
                "INSERT INTO versions (name, version, status, created, deleted, base_model_id, "
                "base_fingerprint, rank, alpha, target_modules, description, metadata, "
                "lineage, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.version,
                    record.status,
                    record.created,
                    record.deleted,
                    *metadata_values(record),
                ),
            )
            conn.executemany(
                "INSERT INTO files (name, version, filename, sha256, size) VALUES (?, ?, ?, ?, ?)",
                file_rows(record),
            )

    def next_version(self, name: str) -> int:
        """The number the next version of `name` would get (1 if it is unknown)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT next_version FROM adapters WHERE name = ?", (name,)
            ).fetchone()
        return row[0] if row else 1

    def all_versions(self) -> list[VersionRecord]:
        """Every ready and deleted row, by name then version (`registry copy`)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE status <> 'pending' "
                "ORDER BY name, version"
            ).fetchall()
            return self._records(conn, rows)

    def discard_pending(self, name: str, version: int) -> bool:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM files WHERE name = ? AND version = ? AND EXISTS (SELECT 1 FROM "
                "versions WHERE name = ? AND version = ? AND status = 'pending')",
                (name, version, name, version),
            )
            cursor = conn.execute(
                "DELETE FROM versions WHERE name = ? AND version = ? AND status = 'pending'",
                (name, version),
            )
            return cursor.rowcount == 1

    def pending(self) -> list[PendingVersion]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, version, writer, created, writer_pid, writer_host FROM versions "
                "WHERE status = 'pending' ORDER BY name, version"
            ).fetchall()
        return [
            PendingVersion(
                name=n, version=v, writer=w or "", created=c, writer_pid=p, writer_host=h
            )
            for n, v, w, c, p, h in rows
        ]

    def get(self, name: str, version: int) -> VersionRecord | None:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? AND version = ?",
                (name, version),
            ).fetchall()
            records = self._records(conn, rows)
        return records[0] if records else None

    def latest(self, name: str) -> VersionRecord | None:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? AND status = 'ready' "
                "ORDER BY version DESC LIMIT 1",
                (name,),
            ).fetchall()
            records = self._records(conn, rows)
        return records[0] if records else None

    def versions(self, name: str, *, include_deleted: bool = False) -> list[VersionRecord]:
        statuses = ("ready", "deleted") if include_deleted else ("ready",)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? "
                f"AND status IN ({', '.join('?' * len(statuses))}) ORDER BY version",
                (name, *statuses),
            ).fetchall()
            return self._records(conn, rows)

    def ready_versions(self) -> list[VersionRecord]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE status = 'ready' "
                "ORDER BY name, version"
            ).fetchall()
            return self._records(conn, rows)

    def known_name(self, name: str) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone()
        return row is not None

    def mark_deleted(
        self, name: str, version: int, *, force: bool, deleted: float
    ) -> VersionRecord:
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? AND version = ? "
                "AND status = 'ready'",
                (name, version),
            ).fetchall()
            if not rows:
                raise AdapterVersionNotFoundError(
                    f"adapter {name}@{version} does not exist", param="model"
                )
            record = self._records(conn, rows)[0]
            if record.aliases and not force:
                raise VersionConflictError(
                    f"{record.key} is the target of alias(es) {', '.join(record.aliases)}; "
                    "move or delete them first (or force the deletion to drop them too)",
                    param="version",
                )
            conn.execute("DELETE FROM aliases WHERE name = ? AND version = ?", (name, version))
            conn.execute(
                "UPDATE versions SET status = 'deleted', deleted = ? WHERE name = ? AND version = ?",
                (deleted, name, version),
            )
        return record

    @staticmethod
    def _upsert_alias(
        conn: sqlite3.Connection, name: str, alias: str, version: int, updated: float
    ) -> int | None:
        row = conn.execute(
            "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
        ).fetchone()
        conn.execute(
            "INSERT INTO aliases (name, alias, version, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, "
            "updated = excluded.updated",
            (name, alias, version, updated),
        )
        return row[0] if row else None

    def set_alias(self, name: str, alias: str, version: int, *, updated: float) -> int | None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT status FROM versions WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
            if row is None or row[0] != "ready":
                state = "was deleted" if row and row[0] == "deleted" else "does not exist"
                raise AdapterVersionNotFoundError(
                    f"cannot point alias {alias!r} at {name}@{version}: that version {state}",
                    param="version",
                )
            return self._upsert_alias(conn, name, alias, version, updated)

    def delete_alias(self, name: str, alias: str) -> int:
        with self._write() as conn:
            row = conn.execute(
                "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
            ).fetchone()
            if row is None:
                raise AliasNotFoundError(f"adapter {name!r} has no alias {alias!r}", param="alias")
            conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
        return row[0]

    def resolve_alias(self, name: str, alias: str) -> int | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
            ).fetchone()
        return row[0] if row else None

    def aliases(self, name: str) -> dict[str, int]:
        with self._read() as conn:
            return self._aliases_of(conn, name)
