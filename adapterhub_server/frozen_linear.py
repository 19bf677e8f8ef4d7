"""Frozen linear layers with weights prepacked for the CPU's GEMM library.

Decode steps multiply a few rows (one per sequence) by large frozen weights. For that shape
oneDNN with a weight reordered once into its blocked layout is several times faster than
``F.linear`` (``bench/linear_cpu.py`` measures it: 1.7-3.3x for SmolLM2's projections and
3.5x for its lm_head at 16 rows), the same trick ``torch.compile``'s CPU freezing applies. The results are
the same GEMM up to float summation order. Elsewhere (CUDA, or a torch built without oneDNN)
this is ``F.linear``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Hint for the packed layout: decode batches are tens of rows; measured fine from 1 to 512.
_ROWS_HINT = 16


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class FrozenLinear(nn.Module):
    """``y = x @ weight.T + bias`` for a weight that never changes after construction."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, pack: bool = True):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.packed: torch.Tensor | None = None
        if pack and _can_pack(weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
            except RuntimeError as exc:  # an unusual shape or build: the plain path still works
                logger.debug("weight prepacking unavailable (%s); using F.linear", exc)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, in]`` -> ``[T, out]``."""
        if self.packed is not None and x.dim() == 2 and x.dtype == self.weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.packed, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)
