"""The column values of a version row and its file rows, shared by every `Index`
implementation (SQLite, PostgreSQL): one place decides how a record is stored."""

from __future__ import annotations

import json

from adapterhub_server.registry.records import VersionRecord

METADATA_COLUMNS = (
    "base_model_id",
    "base_fingerprint",
    "rank",
    "alpha",
    "target_modules",
    "description",
    "metadata",
    "lineage",
    "kind",
)
"""The `versions` columns a commit fills in, in the order `metadata_values` gives them."""


def metadata_values(record: VersionRecord) -> tuple[object, ...]:
    """`record`'s values for `METADATA_COLUMNS` (JSON text for the structured ones)."""
    lineage = (
        json.dumps(record.lineage.to_dict(), sort_keys=True, allow_nan=False)
        if record.lineage is not None
        else None
    )
    return (
        record.base_model_id,
        record.base_fingerprint,
        record.rank,
        record.alpha,
        json.dumps(list(record.target_modules)),
        record.description,
        json.dumps(dict(record.metadata), sort_keys=True, allow_nan=False),
        lineage,
        record.kind,
    )


def file_rows(record: VersionRecord) -> list[tuple[str, int, str, str, int]]:
    """One `files` row (name, version, filename, sha256, size) per file of `record`."""
    return [(record.name, record.version, f, r.sha256, r.size) for f, r in record.files.items()]
