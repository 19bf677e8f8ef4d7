"""Which tokens of a step use which adapter: the one place that groups them.

Every LoRA path reads the same grouping of a step's tokens by *rank class* (the pool an
adapter lives in: its rank rounded up to a power of two, at least 8) and *slot* (its place
in that pool): the torch ops gather by it, the CPU kernel walks it, the Triton kernels and
the CUDA-graph decode buffers cut it into chunks of `CHUNK_TOKENS`. Building it here once
keeps the three from drifting apart (a token routed differently by one path would be
served another adapter's delta).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

Route = tuple[int, int]
"""(rank_class, slot) of one token's adapter."""

CHUNK_TOKENS = 16
"""Tokens per work item of the Triton kernels: their block of rows (``tl.dot`` needs at
least 16)."""


def rank_class(rank: int) -> int:
    """The pool class an adapter of this rank lives in: next power of two, at least 8."""
    c = 8
    while c < rank:
        c *= 2
    return c


def group_routes(routes: Sequence[Route | None]) -> dict[int, dict[int, list[int]]]:
    """rank class -> slot -> the positions of its tokens, in token order; classes and slots
    ascending.

    Args:
        routes: per token, ``(rank_class, slot)`` or None (the base model: in no group).
    """
    by_class: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for t, route in enumerate(routes):
        if route is not None:
            by_class[route[0]][route[1]].append(t)
    return {cls: dict(sorted(slots.items())) for cls, slots in sorted(by_class.items())}


@dataclass
class ChunkPlan:
    """One rank class's tokens as chunks that share a slot (host lists)."""

    tokens: list[int]
    """Token positions, grouped by slot."""
    slots: list[int]
    """Per chunk, its slot."""
    starts: list[int]
    """Per chunk, its first entry in `tokens`."""
    counts: list[int]
    """Per chunk, its number of tokens (at most `CHUNK_TOKENS`)."""


def plan_chunks(routes: Sequence[Route | None]) -> dict[int, ChunkPlan]:
    """Group the tokens of a step by (rank class, slot) and cut each group into chunks.

    Args:
        routes: per token of the flat batch, ``(rank_class, slot)`` or None (base model).
    Returns:
        rank class -> its chunks, classes in ascending order. A class with g slots in use
        and n tokens has at most ``min(n, g + n // CHUNK_TOKENS)`` chunks.
    """
    plans = {}
    for cls, groups in group_routes(routes).items():
        plan = ChunkPlan([], [], [], [])
        for slot, members in groups.items():
            for i in range(0, len(members), CHUNK_TOKENS):
                plan.slots.append(slot)
                plan.starts.append(len(plan.tokens) + i)
                plan.counts.append(min(CHUNK_TOKENS, len(members) - i))
            plan.tokens.extend(members)
        plans[cls] = plan
    return plans
