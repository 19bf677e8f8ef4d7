"""Push a shared registry's deletes to this replica's engine (PostgreSQL LISTEN/NOTIFY).

Names and aliases already resolve from the shared index on every request, so a deleted
version answers 404 and a moved alias serves its new target everywhere at once. What a
replica still holds is the deleted version's weights in its adapter cache (and, with S3
blobs, its downloaded copy): `RegistryEventListener` evicts them through the same engine
path a local DELETE uses (`retire_adapter`: between steps, never while a running request
pins the adapter; it retries until those requests end).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from adapterhub_server.errors import ConflictError
from adapterhub_server.registry.registry import Registry

logger = logging.getLogger(__name__)

RETRY_S = 0.2
"""How often eviction of a pinned adapter is retried."""


class RegistryEventListener:
    """A daemon thread applying `registry.index`'s change events to `engine`."""

    def __init__(self, registry: Registry, engine: Any) -> None:
        self.registry = registry
        self.engine = engine
        self._stop = threading.Event()
        self.ready = threading.Event()
        """Set once the listener is subscribed (tests wait on it)."""
        self._thread = threading.Thread(target=self._run, name="registry-events", daemon=True)
        self._retire = threading.Thread(
            target=self._retire_loop, name="registry-evict", daemon=True
        )
        self._pending: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()

    @staticmethod
    def supported(registry: Registry) -> bool:
        return hasattr(registry.index, "listen")

    def start(self) -> None:
        self._thread.start()
        self._retire.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._retire):
            if thread.is_alive():
                thread.join(timeout)

    def _run(self) -> None:
        self.registry.index.listen(self._on_event, self._stop, ready=self.ready)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "deleted":
            name, version = event.get("name"), event.get("version")
            if isinstance(name, str) and isinstance(version, int):
                with self._lock:
                    self._pending.add((name, version))
                self._wake.set()
        elif event.get("event") == "alias":
            logger.info(
                "registry: alias %s@%s -> %s",
                event.get("name"),
                event.get("alias"),
                event.get("version"),
            )

    def _retire_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(RETRY_S)
            self._wake.clear()
            with self._lock:
                work = sorted(self._pending)
            for name, version in work:
                if self._evict(name, version):
                    with self._lock:
                        self._pending.discard((name, version))

    def _evict(self, name: str, version: int) -> bool:
        key = f"{name}@{version}"
        blobs = self.registry.blobs

        def drop_local_copy() -> None:
            evict_local = getattr(blobs, "evict_local", None)
            if evict_local is not None:
                evict_local(name, version)

        try:
            asyncio.run(self.engine.retire_adapter(key, drop_local_copy))
        except ConflictError:
            return False  # pinned by running requests: retried shortly
        except Exception:
            logger.exception("evicting deleted adapter %s failed; retrying", key)
            time.sleep(RETRY_S)
            return False
        logger.info("evicted %s: deleted on another replica", key)
        return True
