"""Adapter-popularity mixes shared by the LoRA op tests (DESIGN: every kernel is compared
with the reference under all same, all distinct, skewed and with-base mixes)."""

from __future__ import annotations

import random

from adapterhub_server.lora.ops import Route

CLASSES = {8: 5, 16: 3, 32: 2}
"""Rank class -> slots."""

MIXES = ["all_same", "all_distinct", "skewed", "with_base", "mixed_ranks", "all_base"]


def mixed_routes(mix: str, n: int, rng: random.Random) -> list[Route | None]:
    """`n` dense-token routes over `CLASSES` drawn as `mix` says."""
    all_routes = [(c, s) for c, k in CLASSES.items() for s in range(k)]
    if mix == "all_same":
        return [(16, 1)] * n
    if mix == "all_distinct":
        return [all_routes[i % len(all_routes)] for i in range(n)]
    if mix == "skewed":  # zipf-like: a few adapters take most tokens, the rest one or two
        weights = [1 / (i + 1) ** 1.5 for i in range(len(all_routes))]
        return rng.choices(all_routes, weights=weights, k=n)
    if mix == "with_base":
        return [rng.choice([*all_routes[:3], None, None]) for _ in range(n)]
    if mix == "mixed_ranks":
        return [rng.choice([(8, 0), (16, 2), (32, 1), (8, 4)]) for _ in range(n)]
    if mix == "all_base":
        return [None] * n
    raise ValueError(mix)
