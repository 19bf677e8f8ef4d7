"""A frozen base linear plus the batched LoRA deltas of whatever adapters this step routes.

The layer knows nothing of requests or scheduling: it reads the step's `LoRABatch` from a
shared `LoRAContext` that the engine sets before each forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterhub_server.lora.ops import LoRABatch, add_lora
from adapterhub_server.lora.pool import LoRAWeightPool


class LoRAContext:
    """Holds the current step's routing; one instance is shared by every LoRA layer."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    """``y = base(x) + add_lora(x)``; costs one attribute check when nothing is routed."""

    def __init__(
        self, base: nn.Linear, key: str, pool: LoRAWeightPool, context: LoRAContext
    ) -> None:
        super().__init__()
        self.base = base
        self.key = key
        self.pool = pool
        self.context = context

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, in]`` -> ``[T, out]``."""
        y = self.base(x)
        batch = self.context.batch
        if batch is not None and batch.active:
            add_lora(y, x, self.pool.module_pools(self.key), batch)
        return y
