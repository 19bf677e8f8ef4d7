"""The `Registry` facade: push, resolve, alias, delete, verify and collect garbage.

Everything here works on the `BlobStore` / `Index` protocols (`interface.py`); `Registry.open`
builds the embedded default on a local directory (`local.py`).

Nothing invalid is ever stored: an upload is copied into a private staging area (hashing
as it goes, with a size budget), validated there by the same code the engine loads adapters
with, and only then given a version number and published. Untrusted uploads arrive as bytes
(`{filename: content}`) or as a .tar/.tar.gz/.zip archive, whose members are read, never
extracted, so names with `..`, absolute paths and links cannot place anything outside the
staging area. A directory path is a trusted local source (an operator's PEFT output, the
Hugging Face cache, whose snapshots are symlinks into its blob store) and is read through
links.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
import stat
import tarfile
import time
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from adapterhub_server.errors import AdapterNotFoundError, AdapterValidationError
from adapterhub_server.file_hash import hash_stream, mismatch
from adapterhub_server.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_adapter,
    validate_adapter_name,
)
from adapterhub_server.registry.errors import (
    AdapterVersionNotFoundError,
    AliasNotFoundError,
    ChecksumMismatchError,
    PayloadTooLargeError,
    RegistryCorruptionError,
    RegistryError,
    VersionConflictError,
)
from adapterhub_server.registry.interface import BlobStore, Index, Staging
from adapterhub_server.registry.local import INDEX_FILE, LocalBlobStore, SQLiteIndex
from adapterhub_server.registry.records import (
    AdapterInfo,
    FileRecord,
    GcReport,
    Lineage,
    VerifyProblem,
    VerifyReport,
    VersionRecord,
    adapter_kind,
    check_description,
    encode_json_object,
)
from adapterhub_server.registry.refs import AdapterRef, parse_ref, parse_version, validate_alias
from adapterhub_server.registry.targets import BaseModelSpec
from adapterhub_server.torch_threads import single_threaded
from adapterhub_server.weight_files import is_pickle_file

logger = logging.getLogger(__name__)

ADAPTER_FILES: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)
"""The files a version consists of, exactly as PEFT writes them."""

IGNORED_FILES: frozenset[str] = frozenset({"README.md"})
"""Accepted in uploads but not stored: PEFT writes a model card; `export` writes its own."""

REGISTRY_ENV = "ADAPTERHUB_REGISTRY"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20

UploadContent = bytes | bytearray | memoryview | Path | BinaryIO
PushSource = str | os.PathLike | Mapping[str, UploadContent]
"""A PEFT directory, a .tar[.gz]/.zip archive, or {filename: bytes | Path | binary file}."""


def default_registry_dir() -> Path:
    """`$ADAPTERHUB_REGISTRY`, else `$XDG_CACHE_HOME/adapterhub/registry`, else
    `~/.cache/adapterhub/registry` (read at call time so tests and CLIs can set them)."""
    explicit = os.environ.get(REGISTRY_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "adapterhub" / "registry"


def default_registry_location() -> str | Path:
    """`$ADAPTERHUB_REGISTRY` when it is a `postgresql://` URL (kept as a string, for
    `open_registry`), else `default_registry_dir()`."""
    from adapterhub_server.registry.factory import is_registry_url

    explicit = os.environ.get(REGISTRY_ENV, "")
    return explicit if is_registry_url(explicit) else default_registry_dir()


@dataclass(frozen=True)
class RegistryLimits:
    """Bounds on what a push may store."""

    max_lora_rank: int = 64
    """Largest rank accepted (the server's --max-lora-rank)."""
    max_upload_bytes: int = 2 * 1024**3
    """Total bytes of one upload: an archive's size, and the sum of its files' sizes."""
    max_archive_members: int = 1000
    """Entries an uploaded archive may hold; stops a listing from exhausting memory."""
    serving_dtype: torch.dtype = torch.float32
    """The dtype the server computes in (its --dtype): adapters whose delta could overflow it
    are refused (`lora.adapter.magnitude_limit`). float32 and bfloat16 share one range."""

    def __post_init__(self) -> None:
        for name in ("max_lora_rank", "max_upload_bytes", "max_archive_members"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if (
            not isinstance(self.serving_dtype, torch.dtype)
            or not self.serving_dtype.is_floating_point
        ):
            raise ValueError(
                f"serving_dtype must be a floating-point torch.dtype, not {self.serving_dtype!r}"
            )


class _Budget:
    """Bytes an upload may still write; shared by all its files."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise PayloadTooLargeError.over(
                "the upload", self.limit, flag="--max-upload-bytes", param="file"
            )


def _copy_stream(src: BinaryIO, dest: Path, budget: _Budget) -> FileRecord:
    """Copy into a new file (never through a link), hashing and counting; fsync it."""
    digest = hashlib.sha256()
    size = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(dest, flags, 0o644), "wb") as out:
        while chunk := src.read(_CHUNK):
            budget.take(len(chunk))
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return FileRecord(sha256=digest.hexdigest(), size=size)


def _reason(exc: BaseException) -> str:
    """What went wrong, for a message that may reach a client: an OSError's text without
    the file name it carries (a path on the server's disk)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _pickle_error(found: list[str]) -> AdapterValidationError:
    return AdapterValidationError(
        f"found {', '.join(sorted(found)[:5])}: pickle-based weights are not accepted; upload "
        f"{WEIGHTS_FILE} (e.g. load in PEFT and save_pretrained(safe_serialization=True))",
        param="file",
    )


def _missing(found: dict[str, FileRecord], pickles: list[str], where: str) -> None:
    if WEIGHTS_FILE not in found and pickles:
        raise _pickle_error(pickles)
    for filename in ADAPTER_FILES:
        if filename not in found:
            raise AdapterValidationError(f"{where}: missing {filename}", param="file")


def _archive_parts(raw: str) -> list[str]:
    """Path components of an archive member; raises for anything that could escape."""
    shown = repr(raw)[:120]
    decoded = urllib.parse.unquote(raw)
    if "\x00" in raw or "\\" in decoded:
        raise AdapterValidationError(f"archive member {shown}: invalid characters", param="file")
    if decoded.startswith("/") or re.match(r"[A-Za-z]:", decoded):
        raise AdapterValidationError(
            f"archive member {shown}: absolute paths are not allowed", param="file"
        )
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(urllib.parse.unquote(p) in ("..", ".") or "/" in urllib.parse.unquote(p) for p in parts):
        raise AdapterValidationError(f"archive member {shown}: '..' is not allowed", param="file")
    return parts


class Registry:
    """Versioned adapter store over a `BlobStore` and an `Index`.

    Thread-safe and multi-process-safe; one instance per process is enough.
    """

    def __init__(
        self,
        blobs: BlobStore,
        index: Index,
        *,
        base: BaseModelSpec | None = None,
        limits: RegistryLimits | None = None,
        recover: bool = True,
    ) -> None:
        """`base` is what pushes are validated against (required to push, not to read)."""
        self.blobs = blobs
        self.index = index
        self.base = base
        self.limits = limits or RegistryLimits()
        self.root: Path | None = None
        """The directory of a local registry (set by `open`)."""
        self.url: str | None = None
        """A shared registry's index URL, password redacted (set by `open_registry`)."""
        # Test seam: called with "staged", "allocated" and "published" during a push, so
        # tests can kill a writer at each step.
        self._hook: Callable[[str], None] | None = None
        if recover:
            self.recover()

    @classmethod
    def open(
        cls,
        root: str | os.PathLike | None = None,
        *,
        base: BaseModelSpec | None = None,
        limits: RegistryLimits | None = None,
        busy_timeout_s: float = 30.0,
        recover: bool = True,
        blobs: str | None = None,
    ) -> Registry:
        """Open (creating if needed) the embedded registry at `root`
        (default `default_registry_location()`), cleaning up after writers that died.

        `root` may also be a `postgresql://` URL, with `blobs` (or
        `$ADAPTERHUB_REGISTRY_BLOBS`) naming the blob store (see `factory.open_registry`).
        """
        from adapterhub_server.registry.factory import is_registry_url, open_registry

        if root is None:
            root = default_registry_location()
        if is_registry_url(root) or blobs:
            return open_registry(root, blobs, base=base, limits=limits, recover=recover)
        path = Path(root).expanduser() if root is not None else default_registry_dir()
        blobs = LocalBlobStore(path)
        index = SQLiteIndex(path / INDEX_FILE, busy_timeout_s=busy_timeout_s)
        registry = cls(blobs, index, base=base, limits=limits, recover=recover)
        registry.root = path
        return registry

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------

    def push(
        self,
        source: PushSource,
        name: str,
        *,
        alias: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        lineage: Lineage | Mapping[str, Any] | None = None,
        expected_sha256: Mapping[str, str] | None = None,
    ) -> VersionRecord:
        """Validate and store a new version of `name`; returns its record (status ready).

        Args:
            source: a PEFT directory (trusted, local), a .tar/.tar.gz/.zip archive, or
                {filename: bytes | Path | binary file} holding adapter_config.json and
                adapter_model.safetensors (README.md is accepted and ignored).
            alias: set to point at the new version in the same transaction.
            expected_sha256: {filename: hex}; the upload is refused if any differs.

        Raises:
            AdapterValidationError (and subclasses): the input cannot be served; nothing
                is stored and no version number is used.
            InvalidRequestError: bad alias, metadata, lineage or description.
        """
        validate_adapter_name(name)
        if alias is not None:
            validate_alias(alias)
        description = check_description(description)
        encode_json_object(metadata, what="metadata")
        metadata_obj = dict(metadata or {})
        if lineage is not None and not isinstance(lineage, Lineage):
            lineage = Lineage.from_dict(lineage)
        if lineage is not None:
            encode_json_object(lineage.to_dict(), what="lineage")
        expected = self._check_expected(expected_sha256)
        if self.base is None:
            raise RegistryError(
                "this registry was opened without a base model; cannot validate pushes"
            )

        staging = self.blobs.begin()
        version: int | None = None
        published = False
        committed = False
        try:
            files = self._stage(source, staging)
            for filename, digest in expected.items():
                if filename not in files:
                    raise ChecksumMismatchError(
                        f"expected_sha256 names {filename!r}, which is not one of the "
                        f"adapter's files ({', '.join(ADAPTER_FILES)})",
                        param="expected_sha256",
                    )
                if files[filename].sha256 != digest:
                    raise ChecksumMismatchError(
                        f"{filename}: sha256 mismatch: declared {digest}, received "
                        f"{files[filename].sha256} (corrupted in transit?)",
                        param="file",
                    )
            rank, alpha, targets, config = self._validate(staging.path, name)
            self._call_hook("staged")

            created = time.time()
            version = self.index.allocate(
                name,
                writer=staging.token,
                pid=os.getpid(),
                host=socket.gethostname(),
                created=created,
            )
            self._call_hook("allocated")
            self.blobs.publish(staging, name, version)
            published = True
            self._call_hook("published")
            record = VersionRecord(
                name=name,
                version=version,
                status="ready",
                created=created,
                files=files,
                base_model_id=self.base.model_id,
                base_fingerprint=self.base.fingerprint,
                rank=rank,
                alpha=alpha,
                target_modules=targets,
                description=description,
                metadata=metadata_obj,
                lineage=lineage,
                kind=adapter_kind(config, lineage),
            )
            self.index.commit(record, alias=alias)
            committed = True
        except BaseException:
            if not committed:
                # Files before row: if this process dies half-way, a pending row with a
                # dead writer is what recovery knows how to clean. A failing cleanup must
                # not hide the error that caused it; recovery finishes the job later.
                try:
                    self.blobs.abort(staging, name if published else None, version)
                    if version is not None:
                        self.index.discard_pending(name, version)
                except Exception:
                    logger.exception("cleaning up after a failed push of %s failed", name)
            raise
        finally:
            self.blobs.release(staging)
        logger.info(
            "pushed %s@%d: rank %s, %d bytes, base %s",
            name,
            version,
            rank,
            record.size,
            self.base.model_id,
        )
        stored = self.index.get(name, version)
        return stored if stored is not None else record

    def _call_hook(self, point: str) -> None:
        if self._hook is not None:
            self._hook(point)

    @staticmethod
    def _check_expected(expected: Mapping[str, str] | None) -> dict[str, str]:
        out = {}
        for filename, digest in (expected or {}).items():
            if not isinstance(digest, str) or _SHA256_RE.fullmatch(digest.lower()) is None:
                raise ChecksumMismatchError(
                    f"expected_sha256[{str(filename)[:80]!r}] is not a sha256 hex digest",
                    param="expected_sha256",
                )
            out[filename] = digest.lower()
        return out

    def _stage(self, source: PushSource, staging: Staging) -> dict[str, FileRecord]:
        budget = _Budget(self.limits.max_upload_bytes)
        if isinstance(source, Mapping):
            return self._stage_mapping(source, staging.path, budget)
        path = Path(source)
        if path.is_dir():
            return self._stage_directory(path, staging.path, budget)
        if not path.is_file():
            raise AdapterValidationError(f"adapter path {str(path)!r} does not exist", param="file")
        if path.stat().st_size > budget.limit:
            budget.take(path.stat().st_size)
        if zipfile.is_zipfile(path):
            return self._stage_zip(path, staging.path, budget)
        if tarfile.is_tarfile(path):
            return self._stage_tar(path, staging.path, budget)
        if is_pickle_file(path.name):
            raise _pickle_error([path.name])
        raise AdapterValidationError(
            f"{path.name}: expected a PEFT adapter directory or a .tar/.tar.gz/.zip archive of one",
            param="file",
        )

    @staticmethod
    def _stage_directory(src: Path, dest: Path, budget: _Budget) -> dict[str, FileRecord]:
        files: dict[str, FileRecord] = {}
        for filename in ADAPTER_FILES:
            path = src / filename
            if not path.exists():
                continue
            if not path.is_file():
                raise AdapterValidationError(f"{filename}: not a regular file", param="file")
            with open(path, "rb") as handle:
                files[filename] = _copy_stream(handle, dest / filename, budget)
        pickles = [p.name for p in src.iterdir() if is_pickle_file(p.name)]
        _missing(files, pickles, src.name)
        return files

    @staticmethod
    def _stage_mapping(
        source: Mapping[str, UploadContent], dest: Path, budget: _Budget
    ) -> dict[str, FileRecord]:
        files: dict[str, FileRecord] = {}
        for filename, content in source.items():
            shown = repr(filename)[:120]
            if not isinstance(filename, str):
                raise AdapterValidationError(f"invalid file name {shown}", param="file")
            if filename in IGNORED_FILES:
                continue
            if is_pickle_file(filename):
                raise _pickle_error([filename])
            if filename not in ADAPTER_FILES:
                raise AdapterValidationError(
                    f"unexpected file {shown}: an upload holds exactly "
                    f"{' and '.join(ADAPTER_FILES)} (plus optionally README.md)",
                    param="file",
                )
            if isinstance(content, (bytes, bytearray, memoryview)):
                files[filename] = _copy_stream(io.BytesIO(bytes(content)), dest / filename, budget)
            elif isinstance(content, (str, os.PathLike)):
                with open(content, "rb") as handle:
                    files[filename] = _copy_stream(handle, dest / filename, budget)
            else:
                files[filename] = _copy_stream(content, dest / filename, budget)
        _missing(files, [], "upload")
        return files

    def _archive_target(
        self, raw: str, files: dict[str, FileRecord], pickles: list[str]
    ) -> str | None:
        """Which adapter file an archive member is, or None to skip it."""
        parts = _archive_parts(raw)
        if not parts or len(parts) > 2:
            # At most one top-level directory ("tar czf a.tgz my-adapter/"): a deeper file
            # (e.g. checkpoint-100/...) is another adapter, not this one.
            return None
        leaf = parts[-1]
        if is_pickle_file(leaf):
            pickles.append(leaf)
            return None
        if leaf not in ADAPTER_FILES:
            return None
        if leaf in files:
            raise AdapterValidationError(f"archive holds {leaf} more than once", param="file")
        return leaf

    def _stage_tar(self, path: Path, dest: Path, budget: _Budget) -> dict[str, FileRecord]:
        files: dict[str, FileRecord] = {}
        pickles: list[str] = []
        declared = _Budget(self.limits.max_upload_bytes)
        try:
            with tarfile.open(path, "r:*") as archive:
                for count, member in enumerate(archive, start=1):
                    if count > self.limits.max_archive_members:
                        raise AdapterValidationError(
                            f"archive has more than {self.limits.max_archive_members} members",
                            param="file",
                        )
                    shown = repr(member.name)[:120]
                    target = self._archive_target(member.name, files, pickles)
                    if member.isdir():
                        continue
                    if member.issym() or member.islnk():
                        kind = "symbolic" if member.issym() else "hard"
                        raise AdapterValidationError(
                            f"archive member {shown} is a {kind} link; links are not accepted",
                            param="file",
                        )
                    if not member.isfile():
                        raise AdapterValidationError(
                            f"archive member {shown} is not a regular file", param="file"
                        )
                    # Every member counts, skipped ones too: they still cost decompression.
                    declared.take(member.size)
                    if target is None:
                        continue
                    handle = archive.extractfile(member)
                    if handle is None:
                        raise AdapterValidationError(
                            f"archive member {shown} cannot be read", param="file"
                        )
                    with handle:
                        files[target] = _copy_stream(handle, dest / target, budget)
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
            raise AdapterValidationError(
                f"{path.name}: unreadable tar archive ({_reason(exc)})", param="file"
            ) from exc
        _missing(files, pickles, "archive")
        return files

    def _stage_zip(self, path: Path, dest: Path, budget: _Budget) -> dict[str, FileRecord]:
        files: dict[str, FileRecord] = {}
        pickles: list[str] = []
        declared = _Budget(self.limits.max_upload_bytes)
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                if len(infos) > self.limits.max_archive_members:
                    raise AdapterValidationError(
                        f"archive has more than {self.limits.max_archive_members} members",
                        param="file",
                    )
                for info in infos:
                    shown = repr(info.filename)[:120]
                    target = self._archive_target(info.filename, files, pickles)
                    if info.is_dir():
                        continue
                    mode = info.external_attr >> 16
                    if stat.S_ISLNK(mode):
                        raise AdapterValidationError(
                            f"archive member {shown} is a symbolic link; links are not accepted",
                            param="file",
                        )
                    # Archivers on some systems record no Unix mode (0): a plain file.
                    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                        raise AdapterValidationError(
                            f"archive member {shown} is not a regular file", param="file"
                        )
                    declared.take(info.file_size)
                    if target is None:
                        continue
                    with archive.open(info) as handle:
                        files[target] = _copy_stream(handle, dest / target, budget)
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            EOFError,
            OSError,
            ValueError,
            RuntimeError,
            zlib.error,
        ) as exc:
            raise AdapterValidationError(
                f"{path.name}: unreadable zip archive ({_reason(exc)})", param="file"
            ) from exc
        _missing(files, pickles, "archive")
        return files

    def _validate(
        self, path: Path, name: str
    ) -> tuple[int, float | None, tuple[str, ...], Mapping[str, Any]]:
        """Run the engine's own loader on the staged copy; (rank, alpha, target leaf names,
        adapter_config.json)."""
        if self.base is None:  # push checks this first; kept for direct callers
            raise RegistryError("no base model configured to validate against")
        try:
            # A server pushes from a worker thread: no OpenMP team there (`torch_threads`).
            with single_threaded():
                adapter = load_adapter(
                    path,
                    name=name,
                    targets=dict(self.base.targets),
                    max_rank=self.limits.max_lora_rank,
                    max_file_bytes=self.limits.max_upload_bytes,
                    serving_dtype=self.limits.serving_dtype,
                    embeddings=self.base.embeddings,
                )
        except AdapterValidationError:
            # The loader knows no MoE blocks: say so when that is why (experts not served).
            self.base.refuse_unserved(path, max_file_bytes=self.limits.max_upload_bytes)
            raise
        alpha = adapter.config.get("lora_alpha")
        targets = tuple(sorted({module.rsplit(".", 1)[-1] for module in adapter.modules}))
        return adapter.rank, float(alpha) if alpha is not None else None, targets, adapter.config

    # -- reading ------------------------------------------------------------------------

    def resolve(self, ref: str | AdapterRef) -> VersionRecord:
        """The ready version `name`, `name@N` or `name@alias` refers to.

        Raises InvalidReferenceError for malformed references, AdapterNotFoundError (or
        its subclasses AdapterVersionNotFoundError / AliasNotFoundError) otherwise.
        """
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        name = parsed.name
        if parsed.alias is not None:
            version = self.index.resolve_alias(name, parsed.alias)
            if version is None:
                self._require_known(name)
                raise AliasNotFoundError(
                    f"adapter {name!r} has no alias {parsed.alias!r}", param="model"
                )
            parsed = AdapterRef(name, version=version)
        if parsed.version is not None:
            record = self.index.get(name, parsed.version)
            if record is not None and record.status == "ready":
                return record
            self._require_known(name)
            state = (
                "was deleted"
                if record is not None and record.status == "deleted"
                else "does not exist"
            )
            raise AdapterVersionNotFoundError(f"adapter version {parsed} {state}", param="model")
        record = self.index.latest(name)
        if record is None:
            self._require_known(name)
            raise AdapterNotFoundError(
                f"adapter {name!r} has no versions (all were deleted)", param="model"
            )
        return record

    def _require_known(self, name: str) -> None:
        if not self.index.known_name(name):
            raise AdapterNotFoundError(f"adapter {name!r} does not exist", param="model")

    def get(self, name: str) -> AdapterInfo:
        """An adapter with its ready versions and aliases."""
        validate_adapter_name(name)
        versions = self.index.versions(name)
        if not versions:
            self.resolve(name)  # raises the fitting not-found error
        return AdapterInfo(
            name=name,
            latest=versions[-1],
            versions=tuple(versions),
            aliases=self.index.aliases(name),
        )

    def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter with at least one ready version, by name."""
        by_name: dict[str, list[VersionRecord]] = {}
        for record in self.index.ready_versions():
            by_name.setdefault(record.name, []).append(record)
        return [
            AdapterInfo(
                name=name,
                latest=records[-1],
                versions=tuple(records),
                aliases={alias: r.version for r in records for alias in r.aliases},
            )
            for name, records in sorted(by_name.items())
        ]

    def versions(self, name: str, *, include_deleted: bool = False) -> list[VersionRecord]:
        """Versions of `name`, oldest first; deleted tombstones only when asked for."""
        validate_adapter_name(name)
        return self.index.versions(name, include_deleted=include_deleted)

    def aliases(self, name: str) -> dict[str, int]:
        validate_adapter_name(name)
        return self.index.aliases(name)

    def version_path(self, name: str, version: int) -> Path:
        """Directory of a ready version (the files are verified by whoever loads them)."""
        record = self.resolve(
            AdapterRef(validate_adapter_name(name), version=parse_version(version))
        )
        return self.blobs.version_path(record.name, record.version)

    def open_file(self, name: str, version: int, filename: str) -> BinaryIO:
        """Open a stored file after checking it against its recorded sha256 and size.

        Raises AdapterNotFoundError if the version has no such file, and
        RegistryCorruptionError naming the file if it is missing or altered on disk.
        """
        record = self.resolve(
            AdapterRef(validate_adapter_name(name), version=parse_version(version))
        )
        expected = record.files.get(filename)
        if expected is None:
            raise AdapterNotFoundError(
                f"{record.key} has no file {str(filename)[:80]!r} (files: {', '.join(record.files)})",
                param="file",
            )
        try:
            handle = self.blobs.open(record.name, record.version, filename)
        except OSError as exc:
            current = self.index.get(record.name, record.version)
            if current is None or current.status != "ready":
                # Deleted between resolving and opening.
                raise AdapterVersionNotFoundError(
                    f"adapter version {record.key} was deleted", param="model"
                ) from exc
            # strerror, not str(exc): that names the path, and this message reaches clients.
            raise RegistryCorruptionError(
                f"{record.key}: {filename}: cannot be read ({exc.strerror})"
            ) from exc
        try:
            problem = _check_file(handle, expected)
        except BaseException:
            handle.close()
            raise
        if problem is not None:
            handle.close()
            raise RegistryCorruptionError(f"{record.key}: {filename}: {problem}")
        handle.seek(0)
        return handle

    # -- changing -----------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Point `name@alias` at a ready version; returns the version it pointed at before."""
        validate_adapter_name(name)
        validate_alias(alias)
        version = parse_version(version)
        self._require_known(name)
        previous = self.index.set_alias(name, alias, version, updated=time.time())
        logger.info("alias %s@%s -> %d (was %s)", name, alias, version, previous)
        return previous

    def delete_alias(self, name: str, alias: str) -> int:
        """Remove an alias; returns the version it pointed at."""
        validate_adapter_name(name)
        validate_alias(alias)
        version = self.index.delete_alias(name, alias)
        logger.info("alias %s@%s (-> %d) deleted", name, alias, version)
        return version

    def delete_version(self, name: str, version: int, *, force: bool = False) -> VersionRecord:
        """Delete a ready version. Its number is never reused.

        Refuses (VersionConflictError) while aliases point at it, unless `force`, which
        deletes those aliases too. Returns the record as it was before deletion.
        """
        validate_adapter_name(name)
        version = parse_version(version)
        self._require_known(name)
        record = self.index.mark_deleted(name, version, force=force, deleted=time.time())
        try:
            self.blobs.remove(name, version)
        except OSError as exc:
            # The tombstone is committed, so the version is gone for readers; gc will
            # remove the files.
            logger.warning("deleted %s but could not remove its files yet: %s", record.key, exc)
        logger.info("deleted %s", record.key)
        return record

    def delete_adapter(self, name: str, *, force: bool = False) -> list[VersionRecord]:
        """Delete every ready version of `name` (see `delete_version`)."""
        info = self.get(name)
        if info.aliases and not force:
            raise VersionConflictError(
                f"adapter {name!r} has aliases ({', '.join(sorted(info.aliases))}); delete them "
                "first or force the deletion",
                param="model",
            )
        return [self.delete_version(name, r.version, force=force) for r in info.versions]

    # -- maintenance --------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Discard versions whose writer died before committing, and their leftovers.

        Runs on every open. Returns the `name@version` keys discarded.
        """
        discarded = self._discard_dead_pending(dry_run=False)
        self.blobs.collect_garbage()
        return discarded

    def _discard_dead_pending(self, *, dry_run: bool) -> list[str]:
        discarded = []
        for pending in self.index.pending():
            if self.blobs.writer_alive(pending.writer):
                continue
            # Its lock is gone: the writer died, or it finished right after we listed it.
            # Only the first case leaves the row pending.
            current = self.index.get(pending.name, pending.version)
            if current is None or current.status != "pending":
                continue
            key = f"{pending.name}@{pending.version}"
            discarded.append(key)
            if dry_run:
                continue
            self.blobs.remove(pending.name, pending.version)
            self.index.discard_pending(pending.name, pending.version)
            logger.warning(
                "discarded uncommitted version %s: its writer (pid %s on %s) died",
                key,
                pending.writer_pid,
                pending.writer_host,
            )
        return discarded

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove everything that is not part of a ready or in-progress version.

        Dead writers' pending versions and staging areas, half-deleted versions, and
        version directories the index does not know (or knows as deleted).
        """
        # Directories first, index second: a directory exists only after its pending row
        # is committed, so every directory listed here has a row the reads below can see.
        stored = list(self.blobs.stored_versions())
        discarded = self._discard_dead_pending(dry_run=dry_run)
        removed = list(self.blobs.collect_garbage(dry_run=dry_run))
        for name, version in stored:
            record = self.index.get(name, version)
            if record is not None and record.status == "ready":
                continue
            if record is not None and record.status == "pending":
                continue  # a live writer's, or discarded above
            # A remote store names its objects (its version_path would download them).
            locate = getattr(self.blobs, "location", None)
            path = locate(name, version) if locate else str(self.blobs.version_path(name, version))
            removed.append(path)
            if not dry_run:
                self.blobs.remove(name, version)
        # Content-addressed stores (S3) share blobs between versions: those no version
        # references any more go last, after the orphaned versions above.
        sweep = getattr(self.blobs, "collect_unreferenced", None)
        if sweep is not None:
            removed.extend(sweep(dry_run=dry_run))
        if removed and not dry_run:
            logger.info("gc removed %d entries", len(removed))
        return GcReport(removed=tuple(removed), discarded_pending=tuple(discarded), dry_run=dry_run)

    def verify(self, ref: str | None = None) -> VerifyReport:
        """Re-hash the files of every ready version (or of `ref`: `name` means all of
        its versions, `name@N` / `name@alias` one) against the index."""
        if ref is None:
            records = self.index.ready_versions()
        else:
            parsed = parse_ref(ref)
            if parsed.version is None and parsed.alias is None:
                records = self.index.versions(parsed.name)
                if not records:
                    self.resolve(parsed)
            else:
                records = [self.resolve(parsed)]
        problems: list[VerifyProblem] = []
        for record in records:
            problems.extend(self._verify_one(record))
        if problems:
            logger.error("verify found %d problem(s)", len(problems))
        return VerifyReport(checked=len(records), problems=tuple(problems))

    def _verify_one(self, record: VersionRecord) -> Iterator[VerifyProblem]:
        stored = set(self.blobs.list_files(record.name, record.version))
        for filename in sorted(stored - set(record.files)):
            yield VerifyProblem(record.key, filename, "unexpected file (not in the index)")
        for filename, expected in sorted(record.files.items()):
            if filename not in stored:
                yield VerifyProblem(record.key, filename, "missing")
                continue
            try:
                with self.blobs.open(record.name, record.version, filename) as handle:
                    problem = _check_file(handle, expected)
            except OSError as exc:
                problem = f"cannot be read ({exc})"
            if problem is not None:
                yield VerifyProblem(record.key, filename, problem)


def _check_file(handle: BinaryIO, expected: FileRecord) -> str | None:
    """None if the file's bytes match `expected`, else what is wrong."""
    return mismatch(*hash_stream(handle), expected.sha256, expected.size)
