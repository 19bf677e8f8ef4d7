"""Device slot LRU: pinned adapters are never evicted."""

from __future__ import annotations

import random

import pytest

from adapterhub_server.lora.slots import SlotAllocator


def test_allocates_lowest_free_slot_per_class() -> None:
    slots = SlotAllocator(4)
    assert slots.allocate("a", 8).route == (8, 0)
    assert slots.allocate("b", 16).route == (16, 0)
    assert slots.allocate("c", 8).route == (8, 1)
    assert slots.capacity_needed(8) == 2
    assert slots.evict("a")
    assert slots.allocate("d", 8).route == (8, 0)


def test_lru_evicts_least_recently_used_idle_adapter() -> None:
    slots = SlotAllocator(2)
    slots.allocate("a", 8)
    slots.allocate("b", 8)
    slots.lookup("a")  # a is now the most recently used
    allocation = slots.allocate("c", 8)
    assert allocation is not None
    assert allocation.evicted == ["b"]
    assert "a" in slots and "c" in slots and "b" not in slots


def test_pinned_adapter_is_never_evicted() -> None:
    slots = SlotAllocator(2)
    slots.allocate("a", 8)
    slots.pin("a")
    slots.allocate("b", 8)
    allocation = slots.allocate("c", 8)
    assert allocation is not None and allocation.evicted == ["b"]
    slots.pin("c")
    assert slots.allocate("d", 8) is None  # everything pinned: caller must wait
    assert "a" in slots and "c" in slots
    assert not slots.evict("a")
    slots.unpin("a")
    allocation = slots.allocate("d", 8)
    assert allocation is not None and allocation.evicted == ["a"]


def test_pins_are_reference_counted() -> None:
    slots = SlotAllocator(1)
    slots.allocate("a", 8)
    slots.pin("a")
    slots.pin("a")
    slots.unpin("a")
    assert slots.allocate("b", 8) is None
    slots.unpin("a")
    assert slots.allocate("b", 8) is not None
    with pytest.raises(ValueError):
        slots.unpin("b")


def test_random_churn_never_evicts_pinned() -> None:
    rng = random.Random(0)
    slots = SlotAllocator(4)
    pins: dict[str, int] = {}
    for _ in range(2000):
        name = f"ad{rng.randrange(12)}"
        if rng.random() < 0.5 and pins.get(name):
            slots.unpin(name)
            pins[name] -= 1
            continue
        if slots.lookup(name) is None:
            allocation = slots.allocate(name, rng.choice([8, 16, 64]))
            if allocation is None:
                assert all(pins.get(n) for n in list(pins) if n in slots)
                assert len(slots) == 4
                continue
            assert not any(pins.get(v) for v in allocation.evicted)
        slots.pin(name)
        pins[name] = pins.get(name, 0) + 1
        for n, count in pins.items():
            if count:
                assert n in slots
