"""Two-tier adapter cache: parsed adapters in host memory, a bounded set in device slots.

* Host tier: up to `max_cpu_loras` parsed, validated adapters (LRU). Files are read and
  validated on a background thread, so a cold adapter never stalls the running batch: the
  scheduler asks again next step.
* Device tier: up to `max_loras` adapters in the weight pool (`SlotAllocator`, LRU over idle
  adapters). An adapter in use by a running request is pinned and never evicted.

Where adapters come from is an `AdapterSource` (a fixed name -> directory map for
``--lora-modules``; the registry implements the same protocol), so loading on first request
needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapterhub_server.errors import AdapterNotFoundError, AdapterValidationError
from adapterhub_server.file_hash import hash_file, mismatch
from adapterhub_server.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoRAAdapter,
    TargetShape,
    load_adapter,
)
from adapterhub_server.lora.full_module_store import FullModuleStore, ResidentFullModules
from adapterhub_server.lora.full_modules import EmbeddingTargets
from adapterhub_server.lora.merge import MergeRecipe, MergeSpec, merge_adapters, merge_key
from adapterhub_server.lora.ops import Route, rank_class
from adapterhub_server.lora.pool import LoRAWeightPool
from adapterhub_server.lora.slots import SlotAllocator
from adapterhub_server.torch_threads import single_threaded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterLocation:
    """A servable adapter: the key it is cached under and the directory holding its files."""

    key: str
    """Stable identity (e.g. ``name@3``); two references to one version share a key."""
    path: Path
    created: int
    sha256: Mapping[str, str] | None = None
    """Expected sha256 per file name; checked before the files are parsed."""
    merge: MergeRecipe | None = None
    """Set for a per-request merge: the adapter is computed from these components (`path`
    is unused) under a key derived from the resolved components and the parameters."""


class AdapterSource(Protocol):
    """Maps a request's adapter reference to files on disk."""

    def locate(self, ref: str) -> AdapterLocation | None:
        """The adapter `ref` names, or None if unknown."""

    def list(self) -> Sequence[AdapterLocation]:
        """Every adapter that can be served."""


class StaticAdapterSource:
    """Adapters given at start-up (``--lora-modules name=path``)."""

    def __init__(self, adapters: Mapping[str, Path]) -> None:
        now = int(time.time())
        self._adapters = {
            name: AdapterLocation(key=name, path=Path(path), created=now)
            for name, path in adapters.items()
        }

    def locate(self, ref: str) -> AdapterLocation | None:
        return self._adapters.get(ref)

    def list(self) -> Sequence[AdapterLocation]:
        return list(self._adapters.values())


class ChainedAdapterSource:
    """Tries sources in order: start-up adapters first, then the registry."""

    def __init__(self, sources: Sequence[AdapterSource]) -> None:
        self.sources = list(sources)

    def locate(self, ref: str) -> AdapterLocation | None:
        for source in self.sources:
            loc = source.locate(ref)
            if loc is not None:
                return loc
        return None

    def list(self) -> Sequence[AdapterLocation]:
        seen: set[str] = set()
        out = []
        for source in self.sources:
            for loc in source.list():
                name = display_name(loc.key)
                if name not in seen:
                    seen.add(name)
                    out.append(loc)
        return out


def display_name(key: str) -> str:
    """What clients call an adapter: its key up to the version (``name@3`` -> ``name``)."""
    return key.split("@", 1)[0]


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was built (plain ints: readable from any thread)."""

    host_resident: int
    device_resident: int
    loads: int
    """Adapters read and validated from files."""
    device_writes: int
    """Adapters copied into a device slot."""
    evictions: int
    """Idle adapters dropped from a device slot to make room for another."""
    hits: int = 0
    """Admissions whose adapter was already in a device slot."""
    misses: int = 0
    """Admissions whose adapter had to be written into a slot (from host memory, or after
    loading its files); equals `device_writes`."""
    load_seconds: float = 0.0
    """Total wall time spent reading and validating adapter files."""


class AdapterCache:
    """Resolves, loads, slots and pins adapters for the engine (engine thread only, except
    the background file loads it starts)."""

    def __init__(
        self,
        source: AdapterSource,
        pool: LoRAWeightPool,
        targets: Mapping[str, TargetShape],
        *,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        embeddings: EmbeddingTargets | None = None,
        full_modules: FullModuleStore | None = None,
    ) -> None:
        """`embeddings` lets adapters with modules_to_save / trainable_token_indices load,
        and `full_modules` holds their device copies (both None: such adapters are refused)."""
        if max_cpu_loras < max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        self.source = source
        self.pool = pool
        self.targets = dict(targets)
        self.max_lora_rank = max_lora_rank
        self.embeddings = embeddings if full_modules is not None else None
        self.full_modules = full_modules
        self._has_full: dict[str, bool] = {}
        """Whether each adapter parsed so far has full modules or token rows, by key."""
        self.slots = SlotAllocator(max_loras, on_release=pool.release)
        self.max_cpu_loras = max_cpu_loras
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._identities: dict[str, str] = {}
        """Content identity of every adapter read so far, by key (see `content_identity`)."""
        self._loading: dict[str, Future[LoRAAdapter]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        self._loads = 0
        self._device_writes = 0
        self._evictions = 0
        self._hits = 0
        self._load_seconds = 0.0
        self.load_observer: Callable[[str, float], None] | None = None
        """Called with (key, seconds) after each successful file load, on the loader
        thread: metrics. It must be quick and must not raise."""

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def locate(self, ref: str | MergeSpec) -> AdapterLocation:
        """Resolve a reference (or every id of a merge) or raise `AdapterNotFoundError`."""
        if isinstance(ref, MergeSpec):
            return self._locate_merge(ref)
        loc = self.source.locate(ref)
        if loc is None:
            raise AdapterNotFoundError.for_model(str(ref))
        return loc

    def _locate_merge(self, spec: MergeSpec) -> AdapterLocation:
        components = []
        for ref in spec.ids:
            loc = self.source.locate(ref)
            if loc is None:
                raise AdapterNotFoundError(
                    f"merged_adapters: the adapter `{ref}` does not exist.",
                    param="merged_adapters.ids",
                )
            components.append(loc)
        # Resolved keys (name@N) plus recorded file hashes: every spelling of the same
        # versions shares one computed merge, and a new version gets a new one.
        key = merge_key(spec, [f"{c.key}#{_digest_text(c.sha256)}" for c in components])
        return AdapterLocation(
            key=f"merge:{key[:32]}",
            path=Path(),
            created=int(time.time()),
            merge=MergeRecipe(spec=spec, components=tuple(components)),
        )

    def load_now(self, loc: AdapterLocation) -> LoRAAdapter:
        """Read and validate an adapter synchronously and keep it in the host tier."""
        adapter = self._read(loc)
        self._put_host(loc.key, adapter)
        return adapter

    def acquire(self, loc: AdapterLocation) -> Route | None:
        """Pin the adapter in a device slot (and its full modules, if any, in the
        full-module room) and return its route.

        Returns None when it is not ready yet (files being read, or no free slot or room);
        the caller retries on a later step. Raises `AdapterValidationError` if its files
        cannot be served.
        """
        route = self._acquire_lora(loc)
        if route is None or self.full_modules is None:
            return route
        try:
            if self._acquire_full(loc):
                return route
        except BaseException:
            self.slots.unpin(loc.key)  # the request fails: it must not keep the slot
            raise
        self.slots.unpin(loc.key)
        return None

    def _acquire_full(self, loc: AdapterLocation) -> bool:
        """Pin the adapter's full-module copy on the device (True at once for an adapter
        without one); False while its files load or the room is full of pinned copies."""
        assert self.full_modules is not None
        key = loc.key
        if self.full_modules.pin_resident(key) or self._has_full.get(key) is False:
            return True
        adapter = self._host_get(key)
        if adapter is None:  # host copy evicted while its LoRA slot stayed resident
            self._start_load(loc)
            future = self._loading[key]
            if not future.done():
                return False
            del self._loading[key]
            adapter = future.result()
            self._put_host(key, adapter)
        if adapter.full_modules is None:
            return True
        return self.full_modules.acquire(key, adapter.full_modules)

    def _acquire_lora(self, loc: AdapterLocation) -> Route | None:
        """Pin the adapter in a device slot and return its route.

        Returns None when it is not ready yet (its files are being read in the background,
        or every slot holds a pinned adapter); the caller retries on a later step. Raises
        `AdapterValidationError` if its files cannot be served.
        """
        key = loc.key
        route = self.slots.lookup(key)
        if route is not None:
            self.slots.pin(key)
            self._hits += 1
            return route
        adapter = self._host_get(key)
        if adapter is None:
            self._start_load(loc)
            future = self._loading.get(key)
            if future is None or not future.done():
                return None
            del self._loading[key]
            adapter = future.result()  # re-raises the validation error for this request
            self._put_host(key, adapter)
        allocation = self.slots.allocate(key, rank_class(adapter.rank))
        if allocation is None:
            return None
        self._evictions += len(allocation.evicted)
        for victim in allocation.evicted:  # token rows live as long as the LoRA slot
            self._forget_full(victim)
        try:
            self.pool.write(allocation.route, adapter)
        except AdapterValidationError:
            # DoRA's scale over this base is checked at write time; nothing was written.
            self.slots.evict(key)
            raise
        self._device_writes += 1
        self.slots.pin(key)
        return allocation.route

    def release(self, key: str) -> None:
        self.slots.unpin(key)
        if self.full_modules is not None:
            self.full_modules.release(key)

    def _forget_full(self, key: str) -> None:
        if self.full_modules is not None:
            self.full_modules.forget(key)

    def content_identity(self, key: str) -> str:
        """What the adapter's cached KV is keyed by: a hash of its files' sha256, so two
        versions of one name never share and the same bytes under two names do. Known for
        every adapter that has been acquired (its files were read)."""
        with self._lock:
            return self._identities[key]

    def evict(self, key: str) -> bool:
        """Forget an adapter (e.g. deleted upstream) unless a running request pins it."""
        if self.pinned(key):
            return False
        self.slots.evict(key)
        self._forget_full(key)
        with self._lock:
            self._host.pop(key, None)
            self._identities.pop(key, None)
        return True

    def pinned(self, key: str) -> bool:
        """Whether a running request holds the adapter's slot (it cannot be evicted)."""
        return bool(self.slots.pinned(key))

    @property
    def max_slots(self) -> int:
        """Device slots for adapters (`--max-loras`)."""
        return self.slots.max_slots

    @property
    def dora_rows(self) -> Mapping[Route, int]:
        """The device slots' DoRA magnitude rows, as the batched LoRA path reads them."""
        return self.pool.dora_rows

    def full_module_weights(self, key: str) -> ResidentFullModules | None:
        """The resident full-module weights (head, embeddings, token rows) of an acquired
        adapter, or None if it has none."""
        return self.full_modules.get(key) if self.full_modules is not None else None

    @property
    def serves_full_modules(self) -> bool:
        """Whether any resident adapter carries full modules or token rows now."""
        return self.full_modules is not None and len(self.full_modules) > 0

    def list_locations(self) -> Sequence[AdapterLocation]:
        """Every adapter the source can serve now."""
        return self.source.list()

    def rank_of(self, key: str) -> int | None:
        """The adapter's rank if it has been parsed (and is still in host memory)."""
        with self._lock:
            adapter = self._host.get(key)
        return adapter.rank if adapter is not None else None

    def stats(self) -> CacheStats:
        return CacheStats(
            host_resident=len(self._host),
            device_resident=len(self.slots),
            loads=self._loads,
            device_writes=self._device_writes,
            evictions=self._evictions,
            hits=self._hits,
            misses=self._device_writes,
            load_seconds=self._load_seconds,
        )

    def _start_load(self, loc: AdapterLocation) -> None:
        if loc.key not in self._loading:
            self._loading[loc.key] = self._executor.submit(self._read, loc)

    def _read(self, loc: AdapterLocation) -> LoRAAdapter:
        # On the loader thread, or a server's worker thread (`load_now`), torch ops on more
        # than one thread would give that thread an OpenMP team of its own, which slows
        # every later decode step (`torch_threads`).
        with single_threaded():
            return self._read_files(loc)

    def _read_files(self, loc: AdapterLocation) -> LoRAAdapter:
        if loc.merge is not None:
            return self._compute_merge(loc, loc.merge)
        t0 = time.perf_counter()
        try:
            if loc.sha256:
                verify_files(loc.path, loc.sha256)
            adapter = load_adapter(
                loc.path,
                name=loc.key,
                targets=self.targets,
                max_rank=self.max_lora_rank,
                serving_dtype=self.pool.dtype,
                embeddings=self.embeddings,
            )
            digests = dict(loc.sha256 or {})
            if not digests:
                digests = {n: file_sha256(loc.path / n) for n in (CONFIG_FILE, WEIGHTS_FILE)}
        except (OSError, AdapterValidationError) as exc:
            if not loc.path.is_dir():
                # Deleted after the request resolved it (a registry version's directory
                # goes in one rename): for the request, that adapter no longer exists.
                raise AdapterNotFoundError.for_model(loc.key, why="it was deleted") from exc
            if isinstance(exc, OSError):
                raise AdapterValidationError(
                    f"{loc.key}: the adapter's files cannot be read ({exc.strerror})"
                ) from exc
            raise
        identity = files_identity(digests)
        with self._lock:
            self._identities[loc.key] = identity
        seconds = time.perf_counter() - t0
        self._loads += 1
        self._load_seconds += seconds
        logger.info("loaded adapter %s (rank %d) in %.1f ms", loc.key, adapter.rank, seconds * 1e3)
        if self.load_observer is not None:
            self.load_observer(loc.key, seconds)
        return adapter

    def _compute_merge(self, loc: AdapterLocation, recipe: MergeRecipe) -> LoRAAdapter:
        """Parse (or reuse) the components and merge them; the merge's content identity,
        which also seeds DARE's masks, hashes the components' content identities."""
        components = []
        for component in recipe.components:
            adapter = self._host_get(component.key)
            if adapter is None or component.key not in self._identities:
                adapter = self._read(component)
                self._put_host(component.key, adapter)
            components.append(adapter)
        with self._lock:
            identities = [self._identities[c.key] for c in recipe.components]
        identity = "merge:" + merge_key(recipe.spec, identities)
        merged = merge_adapters(
            components,
            recipe.spec,
            name=loc.key,
            seed_key=identity,
            max_rank=self.max_lora_rank,
            serving_dtype=self.pool.dtype,
            refs=[c.key for c in recipe.components],
        )
        with self._lock:
            self._identities[loc.key] = identity
        logger.info("merged %s (%s) as %s", recipe.spec.ids, recipe.spec.strategy, loc.key)
        return merged

    def _host_get(self, key: str) -> LoRAAdapter | None:
        with self._lock:
            adapter = self._host.get(key)
            if adapter is not None:
                self._host.move_to_end(key)
            return adapter

    def _put_host(self, key: str, adapter: LoRAAdapter) -> None:
        self._has_full[key] = adapter.full_modules is not None
        with self._lock:
            self._host[key] = adapter
            self._host.move_to_end(key)
            while len(self._host) > self.max_cpu_loras:
                # A host-evicted adapter still in a device slot keeps serving from there.
                self._host.popitem(last=False)


def files_identity(digests: Mapping[str, str]) -> str:
    """An adapter's content identity from its files' sha256 (`AdapterCache.content_identity`)."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def _digest_text(digests: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((digests or {}).items()))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file; `AdapterValidationError` naming the file if it is unreadable."""
    try:
        return hash_file(path)[0]
    except OSError as exc:
        # strerror, not str(exc): that names the path, and the message reaches clients.
        raise AdapterValidationError(f"{path.name}: cannot be read ({exc.strerror})") from exc


def verify_files(directory: Path, expected: Mapping[str, str]) -> None:
    """Raise `AdapterValidationError` naming the first file whose sha256 differs."""
    for filename, digest in expected.items():
        problem = mismatch(file_sha256(directory / filename), 0, digest)
        if problem:
            raise AdapterValidationError(f"{filename}: {problem}")
