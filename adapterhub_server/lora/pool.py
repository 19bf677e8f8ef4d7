"""Device-resident adapter weights, one pair of tensors per (adapted module, rank class).

Capacity per class grows by doubling (up to the slot limit) so memory follows the adapters
actually loaded instead of ``max_loras x max_rank`` up front.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapterhub_server.lora.adapter import LoRAAdapter, TargetShape
from adapterhub_server.lora.ops import Route

_INITIAL_SLOTS = 4


class LoRAWeightPool:
    """For each adapted module and rank class c: A ``[slots, c, in]``, B ``[slots, c, out]``.

    B is stored transposed with the adapter's scale folded in (see ``lora.ops``).
    """

    def __init__(
        self,
        targets: Mapping[str, TargetShape],
        *,
        max_slots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.targets = dict(targets)
        self.max_slots = max_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self._pools: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {
            name: {} for name in self.targets
        }
        self._capacity: dict[int, int] = {}

    def module_pools(self, module: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Rank class -> (A, B) for one module; the mapping the layer hands to `add_lora`."""
        return self._pools[module]

    def capacity(self, rank_class: int) -> int:
        return self._capacity.get(rank_class, 0)

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for p in self._pools.values() for a, b in p.values())

    def ensure_capacity(self, rank_class: int, slots: int) -> None:
        """Grow the class's tensors (by doubling) so that `slots` slots fit."""
        current = self._capacity.get(rank_class, 0)
        if slots <= current:
            return
        new = max(_INITIAL_SLOTS, current)
        while new < slots:
            new *= 2
        new = min(max(new, slots), self.max_slots)
        for name, shape in self.targets.items():
            a = torch.zeros(
                new, rank_class, shape.in_features, dtype=self.dtype, device=self.device
            )
            b = torch.zeros(
                new, rank_class, shape.out_features, dtype=self.dtype, device=self.device
            )
            old = self._pools[name].get(rank_class)
            if old is not None:
                a[:current].copy_(old[0])
                b[:current].copy_(old[1])
            self._pools[name][rank_class] = (a, b)
        self._capacity[rank_class] = new

    def write(self, route: Route, adapter: LoRAAdapter) -> None:
        """Copy an adapter into its slot; modules it does not adapt are zeroed."""
        cls, slot = route
        self.ensure_capacity(cls, slot + 1)
        for name in self.targets:
            a_pool, b_pool = self._pools[name][cls]
            a_pool[slot].zero_()
            b_pool[slot].zero_()
            module = adapter.modules.get(name)
            if module is None:
                continue
            r = module.a.shape[0]
            a_pool[slot, :r].copy_(module.a)
            # Folding the scale into B once here saves a multiply per token per layer.
            b_pool[slot, :r].copy_(module.b.T * module.scale)
