"""The two halves of a registry store: blob storage and an index.

The embedded default (`local.py`) keeps blobs in a directory and the index in SQLite. A
multi-machine deployment can back the same `Registry` with an object store and a shared
database by implementing these protocols; nothing above them touches paths or SQL.

Write protocol, and what each half guarantees so that a writer killed at any point leaves
either no version or a whole one:

1. `BlobStore.begin()`: a private staging area plus a liveness token that stays "alive"
   exactly as long as the writing process does (the local store holds an flock).
2. The registry writes, hashes, fsyncs and validates the files inside the staging area.
3. `Index.allocate()`: one transaction reserves the next number (never reused) and inserts
   a `pending` row carrying the writer's token.
4. `BlobStore.publish()`: one atomic step makes the files visible at (name, version).
5. `Index.commit()`: one transaction flips the row to `ready` (plus an optional alias).
6. `BlobStore.release()`: the token dies.

Anyone may then recover: a `pending` row whose writer token is dead is discarded together
with its published files; staging areas of dead writers are removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from adapterhub_server.registry.records import PendingVersion, VersionRecord


@dataclass
class Staging:
    """A writer's private area; `path` is a local directory on the blob store's file system."""

    token: str
    """Liveness token, recorded in the pending index row."""
    path: Path
    """Directory to write the version's files into."""
    handle: object = None
    """Store-private state (the local store keeps the lock's file descriptor here)."""


class BlobStore(Protocol):
    """Immutable version directories addressed by (name, version)."""

    def begin(self) -> Staging:
        """Create a staging area and start holding its liveness token."""

    def publish(self, staging: Staging, name: str, version: int) -> None:
        """Durably and atomically make the staged files the contents of (name, version).

        Raises if (name, version) already exists: versions are never overwritten.
        """

    def abort(self, staging: Staging, name: str | None, version: int | None) -> None:
        """Drop the staging area and, if given, the files published at (name, version)."""

    def release(self, staging: Staging) -> None:
        """Stop holding the liveness token (after the index row is final)."""

    def writer_alive(self, token: str) -> bool:
        """Whether the writer that holds `token` may still commit."""

    def version_path(self, name: str, version: int) -> Path:
        """Local directory holding the version's files (what the engine loads)."""

    def open(self, name: str, version: int, filename: str) -> BinaryIO:
        """Open one stored file for reading (unverified; the registry checks hashes)."""

    def list_files(self, name: str, version: int) -> Sequence[str]:
        """Names of the files stored for (name, version); empty if it is not stored."""

    def remove(self, name: str, version: int) -> bool:
        """Delete the version's files; False if there were none."""

    def stored_versions(self) -> Iterator[tuple[str, int]]:
        """Every (name, version) with files in the store, published or orphaned."""

    def collect_garbage(self, *, dry_run: bool = False) -> list[str]:
        """Remove what needs no index to judge: dead writers' staging areas, half-deleted
        versions, entries that cannot be versions. Returns what was (or would be) removed."""


class Index(Protocol):
    """The authoritative list of versions, their metadata, and aliases."""

    def allocate(self, name: str, *, writer: str, pid: int, host: str, created: float) -> int:
        """Reserve the next version number of `name` and insert its `pending` row."""

    def commit(self, record: VersionRecord, *, alias: str | None = None) -> None:
        """Turn the pending row into `record` (status ready), and set `alias` if given."""

    def discard_pending(self, name: str, version: int) -> bool:
        """Delete a pending row (its number stays used); False if it was not pending."""

    def pending(self) -> list[PendingVersion]:
        """Every pending row."""

    def get(self, name: str, version: int) -> VersionRecord | None:
        """The row for (name, version) in any status, or None if never allocated."""

    def latest(self, name: str) -> VersionRecord | None:
        """The newest ready version of `name`."""

    def versions(self, name: str, *, include_deleted: bool = False) -> list[VersionRecord]:
        """Ready (and optionally deleted) versions of `name`, oldest first."""

    def ready_versions(self) -> list[VersionRecord]:
        """Every ready version of every adapter, by name then version."""

    def known_name(self, name: str) -> bool:
        """Whether `name` ever had a version allocated."""

    def mark_deleted(
        self, name: str, version: int, *, force: bool, deleted: float
    ) -> VersionRecord:
        """Tombstone a ready version; with force, also drop the aliases that point at it."""

    def set_alias(self, name: str, alias: str, version: int, *, updated: float) -> int | None:
        """Point `alias` at a ready version; returns the version it pointed at before."""

    def delete_alias(self, name: str, alias: str) -> int:
        """Remove an alias; returns the version it pointed at."""

    def resolve_alias(self, name: str, alias: str) -> int | None:
        """The version `alias` points at, or None."""

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version for `name`."""

    def close(self) -> None:
        """Release connections."""
