"""Batched multi-LoRA ops: the one import point for every LoRA kernel.

Device-resident adapter weights are kept per *rank class* (the next power of two >= the
adapter's rank, so padding wastes at most 2x): for each adapted module and class ``c``,

* ``A[c]``: ``[slots_c, c, in]``, the adapter's A zero-padded to ``c`` rows;
* ``B[c]``: ``[slots_c, c, out]``, its B transposed, with the LoRA scale folded in (as vLLM
  does), so the op needs no per-slot scale vector.

Semantics, for every token t routed to ``(c, slot)``::

    y[t] += (A[c][slot] @ x[t]) @ B[c][slot]

Two routing forms, whose best strategies differ (measured by ``bench/lora_ops.py``):

* *grouped* (decode: one token per sequence, mixed adapters): tokens are gathered into a
  ``[slots, L, in]`` block, one ``bmm`` shrinks, one expands, one ``index_add_`` scatters back.
  Five ops per module per rank class whatever the number of adapters (BGMV-like); the
  adapters' weights are read once, never copied per token.
* *segments* (prefill: runs of tokens sharing one adapter): one shrink and one expand per
  segment on views of the slot (SGMV-like).

Tokens with no adapter appear in no group and no segment, so they pay nothing; a step in
which no token uses an adapter does no LoRA work at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

Route = tuple[int, int]
"""(rank_class, slot) of one token's adapter."""


def rank_class(rank: int) -> int:
    """The pool class an adapter of this rank lives in: next power of two, at least 8."""
    c = 8
    while c < rank:
        c *= 2
    return c


@dataclass
class TokenGroup:
    """Dense tokens of one rank class, laid out ``[slot_hi - slot_lo, L]`` by slot."""

    rank_class: int
    slot_lo: int
    slot_hi: int
    token_index: torch.Tensor
    """``[S, L]`` int64 token positions; padding points at token 0 and is zeroed by `valid`."""
    flat_index: torch.Tensor
    """``[S * L]`` the same, flattened, for the scatter."""
    valid: torch.Tensor | None
    """``[S, L, 1]`` 1.0 for real tokens, 0.0 for padding; None when there is no padding."""
    contiguous: tuple[int, int] | None
    """``(t0, t1)`` when the group is one slot over a contiguous token range (no gather)."""


@dataclass
class Segment:
    """A run of tokens ``[t0, t1)`` that all use one adapter (a prefill chunk)."""

    t0: int
    t1: int
    rank_class: int
    slot: int


@dataclass
class LoRABatch:
    """Per-step LoRA routing, built once per engine step and shared by every layer."""

    groups: list[TokenGroup] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.groups or self.segments)


def build_lora_batch(
    dense_routes: Sequence[Route | None],
    segments: Sequence[Segment] = (),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoRABatch:
    """Build one step's routing.

    Args:
        dense_routes: per dense token, in token order (tokens ``0..len-1``), its
            ``(rank_class, slot)`` or None for the base model.
        segments: prefill runs that use an adapter; their token ranges follow the dense ones.
    """
    batch = LoRABatch(segments=list(segments))
    by_class: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for t, route in enumerate(dense_routes):
        if route is not None:
            by_class[route[0]][route[1]].append(t)
    for cls, slots in sorted(by_class.items()):
        lo, hi = min(slots), max(slots) + 1
        if len(slots) == 1:
            (tokens,) = slots.values()
            if tokens == list(range(tokens[0], tokens[-1] + 1)):
                empty = torch.empty(0, dtype=torch.long, device=device)
                batch.groups.append(
                    TokenGroup(cls, lo, hi, empty, empty, None, (tokens[0], tokens[-1] + 1))
                )
                continue
        width = max(len(ts) for ts in slots.values())
        index = torch.zeros(hi - lo, width, dtype=torch.long)
        valid = torch.zeros(hi - lo, width, 1, dtype=dtype)
        for slot, ts in slots.items():
            index[slot - lo, : len(ts)] = torch.tensor(ts)
            valid[slot - lo, : len(ts)] = 1.0
        padded = bool((valid == 0).any())
        batch.groups.append(
            TokenGroup(
                rank_class=cls,
                slot_lo=lo,
                slot_hi=hi,
                token_index=index.to(device),
                flat_index=index.flatten().to(device),
                valid=valid.to(device) if padded else None,
                contiguous=None,
            )
        )
    return batch


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    pools: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    batch: LoRABatch,
) -> None:
    """Add every routed token's LoRA delta to ``y`` in place.

    Args:
        y: ``[T, out]`` output of the frozen base layer (modified in place).
        x: ``[T, in]`` input of the layer.
        pools: rank class ``c`` -> ``(A [slots, c, in], B [slots, c, out])``.
        batch: this step's routing.

    Semantics: for each token t routed to (c, s): ``y[t] += (A[c][s] @ x[t]) @ B[c][s]``.
    """
    for g in batch.groups:
        a, b = pools[g.rank_class]
        a = a[g.slot_lo : g.slot_hi]
        b = b[g.slot_lo : g.slot_hi]
        if g.contiguous is not None:
            t0, t1 = g.contiguous
            y[t0:t1].addmm_(x[t0:t1] @ a[0].T, b[0])
            continue
        xg = x[g.token_index]  # [S, L, in]
        h = torch.bmm(xg, a.transpose(1, 2))  # [S, L, c]
        if g.valid is not None:
            h.mul_(g.valid)
        out = torch.bmm(h, b)  # [S, L, out]
        y.index_add_(0, g.flat_index, out.view(-1, out.shape[-1]))
    for s in batch.segments:
        a, b = pools[s.rank_class]
        y[s.t0 : s.t1].addmm_(x[s.t0 : s.t1] @ a[s.slot].T, b[s.slot])


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    pools: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    routes: Sequence[Route | None],
) -> None:
    """Loop reference for ``add_lora``: one token at a time, no batching.

    Args:
        y: ``[T, out]``, modified in place.
        x: ``[T, in]``.
        pools: as for ``add_lora``.
        routes: per token, ``(rank_class, slot)`` or None.
    """
    for t, route in enumerate(routes):
        if route is None:
            continue
        a, b = pools[route[0]]
        y[t] += (a[route[1]] @ x[t]) @ b[route[1]]
