"""Frozen base projections plus the batched LoRA deltas of whatever adapters a step routes.

The layer knows nothing of requests or scheduling: it reads the step's `LoRABatch` from a
shared `LoRAContext` that the engine sets before each forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapterhub_server.lora.ops import LoRABatch, add_lora
from adapterhub_server.lora.pool import LoRAWeightPool
from adapterhub_server.models.linear import FrozenLinear


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, in]`` -> ``[T, sum(out_j)]``; split by the caller."""
        y = self.base(x)
        batch = self.context.batch
        if batch is not None and batch.active:
            add_lora(y, x, self.pool.group_pools(self.group), batch)
        return y
