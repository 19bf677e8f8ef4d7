"""Device-resident adapter weights, per (packed module group, rank class).

Projections that read the same input are packed into one group (q/k/v; gate/up), so that the
model runs one base GEMM and one LoRA shrink for all of them (see ``lora.ops``). Capacity per
class grows by doubling (up to the slot limit), so memory follows the adapters actually
loaded instead of ``max_loras x max_rank`` up front.

DoRA adapters also get a row in per-group DoRA tables (`lora.dora`): their column scale g,
computed from the group's frozen base weight when the adapter is written. The tables exist
only once a DoRA adapter has been loaded, and hold one row per resident DoRA adapter (plus
the identity row 0), growing by doubling like the slot tensors.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.adapter import WEIGHTS_FILE, LoRAAdapter, TargetShape, magnitude_limit
from adapterhub_server.lora.dora import IDENTITY_ROW, DoRATables, column_scale
from adapterhub_server.lora.ops import PackedPool, Route

_INITIAL_SLOTS = 4

_DoRARow = tuple[torch.Tensor, torch.Tensor | None]
"""One group's DoRA row: (scale ``[sum(out_j)]``, shift ``[sum(out_j)]`` or None)."""

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
        weight_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """`dtype` is the serving dtype (activations, DoRA tables); `weight_dtype` (default
        `dtype`) the dtype A and B are kept in."""
        self.groups = {g.key: g for g in groups}
        self.max_slots = max_slots
        self.dtype = dtype
        self.weight_dtype = weight_dtype or dtype
        self.device = torch.device(device)
        self._pools: dict[str, dict[int, PackedPool]] = {g.key: {} for g in groups}
        self._capacity: dict[int, int] = {}
        self._bases: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._dora: dict[str, DoRATables] = {}
        self._dora_capacity = 0
        self._dora_rows: dict[Route, int] = {}
        self._free_dora_rows: list[int] = []
        self._dora_host: weakref.WeakKeyDictionary[LoRAAdapter, dict[str, _DoRARow]] = (
            weakref.WeakKeyDictionary()
        )
        """Each parsed DoRA adapter's rows, in host memory for as long as the adapter object
        lives (the host tier holds it): an adapter evicted from its slot and written again
        does not recompute them."""
        self.version = 0
        """Bumped whenever tensors are reallocated (a class grows or appears, the DoRA
        tables grow): anything holding their addresses, such as a captured CUDA graph, is
        stale after that."""

    def attach_base(self, group: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Give the pool read access to a group's frozen base layer, from which DoRA's column
        scale is computed when a DoRA adapter is written.

        Args:
            weight: ``[sum(out_j), in]`` the members' weights concatenated in output order
                (unpacked, the layout `F.linear` takes); bias: ``[sum(out_j)]`` or None.
        """
        g = self.groups[group]
        if tuple(weight.shape) != (sum(g.out_features), g.in_features):
            raise ValueError(f"base weight {tuple(weight.shape)} does not fit group {group}")
        self._bases[group] = (weight, bias)

    def group_pools(self, group: str) -> dict[int, PackedPool]:
        """Rank class -> packed pool for one group; the mapping handed to `add_lora`."""
        return self._pools[group]

    def capacity(self, rank_class: int) -> int:
        return self._capacity.get(rank_class, 0)

    @property
    def dora_rows(self) -> Mapping[Route, int]:
        """Route of each resident DoRA adapter -> its row in every group's DoRA tables
        (read-only: what `build_lora_batch` routes DoRA tokens by)."""
        return self._dora_rows

    def dora_tables(self, group: str) -> DoRATables | None:
        """The group's DoRA tables, or None while no DoRA adapter has been written."""
        return self._dora.get(group)

    def nbytes(self) -> int:
        lora = sum(
            a.nbytes + sum(b.nbytes for b in bs)
            for pools in self._pools.values()
            for a, bs in pools.values()
        )
        dora = sum(
            t.scale.nbytes + (t.shift.nbytes if t.shift is not None else 0)
            for t in self._dora.values()
        )
        return lora + dora

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
        kw = {"dtype": self.weight_dtype, "device": self.device}
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

    def release(self, route: Route) -> None:
        """The adapter in `route` left its slot: free its DoRA row, if it had one."""
        row = self._dora_rows.pop(route, None)
        if row is not None:
            self._free_dora_rows.append(row)

    def write(self, route: Route, adapter: LoRAAdapter) -> None:
        """Copy an adapter into its slot; modules it does not adapt are zeroed.

        Raises `AdapterValidationError` (with nothing written) for a DoRA adapter whose
        column scale over this base is not finite or too large for the serving dtype.
        """
        scales = None
        if adapter.use_dora:
            scales = self._dora_host.get(adapter)
            if scales is None:
                scales = self._dora_host[adapter] = self._dora_scales(adapter)
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
        self.release(route)
        if scales is not None:
            row = self._take_dora_row()
            for key, (scale, shift) in scales.items():
                tables = self._dora[key]
                tables.scale[row].copy_(scale)
                if tables.shift is not None:
                    assert shift is not None
                    tables.shift[row].copy_(shift)
            self._dora_rows[route] = row

    def _dora_scales(self, adapter: LoRAAdapter) -> dict[str, _DoRARow]:
        """Per group, the DoRA row of `adapter`: (scale g ``[sum(out_j)]``, shift
        ``(1 - g) * bias`` or None without a bias), float32 in host memory. Members it does
        not adapt get g = 1. Computed before anything is written, so a refusal leaves the
        pool as it was."""
        limit = magnitude_limit(self.dtype)
        out: dict[str, _DoRARow] = {}
        for key, g in self.groups.items():
            weight, bias = self._bases.get(key, (None, None))
            parts = []
            o = 0
            for name, size in zip(g.modules, g.out_features):
                module = adapter.modules.get(name)
                if module is None or module.magnitude is None:
                    parts.append(torch.ones(size))
                elif weight is None:
                    raise ValueError(f"no base weight attached for group {key} (DoRA needs it)")
                else:
                    scale = column_scale(
                        weight[o : o + size], module.a, module.b, module.scale, module.magnitude
                    )
                    _check_column_scale(name, scale, limit, self.dtype)
                    parts.append(scale.cpu())
                o += size
            scale = torch.cat(parts)
            shift = (1 - scale) * bias.to("cpu", torch.float32) if bias is not None else None
            out[key] = (scale, shift)
        return out

    def _take_dora_row(self) -> int:
        """A free row of the DoRA tables, growing them (by doubling) when none is."""
        if not self._free_dora_rows:
            old = self._dora_capacity
            # Row 0 is the identity; at most max_slots adapters are resident at once.
            new = min(max(1 + _INITIAL_SLOTS, 2 * old), self.max_slots + 1)
            if new <= old:
                raise RuntimeError("every DoRA row is taken: slots were reused unreleased")
            kw = {"dtype": self.dtype, "device": self.device}
            for key in self.groups:
                width = sum(self.groups[key].out_features)
                scale = torch.ones(new, width, **kw)
                has_bias = self._bases.get(key, (None, None))[1] is not None
                shift = torch.zeros(new, width, **kw) if has_bias else None
                previous = self._dora.get(key)
                if previous is not None:
                    scale[:old].copy_(previous.scale)
                    if shift is not None and previous.shift is not None:
                        shift[:old].copy_(previous.shift)
                self._dora[key] = DoRATables(scale=scale, shift=shift)
            self._free_dora_rows = list(range(new - 1, max(old, IDENTITY_ROW + 1) - 1, -1))
            self._dora_capacity = new
            self.version += 1
        return self._free_dora_rows.pop()


def _check_column_scale(module: str, scale: torch.Tensor, limit: float, dtype: torch.dtype) -> None:
    """Refuse a DoRA module whose scale g = m / ||W + s * B @ A||_row is not finite or could
    overflow `dtype` (it multiplies the module's whole output, see `magnitude_limit`)."""
    finite = torch.isfinite(scale)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: module {module!r}: its DoRA scale m / ||W + scale * B @ A|| is "
            f"not finite at output row {row} (that row of the adapted base weight has norm 0); "
            "PEFT would produce NaN or Inf there",
            param="file",
        )
    largest = float(scale.abs().max())
    if largest > limit:
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: module {module!r}: its DoRA magnitude over the row norms of the "
            f"adapted base weight scales outputs by up to {largest:.3g}, above the bound "
            f"{limit:.3g} for serving in {str(dtype).removeprefix('torch.')}; the magnitude "
            "vector is corrupt or was trained for another base model",
            param="file",
        )
