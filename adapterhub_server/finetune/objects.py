"""Where a shared registry's fine-tuning data lives: uploaded files and checkpoints.

Fine-tuning objects are mutable working data, not published adapters, so they stay out of
the registry's content-addressed layout (and out of its `gc`): they live under a
`fine-tuning/` prefix of the same blob store, by key:

    fine-tuning/files/<file id>.jsonl
    fine-tuning/jobs/<job id>/checkpoints/<step dir>/<relative path>

A directory (`file:///path` blobs) or an S3 bucket (`s3://bucket/prefix` blobs) holds them;
`objects_for(blob_store)` picks the one that matches the registry's blob store. Writers put
an object completely before the index names it (a crash leaves an unnamed object, never a
named partial one).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

PREFIX = "fine-tuning"


class ObjectStore(Protocol):
    """Whole files by key (`/`-separated, no leading slash)."""

    url: str

    def put(self, key: str, source: Path) -> None:
        """Store `source`'s bytes under `key`, replacing what was there (all or nothing)."""
        ...

    def get(self, key: str, dest: Path) -> None:
        """Write `key`'s bytes to `dest` (atomically); FileNotFoundError if absent."""
        ...

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key that starts with `prefix`, in no promised order."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; how many were deleted."""
        ...


class DirectoryObjects:
    """`ObjectStore` on a directory (a local or network file system)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    def put(self, key: str, source: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(source, dest)

    def get(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(f"{self.url}/{key}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(source, dest)

    def keys(self, prefix: str) -> Iterator[str]:
        base = self.root.resolve()
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(base).as_posix()
                if key.startswith(prefix):
                    yield key

    def delete_prefix(self, prefix: str) -> int:
        doomed = list(self.keys(prefix))
        for key in doomed:
            self._path(key).unlink(missing_ok=True)
        # Empty directories left behind are removed bottom-up; others stay.
        top = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else None
        if top is not None and top.is_dir():
            for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
        return len(doomed)


class S3Objects:
    """`ObjectStore` on `s3://bucket/prefix` through a boto3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"

    def put(self, key: str, source: Path) -> None:
        # upload_file switches to multipart for big checkpoints; S3 makes an object visible
        # only when its upload completes.
        self.client.upload_file(str(source), self.bucket, self.prefix + key)

    def get(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{secrets.token_hex(6)}-{dest.name}")
        try:
            self.client.download_file(self.bucket, self.prefix + key, str(tmp))
            os.replace(tmp, dest)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.url}{key}") from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix) :]

    def delete_prefix(self, prefix: str) -> int:
        doomed = list(self.keys(prefix))
        for start in range(0, len(doomed), 1000):  # DeleteObjects takes at most 1000 keys
            batch = doomed[start : start + 1000]
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self.prefix + k} for k in batch], "Quiet": True},
            )
        return len(doomed)


def objects_for(blob_store: Any) -> ObjectStore:
    """The fine-tuning object store beside a registry's blob store (same directory or
    bucket, under `fine-tuning/`)."""
    from adapterhub_server.registry.local import LocalBlobStore

    if isinstance(blob_store, LocalBlobStore):
        return DirectoryObjects(blob_store.root / PREFIX)
    from adapterhub_server.registry.s3_blobs import S3BlobStore

    if isinstance(blob_store, S3BlobStore):
        return S3Objects(blob_store.client, blob_store.bucket, blob_store.prefix + PREFIX)
    raise TypeError(f"no fine-tuning object store for {type(blob_store).__name__}")


def upload_tree(objects: ObjectStore, source: Path, prefix: str) -> int:
    """Put every file under `source` at `prefix/<relative path>`; how many."""
    count = 0
    for path in sorted(source.rglob("*")):
        if path.is_file():
            objects.put(f"{prefix}/{path.relative_to(source).as_posix()}", path)
            count += 1
    return count


def download_tree(objects: ObjectStore, prefix: str, dest: Path) -> int:
    """Get every object under `prefix/` into `dest/<relative path>`; how many."""
    count = 0
    base = prefix.rstrip("/") + "/"
    for key in sorted(objects.keys(base)):
        relative = key[len(base) :]
        target = (dest / relative).resolve()
        if not target.is_relative_to(dest.resolve()):
            raise ValueError(f"object key {key!r} leaves {dest}")
        objects.get(key, target)
        count += 1
    return count


def _copy_atomic(source: Path, dest: Path) -> None:
    tmp = dest.with_name(f".tmp-{secrets.token_hex(6)}-{dest.name}")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
