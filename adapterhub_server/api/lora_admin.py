"""vLLM-compatible adapter loading: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

The Gateway API Inference Extension's adapter syncer, AIBrix and KServe drive model servers
through these two routes, with vLLM's request fields. Here they mean:

* load: find the adapter (`lora_path`: a directory under `--allowed-local-adapter-dirs`,
  `hf://owner/repo[@rev]` or a bare `owner/repo` from the Hugging Face cache or hub), import
  it into the registry as a new version of `lora_name` unless the newest version already
  holds exactly these files (per-file sha256), serve the name on this replica again if it was
  unloaded here, and read it into host memory so the first request does not pay for it.
  Without a registry (`--no-registry`) the directory is served in place, like a
  `--lora-modules` entry added at run time (nothing is copied; it must stay where it is).
* unload: hide the name on this replica (gone from `/v1/models`, 404 to requests) and evict
  its idle cached copies; registry versions stay, and other replicas keep serving them.

Per-replica state (hidden names, adapters loaded without a registry) lives in
`ReplicaAdapterSource`, the engine's `AdapterSource` wrapped around the usual chain; it is
not persisted: a restarted replica serves what the registry holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import anyio

from adapterhub_server.errors import AdapterNotFoundError, InvalidRequestError, NotFoundError
from adapterhub_server.file_hash import hash_file, hash_stream
from adapterhub_server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, validate_adapter_name
from adapterhub_server.lora.cache import (
    AdapterLocation,
    AdapterSource,
    ChainedAdapterSource,
    display_name,
)
from adapterhub_server.registry.hub import (
    HUB_SCHEME,
    HubRef,
    download_snapshot,
    parse_hub_ref,
    validate_repo_id,
)

if TYPE_CHECKING:
    from adapterhub_server.engine.async_engine import AsyncLLMEngine
    from adapterhub_server.registry import Registry

logger = logging.getLogger(__name__)

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class ReplicaAdapterSource(ChainedAdapterSource):
    """`AdapterSource` of one replica: the chained `sources` (start-up adapters, then the
    registry) minus the names unloaded here, plus adapters loaded here without a registry.

    Called from the engine thread (locate) and the event loop (changes): a lock guards it.
    """

    def __init__(self, sources: Sequence[AdapterSource]) -> None:
        super().__init__(sources)
        self._hidden: set[str] = set()
        self._loaded: dict[str, AdapterLocation] = {}
        self._lock = threading.Lock()

    def locate(self, ref: str) -> AdapterLocation | None:
        name = display_name(ref)
        with self._lock:
            if name in self._hidden:
                return None
            loc = self._loaded.get(ref)
        return loc if loc is not None else super().locate(ref)

    def list(self) -> Sequence[AdapterLocation]:
        with self._lock:
            hidden = set(self._hidden)
            loaded = list(self._loaded.values())
        names = {display_name(loc.key) for loc in loaded}
        rest = [
            loc
            for loc in super().list()
            if display_name(loc.key) not in hidden and display_name(loc.key) not in names
        ]
        return loaded + rest

    def hide(self, name: str) -> AdapterLocation | None:
        """Stop serving `name` here; returns the run-time entry it had, if any."""
        with self._lock:
            self._hidden.add(name)
            return self._loaded.pop(name, None)

    def show(self, name: str, loc: AdapterLocation | None = None) -> None:
        """Serve `name` here again (from `loc`, for an adapter loaded without a registry)."""
        with self._lock:
            self._hidden.discard(name)
            if loc is not None:
                self._loaded[name] = loc

    def runtime_entry(self, name: str) -> AdapterLocation | None:
        with self._lock:
            return self._loaded.get(name)


@dataclass(frozen=True)
class LoadRequest:
    lora_name: str
    lora_path: str
    base_model_name: str | None = None
    load_inplace: bool = False


@dataclass
class _Found:
    """An adapter's files, opened and hashed; `source` is what the registry records."""

    directory: Path
    handles: dict[str, BinaryIO]
    sha256: dict[str, str]
    source: str

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


class LoraAdminService:
    """The logic behind the two routes, free of HTTP types."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        source: ReplicaAdapterSource,
        *,
        registry: Registry | None,
        allowed_local_dirs: Sequence[Path] = (),
        static_adapters: Mapping[str, Path] | None = None,
    ) -> None:
        self.engine = engine
        self.source = source
        self.registry = registry
        # Resolved once: a symlinked root is fine, what counts is where it really points.
        self.allowed_local_dirs = tuple(Path(d).resolve() for d in allowed_local_dirs)
        self.static_adapters = dict(static_adapters or {})
        self._lock = anyio.Lock()

    # -- load ------------------------------------------------------------------------------

    async def load(self, req: LoadRequest) -> str:
        name = req.lora_name
        if not name or not req.lora_path:
            raise InvalidRequestError(
                "Both 'lora_name' and 'lora_path' must be provided.", param="lora_name"
            )
        validate_adapter_name(name)
        base = self.engine.base_model_id
        if req.base_model_name and req.base_model_name != base:
            raise InvalidRequestError(
                f"base_model_name {req.base_model_name[:200]!r} is not the base model this "
                f"server runs ({base!r})",
                param="base_model_name",
            )
        # One load or unload at a time: "is it new content?" and "import it" must not race.
        async with self._lock:
            found = await anyio.to_thread.run_sync(self._find, req.lora_path)
            try:
                if name in self.static_adapters:
                    loc = await anyio.to_thread.run_sync(self._static, name, found)
                elif self.registry is not None:
                    loc = await anyio.to_thread.run_sync(self._import, name, found, req)
                else:
                    loc = self._in_place(name, found, req)
            finally:
                found.close()
            await self._warm(loc)
            if self.registry is None:
                # Only once its files proved servable: a bad directory never replaces a
                # good one.
                self.source.show(name, loc)
        logger.info("loaded adapter %s from %s (%s)", name, req.lora_path, loc.key)
        return f"Success: LoRA adapter '{name}' added successfully."

    def _served_here(self, name: str) -> bool:
        return self.source.locate(name) is not None

    def _import(self, name: str, found: _Found, req: LoadRequest) -> AdapterLocation:
        registry = self.registry
        assert registry is not None
        latest = None
        with contextlib.suppress(AdapterNotFoundError):
            latest = registry.get(name).latest
        same = latest is not None and all(
            latest.sha256.get(f) == found.sha256[f] for f in ADAPTER_FILES
        )
        if not same:
            if self._served_here(name) and not req.load_inplace:
                raise InvalidRequestError(
                    f"The lora adapter '{name}' has already been loaded with other content; "
                    "send load_inplace=true to replace it with a new version",
                    param="lora_name",
                )
            latest = registry.push(
                dict(found.handles),
                name,
                metadata={"source": found.source},
                expected_sha256=found.sha256,
            )
        assert latest is not None
        self.source.show(name)
        loc = self.source.locate(latest.key)
        if loc is None:  # a start-up adapter of that name, or another base's weights
            raise InvalidRequestError(
                f"The lora adapter '{name}' cannot be served by this server", param="lora_name"
            )
        return loc

    def _static(self, name: str, found: _Found) -> AdapterLocation:
        """A `--lora-modules` name: fixed at start-up, so only the same files bring it back
        after an unload."""
        with contextlib.suppress(OSError):
            if all(
                hash_file(self.static_adapters[name] / f)[0] == found.sha256[f]
                for f in ADAPTER_FILES
            ):
                self.source.show(name)
                loc = self.source.locate(name)
                if loc is not None:
                    return loc
        raise InvalidRequestError(
            f"The lora adapter '{name}' is served from --lora-modules with other files; "
            "it cannot be replaced at run time",
            param="lora_name",
        )

    def _in_place(self, name: str, found: _Found, req: LoadRequest) -> AdapterLocation:
        current = self.source.runtime_entry(name)
        if current is not None and current.sha256 == found.sha256:
            return current
        if self._served_here(name) and not req.load_inplace:
            raise InvalidRequestError(
                f"The lora adapter '{name}' has already been loaded.", param="lora_name"
            )
        digest = hashlib.sha256(
            "".join(found.sha256[f] for f in ADAPTER_FILES).encode()
        ).hexdigest()
        # The key carries the content: a replacement never meets the old one's cached copy.
        loc = AdapterLocation(
            key=f"{name}@{digest[:16]}",
            path=found.directory,
            created=int(time.time()),
            sha256=dict(found.sha256),
        )
        return loc

    async def _warm(self, loc: AdapterLocation) -> None:
        """Read and validate the files into host memory now (off the engine thread)."""
        await self.engine.warm_adapter(loc)

    # -- finding the files -------------------------------------------------------------

    def _find(self, lora_path: str) -> _Found:
        if lora_path.startswith(HUB_SCHEME):
            return self._from_hub(parse_hub_ref(lora_path))
        if os.path.isabs(lora_path):
            return self._from_local(lora_path)
        if lora_path.count("/") == 1 and not lora_path.startswith("."):
            return self._from_hub(HubRef(validate_repo_id(lora_path)))
        raise InvalidRequestError(
            f"lora_path {lora_path[:200]!r}: expected an absolute directory under "
            "--allowed-local-adapter-dirs, hf://owner/repo[@revision] or owner/repo",
            param="lora_path",
        )

    def _from_hub(self, ref: HubRef) -> _Found:
        snapshot = download_snapshot(ref)
        # Snapshot files link into the cache's blobs: the cache is the confinement here.
        cache_root = snapshot.parent.parent.resolve()
        return _open_files(snapshot, cache_root, source=str(ref))

    def _from_local(self, lora_path: str) -> _Found:
        if not self.allowed_local_dirs:
            raise InvalidRequestError(
                "local adapter paths are not allowed on this server: start it with "
                "--allowed-local-adapter-dirs DIR",
                param="lora_path",
            )
        if ".." in Path(lora_path).parts:
            raise InvalidRequestError(
                "lora_path must not contain '..' components", param="lora_path"
            )
        real = Path(lora_path).resolve()
        root = next((r for r in self.allowed_local_dirs if real.is_relative_to(r)), None)
        if root is None:
            raise InvalidRequestError(
                f"lora_path {lora_path[:200]!r} is outside --allowed-local-adapter-dirs",
                param="lora_path",
            )
        if not real.is_dir():
            raise InvalidRequestError(
                f"lora_path {lora_path[:200]!r} is not a directory", param="lora_path"
            )
        return _open_files(real, root, source=str(real))

    # -- unload ------------------------------------------------------------------------

    async def unload(self, lora_name: str) -> str:
        if not lora_name:
            raise InvalidRequestError("'lora_name' must be provided.", param="lora_name")
        async with self._lock:
            if not self._served_here(lora_name):
                raise NotFoundError(
                    f"The lora adapter '{lora_name}' cannot be found.", param="lora_name"
                )
            keys = {lora_name}
            entry = self.source.hide(lora_name)
            if entry is not None:
                keys.add(entry.key)
            if self.registry is not None:
                registry = self.registry
                versions = await anyio.to_thread.run_sync(lambda: registry.versions(lora_name))
                keys.update(r.key for r in versions)
            kept = await self.engine.evict_adapters(sorted(keys))
        if kept:
            # Hidden already: no new request gets it; the running ones finish with it, and
            # their idle copy leaves the slots by LRU.
            logger.info("unloaded %s; %s still in use by running requests", lora_name, kept)
        return f"Success: LoRA adapter '{lora_name}' removed successfully."


def _open_files(directory: Path, root: Path, *, source: str) -> _Found:
    """Open and hash the adapter files of `directory`, each of which must really lie under
    `root` (a symlink out of it is refused). Opened once: what is hashed is what is
    imported, even if the directory changes meanwhile."""
    handles: dict[str, BinaryIO] = {}
    digests: dict[str, str] = {}
    try:
        for filename in ADAPTER_FILES:
            path = directory / filename
            real = path.resolve()
            if not real.is_relative_to(root):
                raise InvalidRequestError(
                    f"{filename} in lora_path links outside the allowed directories",
                    param="lora_path",
                )
            try:
                fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                raise InvalidRequestError(
                    f"lora_path has no {filename}: a PEFT adapter directory holds "
                    f"{' and '.join(ADAPTER_FILES)}",
                    param="lora_path",
                ) from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InvalidRequestError(
                        f"{filename} in lora_path is a symlink", param="lora_path"
                    ) from None
                raise
            handle = os.fdopen(fd, "rb")
            handles[filename] = handle
            if not os.path.isfile(real):
                raise InvalidRequestError(f"{filename}: not a regular file", param="lora_path")
            digests[filename] = _sha256(handle)
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    return _Found(directory=directory, handles=handles, sha256=digests, source=source)


def _sha256(handle: BinaryIO) -> str:
    """The rest of `handle`'s sha256; the handle is rewound to be read again."""
    digest = hash_stream(handle)[0]
    handle.seek(0)
    return digest
