"""Device slot bookkeeping: which adapter sits in which (rank class, slot), LRU, pinning.

Pure bookkeeping (no tensors), so the eviction policy can be tested on its own. An adapter
used by any running request is pinned (a reference count) and never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapterhub_server.lora.ops import Route


@dataclass
class Allocation:
    route: Route
    evicted: list[str]
    """Adapters that were evicted to make room (their slots may be reused)."""


class SlotAllocator:
    """At most `max_slots` adapters resident on the device, evicting idle ones LRU-first."""

    def __init__(
        self, max_slots: int, *, on_release: Callable[[Route], None] | None = None
    ) -> None:
        """`on_release` is called with a slot's route whenever its adapter leaves it
        (evicted or dropped), so that state kept per slot elsewhere (the pool's DoRA rows)
        is freed with it."""
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.max_slots = max_slots
        self.on_release = on_release
        self._routes: OrderedDict[str, Route] = OrderedDict()  # LRU order, oldest first
        self._pins: dict[str, int] = {}
        self._used: dict[int, set[int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._routes

    def __len__(self) -> int:
        return len(self._routes)

    def lookup(self, name: str) -> Route | None:
        """The adapter's route if resident (and mark it most recently used)."""
        route = self._routes.get(name)
        if route is not None:
            self._routes.move_to_end(name)
        return route

    def allocate(self, name: str, rank_class: int) -> Allocation | None:
        """Give `name` a slot in `rank_class`, evicting idle adapters if needed.

        Returns None when every resident adapter is pinned and no slot is free.
        """
        if name in self._routes:
            raise ValueError(f"adapter {name!r} is already resident")
        evicted: list[str] = []
        while len(self._routes) >= self.max_slots:
            victim = next((n for n in self._routes if not self._pins.get(n)), None)
            if victim is None:
                return None
            self._release_slot(victim)
            evicted.append(victim)
        used = self._used.setdefault(rank_class, set())
        # Lowest free slot keeps a class's active slots dense, so a step's slot span (and
        # the work of the grouped op) stays small.
        slot = next(i for i in range(len(used) + 1) if i not in used)
        used.add(slot)
        self._routes[name] = (rank_class, slot)
        return Allocation(route=(rank_class, slot), evicted=evicted)

    def pin(self, name: str) -> None:
        if name not in self._routes:
            raise KeyError(name)
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        count = self._pins.get(name, 0)
        if count <= 0:
            raise ValueError(f"adapter {name!r} is not pinned")
        if count == 1:
            del self._pins[name]
        else:
            self._pins[name] = count - 1

    def pinned(self, name: str) -> bool:
        return self._pins.get(name, 0) > 0

    def evict(self, name: str) -> bool:
        """Drop an idle adapter (e.g. deleted upstream). False if pinned or absent."""
        if name not in self._routes or self.pinned(name):
            return False
        self._release_slot(name)
        return True

    def capacity_needed(self, rank_class: int) -> int:
        """Slots the class's tensors must hold: one past the highest used slot."""
        used = self._used.get(rank_class)
        return max(used) + 1 if used else 0

    def _release_slot(self, name: str) -> None:
        cls, slot = self._routes.pop(name)
        self._used[cls].discard(slot)
        if self.on_release is not None:
            self.on_release((cls, slot))
