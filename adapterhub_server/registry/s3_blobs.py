"""`BlobStore` on S3 (or any S3-compatible object store), for a registry shared by hosts.

Layout under `s3://bucket/prefix/`:

    blobs/sha256/<hex>                     file contents, addressed by their sha256
    versions/<name>/<version>.json         manifest: {"files": {filename: {sha256, size}}}

Publishing uploads every blob first and the manifest last, before the index transaction
that makes the version ready, so a ready row always has all its bytes. Blobs are shared by
versions with identical files; a version is removed by deleting its manifest, and `gc`
deletes blobs no manifest references once they are older than `gc_grace_s` (a writer
uploads blobs before its manifest, so a younger unreferenced blob may be about to be
published; a blob that already exists is uploaded again, refreshing its age).

The engine loads from a local directory: `version_path` downloads a version into
`cache_dir/<name>/<version>/` on first use, verifying every file against the manifest.

Writer liveness cannot be a file lock on another host: it is delegated to `leases`
(the PostgreSQL index's advisory locks, `PostgresIndex.hold_writer`).
Endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from adapterhub_server.file_hash import hash_file, mismatch
from adapterhub_server.registry.errors import RegistryCorruptionError, RegistryError
from adapterhub_server.registry.interface import Staging
from adapterhub_server.registry.local import _rmtree, fsync_dir

logger = logging.getLogger(__name__)

GC_GRACE_S = 3600.0


class Leases(Protocol):
    def hold_writer(self, token: str) -> Any: ...

    def writer_alive(self, token: str) -> bool: ...


def default_cache_dir(bucket: str, prefix: str) -> Path:
    """`$ADAPTERHUB_REGISTRY_CACHE`, else `$XDG_CACHE_HOME/adapterhub/registry-cache`, with
    one subdirectory per bucket and prefix."""
    explicit = os.environ.get("ADAPTERHUB_REGISTRY_CACHE")
    if explicit:
        base = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adapterhub"
        base = base / "registry-cache"
    digest = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:16]
    return base / f"{bucket}-{digest}"


class S3BlobStore:
    """`BlobStore` on `s3://bucket/prefix` (see the module docstring)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        leases: Leases,
        cache_dir: Path | None = None,
        client: Any = None,
        gc_grace_s: float = GC_GRACE_S,
    ) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.leases = leases
        self.client = client or boto3.client("s3")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(bucket, prefix)
        self.staging_dir = self.cache_dir / ".staging"
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.gc_grace_s = gc_grace_s
        self._manifests: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def location(self, name: str, version: int) -> str:
        """Where (name, version)'s manifest is, for messages."""
        return f"s3://{self.bucket}/{self._manifest_key(name, version)}"

    def _blob_key(self, sha256: str) -> str:
        return f"{self.prefix}blobs/sha256/{sha256}"

    def _manifest_key(self, name: str, version: int) -> str:
        return f"{self.prefix}versions/{name}/{version}.json"

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _manifest(self, name: str, version: int) -> dict[str, dict[str, Any]] | None:
        cached = self._manifests.get((name, version))
        if cached is not None:
            return cached
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._manifest_key(name, version))
        except self.client.exceptions.NoSuchKey:
            return None
        files = json.loads(body["Body"].read())["files"]
        self._manifests[(name, version)] = files  # manifests are immutable
        return files

    # -- writing ------------------------------------------------------------------------

    def begin(self) -> Staging:
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        lease = self.leases.hold_writer(token)
        path = self.staging_dir / f"{token}.d"
        path.mkdir()
        return Staging(token=token, path=path, handle=lease)

    def publish(self, staging: Staging, name: str, version: int) -> None:
        manifest_key = self._manifest_key(name, version)
        if self._exists(manifest_key):
            logger.error("%s exists before %s@%d was published", manifest_key, name, version)
            raise RegistryError(
                f"refusing to overwrite version {name}@{version}: it already has files"
            )
        files = {}
        for entry in sorted(staging.path.iterdir()):
            sha256, size = hash_file(entry)
            # Uploaded even if present: refreshes its age, so gc cannot take it meanwhile.
            self.client.upload_file(str(entry), self.bucket, self._blob_key(sha256))
            files[entry.name] = {"sha256": sha256, "size": size}
        self.client.put_object(
            Bucket=self.bucket,
            Key=manifest_key,
            Body=json.dumps({"files": files}, sort_keys=True).encode(),
            ContentType="application/json",
        )
        _rmtree(staging.path)

    def abort(self, staging: Staging, name: str | None, version: int | None) -> None:
        _rmtree(staging.path)
        if name is not None and version is not None:
            self.remove(name, version)

    def release(self, staging: Staging) -> None:
        lease = staging.handle
        if lease is not None:
            lease.release()
            staging.handle = None
        _rmtree(staging.path)

    def writer_alive(self, token: str) -> bool:
        return self.leases.writer_alive(token)

    # -- reading ------------------------------------------------------------------------

    def version_path(self, name: str, version: int) -> Path:
        """The local copy of (name, version), downloaded and verified on first use; a path
        that does not exist if the version has no files in the store."""
        final = self.cache_dir / name / str(version)
        if final.is_dir():
            return final
        files = self._manifest(name, version)
        if files is None:
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
        try:
            for filename, expected in files.items():
                dest = tmp / filename
                self.client.download_file(
                    self.bucket, self._blob_key(expected["sha256"]), str(dest)
                )
                problem = mismatch(*hash_file(dest), expected["sha256"], expected["size"])
                if problem:
                    raise RegistryCorruptionError(f"{name}@{version}: {filename}: {problem}")
                os.chmod(dest, 0o444)
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # else a concurrent download won
                    raise
        finally:
            _rmtree(tmp)
        return final

    def open(self, name: str, version: int, filename: str) -> BinaryIO:
        if "/" in filename or filename.startswith("."):
            raise ValueError(f"invalid file name {filename!r}")
        files = self._manifest(name, version)
        if files is None or filename not in files:
            raise FileNotFoundError(2, "No such file or directory")
        handle = tempfile.TemporaryFile()  # noqa: SIM115 (returned to the caller)
        try:
            self.client.download_fileobj(
                self.bucket, self._blob_key(files[filename]["sha256"]), handle
            )
        except Exception as exc:
            handle.close()
            raise FileNotFoundError(2, f"cannot be fetched from the object store: {exc}") from exc
        handle.seek(0)
        return handle

    def list_files(self, name: str, version: int) -> Sequence[str]:
        files = self._manifest(name, version)
        if files is None:
            return []
        missing = [f for f, r in files.items() if not self._exists(self._blob_key(r["sha256"]))]
        return sorted(f for f in files if f not in missing)

    # -- removal ------------------------------------------------------------------------

    def remove(self, name: str, version: int) -> bool:
        self._manifests.pop((name, version), None)
        existed = self._exists(self._manifest_key(name, version))
        if existed:
            self.client.delete_object(Bucket=self.bucket, Key=self._manifest_key(name, version))
        _rmtree(self.cache_dir / name / str(version))
        return existed

    def evict_local(self, name: str, version: int) -> None:
        """Drop this host's downloaded copy (the store keeps it)."""
        self._manifests.pop((name, version), None)
        _rmtree(self.cache_dir / name / str(version))

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def stored_versions(self) -> Iterator[tuple[str, int]]:
        base = f"{self.prefix}versions/"
        found = []
        for obj in self._list(base):
            name, _, leaf = obj["Key"][len(base) :].partition("/")
            stem = leaf.removesuffix(".json")
            if name and stem.isdigit() and leaf.endswith(".json"):
                found.append((name, int(stem)))
        yield from sorted(found)

    def collect_garbage(self, *, dry_run: bool = False) -> list[str]:
        removed: list[str] = []
        # Local staging areas of writers that died on this host (a writer takes its lease
        # before creating its staging area).
        for entry in sorted(self.staging_dir.iterdir()):
            token = entry.name.removesuffix(".d")
            if entry.name.endswith(".d") and self.leases.writer_alive(token):
                continue
            removed.append(str(entry))
            if not dry_run:
                _rmtree(entry)
        if removed and not dry_run:
            logger.info(
                "removed %d dead writers' staging areas under %s", len(removed), self.cache_dir
            )
        return removed

    def collect_unreferenced(self, *, dry_run: bool = False) -> list[str]:
        """Delete blobs no manifest references, once old enough not to belong to a live
        upload (`gc_grace_s`). Reads every manifest: run by `registry gc`, not on open."""
        removed: list[str] = []
        referenced = set()
        for name, version in self.stored_versions():
            files = self._manifest(name, version) or {}
            referenced.update(r["sha256"] for r in files.values())
        now = time.time()
        blob_base = f"{self.prefix}blobs/sha256/"
        for obj in self._list(blob_base):
            sha256 = obj["Key"][len(blob_base) :]
            if sha256 in referenced:
                continue
            if now - obj["LastModified"].timestamp() < self.gc_grace_s:
                continue
            removed.append(f"s3://{self.bucket}/{obj['Key']}")
            if not dry_run:
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
        if removed and not dry_run:
            logger.info("removed %d unreferenced blobs from %s", len(removed), self.url)
        return removed

    def clear_cache(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.cache_dir)
