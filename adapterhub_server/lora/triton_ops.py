"""The Triton LoRA kernels (`triton_kernels.py`) as torch custom ops, and the device tables
of a step's chunks (`routing.plan_chunks`) that they read.

`lora_shrink` and `lora_expand` are registered as ``torch.ops.adapterhub.*`` with fake
(meta) implementations, so `torch.compile` traces through them without running them. They
are used on CUDA when Triton is installed (`EngineConfig.lora_kernel`); elsewhere the torch
ops in `lora/ops.py` serve, and `add_lora_reference` there is the loop both are tested
against.

Semantics, for every chunk c and every token t in it (slot s = ``chunk_slots[c]``):

    shrink:  h[t] = A[s] @ x[t]                                      (float32)
    expand:  y[t, o_j : o_j + N_j] += h[t, j*R : (j+1)*R] @ B_j[s]   (each module j, in place)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adapterhub_server.lora.routing import Route, plan_chunks
from adapterhub_server.models.transfer import to_device


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
    """One step's tokens of one rank class as work items ("chunks") of at most
    `CHUNK_TOKENS` tokens that share an adapter slot (device tensors).

    A kernel launches one program per chunk (and output tile), so the launch grid is the
    chunk tensors' length, known on the host without reading the device. Chunks with count
    0 are padding: a CUDA graph captures a fixed number of them and serves any mix.
    """

    rank_class: int
    token_indices: torch.Tensor
    """``[n]`` int32 token ids, grouped by slot."""
    chunk_slots: torch.Tensor
    """``[C]`` int32 slot of each chunk."""
    chunk_starts: torch.Tensor
    """``[C]`` int32 first index of each chunk in `token_indices`."""
    chunk_counts: torch.Tensor
    """``[C]`` int32 tokens in each chunk, 0 to `CHUNK_TOKENS`."""

    @property
    def index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The arguments the custom ops take after their data tensors."""
        return self.token_indices, self.chunk_slots, self.chunk_starts, self.chunk_counts


def build_kernel_mappings(
    routes: Sequence[Route | None], device: torch.device | str
) -> list[KernelMapping]:
    """One mapping per rank class in use, its tensors copied to `device` in one transfer.

    Args:
        routes: per token of the flat batch, ``(rank_class, slot)`` or None (base model).
    """
    mappings = []
    for cls, p in plan_chunks(routes).items():
        # One host tensor, one copy: [tokens | slots | starts | counts].
        packed = to_device(p.tokens + p.slots + p.starts + p.counts, torch.int32, device)
        n, c = len(p.tokens), len(p.slots)
        mappings.append(
            KernelMapping(
                rank_class=cls,
                token_indices=packed[:n],
                chunk_slots=packed[n : n + c],
                chunk_starts=packed[n + c : n + 2 * c],
                chunk_counts=packed[n + 2 * c :],
            )
        )
    return mappings


@torch.library.custom_op("adapterhub::lora_shrink", mutates_args=())
def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    token_indices: torch.Tensor,
    chunk_slots: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_counts: torch.Tensor,
) -> torch.Tensor:
    """``[T, K] x [slots, N, K] -> [T, N]`` float32 (see the module docstring)."""
    from adapterhub_server.lora import triton_kernels

    return triton_kernels.shrink(x, a, token_indices, chunk_slots, chunk_starts, chunk_counts)


@lora_shrink.register_fake
def _lora_shrink_fake(
    x: torch.Tensor,
    a: torch.Tensor,
    token_indices: torch.Tensor,
    chunk_slots: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_counts: torch.Tensor,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], a.shape[1]), dtype=torch.float32)


@torch.library.custom_op("adapterhub::lora_expand", mutates_args=("y",))
def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    bs: list[torch.Tensor],
    token_indices: torch.Tensor,
    chunk_slots: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_counts: torch.Tensor,
) -> None:
    """``y[t, o_j:+N_j] += h[t, j*R:(j+1)*R] @ bs[j][slot]`` for every module j, in place."""
    from adapterhub_server.lora import triton_kernels

    triton_kernels.expand(y, h, bs, token_indices, chunk_slots, chunk_starts, chunk_counts)


@lora_expand.register_fake
def _lora_expand_fake(
    y: torch.Tensor,
    h: torch.Tensor,
    bs: list[torch.Tensor],
    token_indices: torch.Tensor,
    chunk_slots: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_counts: torch.Tensor,
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
        h = torch.ops.adapterhub.lora_shrink(x, a, *m.index)
        torch.ops.adapterhub.lora_expand(y, h, list(bs), *m.index)
