"""`open_registry`: one entry point for every registry location.

- a directory (`str` or path): the embedded store (`local.py`: files plus SQLite), as always;
- `postgresql://user:password@host:port/db[?sslmode=...]` (or `postgres://`): a shared
  index in PostgreSQL (`postgres_index.py`) plus a blob store named by `blobs`, or by
  `$ADAPTERHUB_REGISTRY_BLOBS`:
    - `file:///path`: version directories under a local or network file system path
      (writer liveness by flock, so a network file system needs working locks);
    - `s3://bucket[/prefix]`: an S3-compatible object store (`s3_blobs.py`), endpoint and
      credentials from the standard AWS environment variables.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

from adapterhub_server.registry.errors import RegistryError
from adapterhub_server.registry.local import LocalBlobStore

BLOBS_ENV = "ADAPTERHUB_REGISTRY_BLOBS"

URL_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(value: object) -> bool:
    return isinstance(value, str) and value.split("://", 1)[0].lower() in URL_SCHEMES


def redact_url(url: str) -> str:
    """`url` with any password (in the userinfo or a `password=` parameter) replaced."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostport}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, "***" if k.lower() == "password" else v) for k, v in query]
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(query, safe="/*"), "")
    )


def is_registry_url(value: object) -> bool:
    """Whether `value` names a shared (database-backed) registry rather than a directory."""
    return is_postgres_url(value)


def registry_location(value: str) -> str | Path:
    """argparse `type=` for --registry: a URL stays a string, anything else is a path."""
    return value if is_registry_url(value) else Path(value).expanduser()


def describe_location(value: object) -> str:
    """`value` as it may be logged or shown (passwords redacted)."""
    return redact_url(value) if is_registry_url(value) else str(value)


def open_blob_store(url: str, *, leases: Any) -> Any:
    """`file:///path` or `s3://bucket/prefix` as a `BlobStore`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise RegistryError(f"--registry-blobs {url!r}: file URLs must be file:///path")
        return LocalBlobStore(Path(urllib.parse.unquote(parts.path)))
    if parts.scheme == "s3":
        from adapterhub_server.registry.s3_blobs import S3BlobStore

        if not parts.netloc:
            raise RegistryError(f"--registry-blobs {url!r}: expected s3://bucket[/prefix]")
        return S3BlobStore(parts.netloc, parts.path.strip("/"), leases=leases)
    raise RegistryError(f"--registry-blobs {url!r}: expected file:///path or s3://bucket[/prefix]")


def open_registry(
    location: str | os.PathLike | None = None, blobs: str | None = None, **kwargs: Any
):
    """Open the registry at `location` (a directory or a `postgresql://` URL; default
    `default_registry_dir()`); `kwargs` are `Registry.open`'s (base, limits, recover, ...).

    `blobs` (default `$ADAPTERHUB_REGISTRY_BLOBS`) is required with a URL and refused with
    a directory, which holds its own files.
    """
    from adapterhub_server.registry.registry import Registry

    if not is_registry_url(location):
        if blobs:
            raise RegistryError(
                "--registry-blobs is only for a postgresql:// registry; a directory registry "
                "keeps its files inside the directory"
            )
        return Registry.open(location, **kwargs)
    blobs = blobs or os.environ.get(BLOBS_ENV) or None
    if not blobs:
        raise RegistryError(
            f"the registry {redact_url(str(location))} needs a blob store: pass "
            f"--registry-blobs file:///path or s3://bucket/prefix (or set {BLOBS_ENV})"
        )
    kwargs.pop("busy_timeout_s", None)
    try:
        from adapterhub_server.registry.postgres_index import PostgresIndex
    except ImportError as exc:
        raise RegistryError(
            f"a postgresql:// registry needs psycopg ({exc}); install adapterhub[cluster]"
        ) from None
    index = PostgresIndex(str(location))
    try:
        store = open_blob_store(blobs, leases=index)
        registry = Registry(store, index, **kwargs)
    except BaseException:
        index.close()
        raise
    registry.url = index.display_url
    return registry
