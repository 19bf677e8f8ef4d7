"""Frozen base projections plus the batched LoRA deltas of whatever adapters a step routes.

The layer knows nothing of requests or scheduling: it reads the step's `LoRABatch` from a
shared `LoRAContext` that the engine sets before each forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapterhub_server.frozen_linear import FrozenLinear
from adapterhub_server.lora.dora import apply_dora
from adapterhub_server.lora.ops import LoRABatch, add_lora
from adapterhub_server.lora.pool import LoRAWeightPool


class LoRAContext:
    """Holds the current step's routing; one instance is shared by every LoRA layer."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class PackedLoRALinear(nn.Module):
    """The base linears of one packed group run as one GEMM, plus their LoRA deltas.

    The member linears' weights are re-pointed at slices of the fused weight, so the fused
    copy costs no extra memory and the Hugging Face modules still see their own weights.
    """

    def __init__(
        self,
        bases: Sequence[nn.Linear],
        group: str,
        pool: LoRAWeightPool,
        context: LoRAContext,
    ) -> None:
        super().__init__()
        weight = torch.cat([b.weight.detach() for b in bases], dim=0)
        biases = [b.bias for b in bases]
        bias = None
        if any(x is not None for x in biases):
            bias = torch.cat(
                [
                    x.detach() if x is not None else weight.new_zeros(b.out_features)
                    for x, b in zip(biases, bases)
                ]
            )
        o = 0
        for b in bases:
            b.weight.data = weight[o : o + b.out_features]
            if b.bias is not None and bias is not None:
                b.bias.data = bias[o : o + b.out_features]
            o += b.out_features
        self.base = FrozenLinear(weight, bias)
        self.out_features = tuple(b.out_features for b in bases)
        self.group = group
        self.pool = pool
        self.context = context
        # DoRA's column scale is computed from the unpacked weight when an adapter is
        # written (FrozenLinear keeps it beside any prepacked copy).
        pool.attach_base(group, self.base.weight, self.base.bias)

        self._shared = _SharedOutput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in]`` -> ``[..., sum(out_j)]``."""
        x2 = x.reshape(-1, x.shape[-1])
        y = self.base(x2)
        batch = self.context.batch
        if batch is not None and batch.active:
            add_lora(y, x2, self.pool.group_pools(self.group), batch)
            if batch.dora_rows is not None:
                tables = self.pool.dora_tables(self.group)
                assert tables is not None, "DoRA tokens routed before any DoRA adapter was written"
                apply_dora(y, tables, batch.dora_tokens, batch.dora_rows)
        return y.view(*x.shape[:-1], y.shape[-1])

    def members(self) -> list[PackedMember]:
        """One module per member projection, to put where the model calls it."""
        return [PackedMember(self, j) for j in range(len(self.out_features))]

    def member_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s slice of the fused output for `x`.

        The model calls its q/k/v (or gate/up) projections one after another on the same
        input tensor: the first call runs the fused GEMM and LoRA once, the others read
        their slices, and the fused output is dropped once every member has read it.
        """
        shared = self._shared
        if x is not shared.input or shared.unread == 0:
            shared.parts = self(x).split(self.out_features, dim=-1)
            shared.input = x
            shared.unread = len(shared.parts)
        part = shared.parts[index]
        shared.unread -= 1
        if shared.unread == 0:
            shared.input, shared.parts = None, ()
        return part


class _SharedOutput:
    """The fused output its members read (a plain object: nn.Module attribute writes cost
    microseconds each, paid by every projection of every layer of every step)."""

    __slots__ = ("input", "parts", "unread")

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.unread = 0


class PackedMember(nn.Module):
    """One projection of a packed group, as the model sees it: ``[..., in] -> [..., out_j]``."""

    def __init__(self, packed: PackedLoRALinear, index: int) -> None:
        super().__init__()
        # Not a submodule: the group is registered once, where its first member was.
        self._packed = (packed,)
        self.index = index
        self.out_features = packed.out_features[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed[0].member_output(x, self.index)
