"""`registry copy`: move every version between registry backends, keeping its identity.

Numbers, aliases, hashes, lineage and tombstones (deleted versions, whose numbers stay
used) are copied as they are; each version's files are read through the source's sha256
check and written to the destination's blob store before its index row, so a copy that
dies half-way leaves only orphans for `gc`. Re-running a copy skips versions the
destination already holds with the same files, and refuses ones that differ.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

from adapterhub_server.registry.errors import VersionConflictError
from adapterhub_server.registry.records import VersionRecord
from adapterhub_server.registry.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyReport:
    copied: tuple[str, ...]
    """`name@version` keys written (ready versions and tombstones)."""
    skipped: tuple[str, ...]
    """Keys the destination already held, identical."""
    aliases: int
    """Aliases set in the destination."""


def _copy_files(src: Registry, dst: Registry, record: VersionRecord) -> None:
    staging = dst.blobs.begin()
    published = False
    try:
        for filename in record.files:
            with (
                src.open_file(record.name, record.version, filename) as source,
                open(staging.path / filename, "wb") as out,
            ):
                shutil.copyfileobj(source, out, 1 << 20)
        dst.blobs.publish(staging, record.name, record.version)
        published = True
        dst.index.insert_record(record, next_version=src.index.next_version(record.name))
    except BaseException:
        dst.blobs.abort(staging, record.name if published else None, record.version)
        raise
    finally:
        dst.blobs.release(staging)


def copy_registry(src: Registry, dst: Registry) -> CopyReport:
    """Copy every ready and deleted version of `src` into `dst` (see the module docstring)."""
    copied, skipped = [], []
    records = src.index.all_versions()
    for record in records:
        existing = dst.index.get(record.name, record.version)
        if existing is not None:
            same = existing.status == record.status and (
                record.status != "ready"
                or {f: r.sha256 for f, r in existing.files.items()}
                == {f: r.sha256 for f, r in record.files.items()}
            )
            if not same:
                raise VersionConflictError(
                    f"{record.key} already exists in the destination with different "
                    f"contents or status ({existing.status}); refusing to overwrite it",
                    param="version",
                )
            skipped.append(record.key)
            continue
        if record.status == "ready":
            _copy_files(src, dst, record)
        else:
            dst.index.insert_record(record, next_version=src.index.next_version(record.name))
        copied.append(record.key)
        logger.info("copied %s (%s)", record.key, record.status)
    aliases = 0
    for name in sorted({r.name for r in records}):
        for alias, version in src.index.aliases(name).items():
            if dst.index.resolve_alias(name, alias) != version:
                dst.index.set_alias(name, alias, version, updated=time.time())
                aliases += 1
    return CopyReport(copied=tuple(copied), skipped=tuple(skipped), aliases=aliases)
