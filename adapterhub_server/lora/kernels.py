"""The Triton LoRA kernels as torch custom ops, and the per-step token grouping they read.

`lora_shrink` and `lora_expand` are registered as ``torch.ops.adapterhub.*`` with fake
(meta) implementations, so `torch.compile` traces through them without running them. They
are used on CUDA when Triton is installed (`EngineConfig.lora_kernel`); elsewhere the torch
ops in `lora/ops.py` serve, and `add_lora_reference` there is the loop both are tested
against.

Semantics, for every group g and every token t in it (slot s = ``slots[g]``):

    shrink:  h[t] = A[s] @ x[t]                                      (float32)
    expand:  y[t, o_j : o_j + N_j] += h[t, j*R : (j+1)*R] @ B_j[s]   (each module j, in place)
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adapterhub_server.models.transfer import to_device

Route = tuple[int, int]


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and its kernels can run here (a CUDA device, or
    ``TRITON_INTERPRET=1`` on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class KernelMapping:
    """One step's tokens of one rank class, grouped by adapter slot (device tensors)."""

    rank_class: int
    token_indices: torch.Tensor
    """``[n]`` int32 token ids, group after group."""
    slots: torch.Tensor
    """``[G]`` int32 slot of each group."""
    starts: torch.Tensor
    """``[G]`` int32 first index of each group in `token_indices`."""
    counts: torch.Tensor
    """``[G]`` int32 tokens in each group."""
    max_count: int
    """Largest group (host int: sizes the launch grid without a device sync)."""


def build_kernel_mappings(
    routes: Sequence[Route | None], device: torch.device | str
) -> list[KernelMapping]:
    """Group the tokens of a step by (rank class, slot).

    Args:
        routes: per token of the flat batch, ``(rank_class, slot)`` or None (base model).
    Returns:
        One mapping per rank class in use, its tensors copied to `device` in one transfer.
    """
    by_class: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for t, route in enumerate(routes):
        if route is not None:
            by_class[route[0]][route[1]].append(t)
    mappings = []
    for cls, groups in sorted(by_class.items()):
        slots = sorted(groups)
        counts = [len(groups[s]) for s in slots]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        tokens = [t for s in slots for t in groups[s]]
        # One host tensor, one copy: [tokens | slots | starts | counts].
        packed = to_device(tokens + slots + starts + counts, torch.int32, device)
        n, g = len(tokens), len(slots)
        mappings.append(
            KernelMapping(
                rank_class=cls,
                token_indices=packed[:n],
                slots=packed[n : n + g],
                starts=packed[n + g : n + 2 * g],
                counts=packed[n + 2 * g :],
                max_count=max(counts),
            )
        )
    return mappings


@torch.library.custom_op("adapterhub::lora_shrink", mutates_args=())
def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    token_indices: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    max_count: int,
) -> torch.Tensor:
    """``[T, K] x [slots, N, K] -> [T, N]`` float32 (see the module docstring)."""
    from adapterhub_server.lora import triton_kernels

    return triton_kernels.shrink(x, a, token_indices, slots, starts, counts, max_count)


@lora_shrink.register_fake
def _lora_shrink_fake(
    x: torch.Tensor,
    a: torch.Tensor,
    token_indices: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    max_count: int,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], a.shape[1]), dtype=torch.float32)


@torch.library.custom_op("adapterhub::lora_expand", mutates_args=("y",))
def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    bs: list[torch.Tensor],
    token_indices: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    max_count: int,
) -> None:
    """``y[t, o_j:+N_j] += h[t, j*R:(j+1)*R] @ bs[j][slot]`` for every module j, in place."""
    from adapterhub_server.lora import triton_kernels

    triton_kernels.expand(y, h, bs, token_indices, slots, starts, counts, max_count)


@lora_expand.register_fake
def _lora_expand_fake(
    y: torch.Tensor,
    h: torch.Tensor,
    bs: list[torch.Tensor],
    token_indices: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    max_count: int,
) -> None:
    return None


def add_lora_kernels(
    y: torch.Tensor,
    x: torch.Tensor,
    pools: Mapping[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
    mappings: Sequence[KernelMapping],
) -> None:
    """`add_lora` through the custom ops: per rank class, one shrink for the whole packed
    group and one expand for all its modules.

    Args:
        y: ``[T, sum(out_j)]`` (modified in place); x: ``[T, in]``.
        pools: rank class ``c`` -> ``(A [slots, m * c, in], (B_j [slots, c, out_j], ...))``.
        mappings: this step's `build_kernel_mappings`.
    """
    for m in mappings:
        a, bs = pools[m.rank_class]
        index = (m.token_indices, m.slots, m.starts, m.counts, m.max_count)
        h = torch.ops.adapterhub.lora_shrink(x, a, *index)
        torch.ops.adapterhub.lora_expand(y, h, list(bs), *index)
