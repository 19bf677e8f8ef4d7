"""Device-resident adapter weights, per (packed module group, rank class).

Projections that read the same input are packed into one group (q/k/v; gate/up), so that the
model runs one base GEMM and one LoRA shrink for all of them (see ``lora.ops``). Capacity per
class grows by doubling (up to the slot limit), so memory follows the adapters actually
loaded instead of ``max_loras x max_rank`` up front.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adapterhub_server.lora.adapter import LoRAAdapter, TargetShape
from adapterhub_server.lora.ops import PackedPool, Route

_INITIAL_SLOTS = 4

PACKING: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""Packed group name -> member projections, in output-column order."""


@dataclass(frozen=True)
class PackedGroup:
    """Modules sharing one input; their outputs are concatenated in `modules` order."""

    key: str
    """e.g. ``model.layers.0.self_attn.qkv_proj``."""
    modules: tuple[str, ...]
    """Full module paths, e.g. ``model.layers.0.self_attn.q_proj``."""
    in_features: int
    out_features: tuple[int, ...]


def packed_groups(targets: Mapping[str, TargetShape]) -> list[PackedGroup]:
    """Group adaptable modules: packed where every member exists, single otherwise."""
    by_parent: dict[str, dict[str, str]] = defaultdict(dict)
    for key in targets:
        parent, _, leaf = key.rpartition(".")
        by_parent[parent][leaf] = key
    groups: list[PackedGroup] = []
    for parent, leaves in by_parent.items():
        remaining = dict(leaves)
        for name, members in PACKING.items():
            if all(m in remaining for m in members):
                keys = tuple(remaining.pop(m) for m in members)
                groups.append(
                    PackedGroup(
                        key=f"{parent}.{name}",
                        modules=keys,
                        in_features=targets[keys[0]].in_features,
                        out_features=tuple(targets[k].out_features for k in keys),
                    )
                )
        for key in remaining.values():
            shape = targets[key]
            groups.append(PackedGroup(key, (key,), shape.in_features, (shape.out_features,)))
    return groups


class LoRAWeightPool:
    """For each packed group and rank class c: A ``[slots, m * c, in]`` and one
    B ``[slots, c, out_j]`` per member module (transposed, scale folded in)."""

    def __init__(
        self,
        groups: Sequence[PackedGroup],
        *,
        max_slots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.groups = {g.key: g for g in groups}
        self.max_slots = max_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self._pools: dict[str, dict[int, PackedPool]] = {g.key: {} for g in groups}
        self._capacity: dict[int, int] = {}
        self.version = 0
        """Bumped whenever tensors are reallocated (a class grows or appears): anything
        holding their addresses, such as a captured CUDA graph, is stale after that."""

    def group_pools(self, group: str) -> dict[int, PackedPool]:
        """Rank class -> packed pool for one group; the mapping handed to `add_lora`."""
        return self._pools[group]

    def capacity(self, rank_class: int) -> int:
        return self._capacity.get(rank_class, 0)

    def nbytes(self) -> int:
        return sum(
            a.nbytes + sum(b.nbytes for b in bs)
            for pools in self._pools.values()
            for a, bs in pools.values()
        )

    def ensure_capacity(self, rank_class: int, slots: int) -> None:
        """Grow the class's tensors (by doubling) so that `slots` slots fit."""
        current = self._capacity.get(rank_class, 0)
        if slots <= current:
            return
        new = max(_INITIAL_SLOTS, current)
        while new < slots:
            new *= 2
        new = min(max(new, slots), self.max_slots)
        c = rank_class
        kw = {"dtype": self.dtype, "device": self.device}
        for key, g in self.groups.items():
            a = torch.zeros(new, len(g.modules) * c, g.in_features, **kw)
            bs = tuple(torch.zeros(new, c, out, **kw) for out in g.out_features)
            old = self._pools[key].get(c)
            if old is not None:
                a[:current].copy_(old[0])
                for b, b_old in zip(bs, old[1]):
                    b[:current].copy_(b_old)
            self._pools[key][c] = (a, bs)
        self._capacity[c] = new
        self.version += 1

    def rank_classes(self) -> list[int]:
        """The classes that have device tensors, ascending."""
        return sorted(self._capacity)

    def write(self, route: Route, adapter: LoRAAdapter) -> None:
        """Copy an adapter into its slot; modules it does not adapt are zeroed."""
        c, slot = route
        self.ensure_capacity(c, slot + 1)
        for key, g in self.groups.items():
            a, bs = self._pools[key][c]
            a[slot].zero_()
            for j, (name, b) in enumerate(zip(g.modules, bs)):
                b[slot].zero_()
                module = adapter.modules.get(name)
                if module is None:
                    continue
                r = module.a.shape[0]
                a[slot, j * c : j * c + r].copy_(module.a)
                # Folding the scale into B once here saves a multiply per token per layer.
                b[slot, :r].copy_(module.b.T * module.scale)
