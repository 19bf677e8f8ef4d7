"""Frozen linear layers with weights prepacked once for a CPU GEMM.

Decode steps multiply a few rows (one per sequence) by large frozen weights. For that shape
a weight reordered once into a blocked layout is several times faster than ``F.linear``
(``bench/linear_cpu.py`` measures it: 1.7-3.3x for SmolLM2's projections and 3.5x for its
lm_head at 16 rows with oneDNN), the same trick ``torch.compile``'s CPU freezing applies.
float32 weights go to this project's C GEMM (`cpu_gemm`), which streams them faster than
oneDNN does at decode sizes, and to ``F.linear`` for prefill-sized inputs (past
`cpu_gemm.MAX_ROWS` rows, where MKL's GEMM is within ~10% of oneDNN's); bfloat16 weights (and
float32 ones where that kernel is off or cannot be built) to oneDNN's prepacked GEMM. The
results are the same GEMM up to float summation order. Elsewhere (CUDA, or a torch built
without oneDNN) this is ``F.linear``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub_server import cpu_gemm

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
        """The weight in oneDNN's layout, or None."""
        self.gemm_packed: torch.Tensor | None = None
        """The weight in `cpu_gemm`'s layout (float32), or None."""
        if pack and (bias is None or (bias.dtype == weight.dtype and bias.is_contiguous())):
            self.gemm_packed = cpu_gemm.pack(weight)
        if self.gemm_packed is None and pack and _can_pack(weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
            except RuntimeError as exc:  # an unusual shape or build: the plain path still works
                logger.debug("weight prepacking unavailable (%s); using F.linear", exc)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, in]`` -> ``[T, out]``."""
        if (
            self.gemm_packed is not None
            and x.dim() == 2
            and x.shape[0] <= cpu_gemm.MAX_ROWS
            and x.dtype == self.weight.dtype
            and not x.requires_grad  # the kernel has no backward
            and not torch.compiler.is_compiling()  # a traced step must stay torch ops
        ):
            if x.stride(1) != 1:
                x = x.contiguous()
            return cpu_gemm.linear(x, self.gemm_packed, self.bias, self.weight.shape[0])
        if self.packed is not None and x.dim() == 2 and x.dtype == self.weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.packed, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)
