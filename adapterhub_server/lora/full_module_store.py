"""Device copies of adapters' full modules and trainable token rows, bounded and pinned.

A full copy of an embedding or output head is `[vocab, hidden]`: for a 1B-class Llama
(vocab 128256, hidden 2048) 525 MB in bfloat16, as much as thousands of rank-16 LoRA slots.
So adapters with a full copy take a separate, bounded room: at most `max_adapters` of them
hold device copies at once, idle ones are evicted least-recently-used first, and one in use
by a running request is pinned. An adapter that finds the room full of pinned copies waits
(`acquire` returns False) like one that finds no free LoRA slot.

Trainable token rows are `[k, hidden]` for a few k: they take no room of their own and live
as long as the adapter's LoRA slot (the adapter cache drops them with it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.full_modules import FullModules, TokenRows
from adapterhub_server.lora.slots import SlotAllocator

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ResidentFullModules:
    """One adapter's `FullModules` on the device, with what routing a step needs."""

    modules: FullModules
    """The device copy (tensors shared between tied modules stay shared)."""
    embed_index: dict[int, int]
    """Token id -> row of `modules.embed_tokens` (empty without embedding token rows)."""


def _to_device(full: FullModules, device: torch.device, dtype: torch.dtype) -> FullModules:
    copies: dict[int, torch.Tensor] = {}

    def move(t: torch.Tensor | None, as_dtype: torch.dtype = dtype) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in copies:
            copies[id(t)] = t.to(device=device, dtype=as_dtype).contiguous()
        return copies[id(t)]

    rows: dict[int, TokenRows] = {}

    def move_rows(r: TokenRows | None) -> TokenRows | None:
        if r is None:
            return None
        if id(r) not in rows:
            rows[id(r)] = TokenRows(indices=move(r.indices, torch.long), rows=move(r.rows))
        return rows[id(r)]

    return FullModules(
        embed_table=move(full.embed_table),
        head_weight=move(full.head_weight),
        head_bias=move(full.head_bias),
        embed_tokens=move_rows(full.embed_tokens),
        head_tokens=move_rows(full.head_tokens),
    )


class FullModuleStore:
    """Which adapters' full modules are on the device (engine thread only)."""

    def __init__(self, max_adapters: int, *, device: torch.device, dtype: torch.dtype) -> None:
        """`max_adapters`: adapters with a full embedding or head copy resident at once
        (0: such adapters are refused)."""
        if max_adapters < 0:
            raise ValueError("max_adapters must be >= 0")
        self.max_adapters = max_adapters
        self.device = device
        self.dtype = dtype
        self._tables = SlotAllocator(max_adapters) if max_adapters else None
        """LRU and pins of the adapters holding full copies (slots unused)."""
        self._resident: dict[str, ResidentFullModules] = {}
        self._token_pins: dict[str, int] = {}
        """Pins of the adapters with token rows only."""
        self.evictions = 0
        """Full copies dropped to make room for another adapter's."""

    def __len__(self) -> int:
        return len(self._resident)

    def get(self, key: str) -> ResidentFullModules | None:
        """The adapter's device copy, if resident."""
        return self._resident.get(key)

    def pin_resident(self, key: str) -> bool:
        """Pin the adapter's device copy if it is resident; False if it is not."""
        if key not in self._resident:
            return False
        self._pin(key)
        return True

    def acquire(self, key: str, full: FullModules) -> bool:
        """Make the adapter's copy resident and pin it; False when the room is full of
        pinned copies (retry later). Raises AdapterValidationError when this server keeps
        no full copies at all."""
        if self.pin_resident(key):
            return True
        if full.has_tables:
            if self._tables is None:
                raise AdapterValidationError(
                    f"{key}: the adapter carries a full copy of the embedding or output head "
                    "(modules_to_save), and this server keeps none "
                    "(--max-full-module-adapters 0)"
                )
            allocation = self._tables.allocate(key, 0)
            if allocation is None:
                return False
            for victim in allocation.evicted:
                del self._resident[victim]
                self.evictions += 1
                logger.debug("evicted the full-module copy of %s for %s", victim, key)
        modules = _to_device(full, self.device, self.dtype)
        index: dict[int, int] = {}
        if full.embed_tokens is not None:
            index = {int(i): j for j, i in enumerate(full.embed_tokens.indices.tolist())}
        self._resident[key] = ResidentFullModules(modules=modules, embed_index=index)
        self._pin(key)
        return True

    def release(self, key: str) -> None:
        """Unpin the adapter's copy, if this store pinned it."""
        if self._tables is not None and self._tables.pinned(key):
            self._tables.unpin(key)
        elif self._token_pins.get(key):
            self._token_pins[key] -= 1
            if not self._token_pins[key]:
                del self._token_pins[key]

    def pinned(self, key: str) -> bool:
        tables = self._tables is not None and self._tables.pinned(key)
        return tables or bool(self._token_pins.get(key))

    def forget(self, key: str) -> bool:
        """Drop an idle adapter's copy (its LoRA slot went, or it was deleted)."""
        if key not in self._resident or self.pinned(key):
            return False
        if self._tables is not None:
            self._tables.evict(key)
        del self._resident[key]
        return True

    def _pin(self, key: str) -> None:
        if self._tables is not None and key in self._tables:
            self._tables.lookup(key)  # most recently used
            self._tables.pin(key)
        else:
            self._token_pins[key] = self._token_pins.get(key, 0) + 1
