"""The batched LoRA op against its loop reference, under several adapter-popularity mixes."""

from __future__ import annotations

import random

import pytest
import torch

from adapterhub_server.lora.ops import (
    Segment,
    add_lora,
    add_lora_reference,
    build_lora_batch,
    rank_class,
)
from tests.lora.popularity import CLASSES, MIXES, mixed_routes

D_IN = 48
# A single module, and a packed q/k/v-like group with unequal output widths.
PACKINGS = {"single": (40,), "packed": (40, 16, 16)}


def _pools(seed: int = 0, outs: tuple[int, ...] = (40,)):
    gen = torch.Generator().manual_seed(seed)
    pools = {}
    for cls, slots in CLASSES.items():
        a = torch.randn(slots, len(outs) * cls, D_IN, generator=gen, dtype=torch.float64)
        bs = tuple(torch.randn(slots, cls, out, generator=gen, dtype=torch.float64) for out in outs)
        pools[cls] = (a, bs)
    return pools


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_dense_tokens_match_reference(mix: str, num_tokens: int, packing: str) -> None:
    rng = random.Random(num_tokens)
    outs = PACKINGS[packing]
    d_out = sum(outs)
    pools = _pools(0, outs)
    routes = mixed_routes(mix, num_tokens, rng)
    x = torch.randn(num_tokens, D_IN, dtype=torch.float64)
    base = torch.randn(num_tokens, d_out, dtype=torch.float64)
    expected = base.clone()
    add_lora_reference(expected, x, pools, routes)
    got = base.clone()
    batch = build_lora_batch(routes, dtype=torch.float64)
    add_lora(got, x, pools, batch)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert batch.active == any(r is not None for r in routes)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("mix", MIXES)
def test_decode_plus_prefill_segments_match_reference(mix: str, packing: str) -> None:
    rng = random.Random(7)
    outs = PACKINGS[packing]
    d_out = sum(outs)
    pools = _pools(1, outs)
    dense = mixed_routes(mix, 9, rng)
    # Three prefill chunks after the decode tokens: adapter, base, another adapter.
    chunk_routes = [(32, 1), None, (8, 3)]
    lengths = [5, 4, 6]
    routes = list(dense)
    segments = []
    t = len(dense)
    for route, n in zip(chunk_routes, lengths):
        routes.extend([route] * n)
        if route is not None:
            segments.append(Segment(t, t + n, route[0], route[1]))
        t += n
    x = torch.randn(t, D_IN, dtype=torch.float64)
    expected = torch.zeros(t, d_out, dtype=torch.float64)
    add_lora_reference(expected, x, pools, routes)
    got = torch.zeros(t, d_out, dtype=torch.float64)
    add_lora(got, x, pools, build_lora_batch(dense, segments, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_base_rows_are_untouched() -> None:
    d_out = 40
    pools = _pools()
    routes = [None, (8, 0), None, (16, 2), None]
    x = torch.randn(5, D_IN, dtype=torch.float64)
    y = torch.randn(5, d_out, dtype=torch.float64)
    before = y.clone()
    add_lora(y, x, pools, build_lora_batch(routes, dtype=torch.float64))
    for t in (0, 2, 4):
        assert torch.equal(y[t], before[t])
    assert not torch.equal(y[1], before[1])


def test_float32_close_to_float64_reference() -> None:
    d_out = 72
    pools64 = _pools(3, PACKINGS["packed"])
    pools32 = {c: (a.float(), tuple(b.float() for b in bs)) for c, (a, bs) in pools64.items()}
    routes = mixed_routes("skewed", 20, random.Random(3))
    x = torch.randn(20, D_IN, dtype=torch.float64)
    expected = torch.zeros(20, d_out, dtype=torch.float64)
    add_lora_reference(expected, x, pools64, routes)
    got = torch.zeros(20, d_out)
    add_lora(got, x.float(), pools32, build_lora_batch(routes))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("rank", "cls"), [(1, 8), (8, 8), (9, 16), (16, 16), (33, 64), (64, 64)])
def test_rank_class(rank: int, cls: int) -> None:
    assert rank_class(rank) == cls
