"""The Triton shrink/expand kernels against the loop reference, under several adapter
popularity mixes and rank classes.

Without a GPU they run in Triton's interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1): float32 and float16 there. The interpreter's bfloat16 `tl.dot` is
broken, so bfloat16 (and the real compiled kernels) are checked by the `gpu` tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from adapterhub_server.lora.ops import (
    TRITON_KERNELS,
    PackedPool,
    Route,
    Segment,
    add_lora,
    add_lora_reference,
    build_lora_batch,
)
from adapterhub_server.lora.triton_ops import (
    KernelMapping,
    add_lora_kernels,
    build_kernel_mappings,
    triton_available,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

IN = 80  # not a multiple of the K block: the masks matter
OUTS = (48, 24, 24)  # a packed q/k/v-like group, out sizes not multiples of the N block
SLOTS = 6
CLASSES = (8, 16, 32)
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


def _pools(dtype: torch.dtype, device: str, outs: tuple[int, ...] = OUTS) -> dict[int, PackedPool]:
    gen = torch.Generator().manual_seed(0)
    pools = {}
    for c in CLASSES:
        a = torch.randn(SLOTS, len(outs) * c, IN, generator=gen) / IN**0.5
        bs = tuple(torch.randn(SLOTS, c, o, generator=gen) / c**0.5 for o in outs)
        pools[c] = (a.to(device, dtype), tuple(b.to(device, dtype) for b in bs))
    return pools


def _identical(t: int, rng: random.Random) -> list[Route | None]:
    return [(16, 3)] * t


def _distinct(t: int, rng: random.Random) -> list[Route | None]:
    routes = [(c, s) for c in CLASSES for s in range(SLOTS)]
    return [routes[i % len(routes)] for i in range(t)]


def _uniform(t: int, rng: random.Random) -> list[Route | None]:
    return [(rng.choice(CLASSES), rng.randrange(SLOTS)) for _ in range(t)]


def _zipf(t: int, rng: random.Random) -> list[Route | None]:
    routes = [(c, s) for c in CLASSES for s in range(SLOTS)]
    weights = [1 / (i + 1) ** 1.2 for i in range(len(routes))]
    return rng.choices(routes, weights=weights, k=t)


def _with_base_rows(t: int, rng: random.Random) -> list[Route | None]:
    return [
        None if rng.random() < 0.4 else (rng.choice(CLASSES), rng.randrange(SLOTS))
        for _ in range(t)
    ]


MIXES: dict[str, Callable[[int, random.Random], list[Route | None]]] = {
    "identical": _identical,
    "distinct": _distinct,
    "uniform": _uniform,
    "zipf": _zipf,
    "with-base-rows": _with_base_rows,
}


def _check(dtype: torch.dtype, device: str, routes: list[Route | None], seed: int) -> None:
    pools = _pools(dtype, device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(routes), IN, generator=gen).to(device, dtype)
    y0 = torch.randn(len(routes), sum(OUTS), generator=gen).to(device, dtype)
    expected = y0.float().clone()
    float_pools = {c: (a.float(), tuple(b.float() for b in bs)) for c, (a, bs) in pools.items()}
    add_lora_reference(expected, x.float(), float_pools, routes)
    got = y0.clone()
    add_lora_kernels(got, x, pools, build_kernel_mappings(routes, device))
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=atol)
    base_rows = [t for t, r in enumerate(routes) if r is None]
    assert torch.equal(got[base_rows], y0[base_rows])  # -1 rows are never touched


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernels_match_the_loop_reference(mix: str, dtype: torch.dtype) -> None:
    # 37 tokens: more than one M block for the popular adapters, ragged elsewhere.
    _check(dtype, "cpu", MIXES[mix](37, random.Random(1)), seed=2)


def test_one_module_group_and_a_single_token() -> None:
    pools = _pools(torch.float32, "cpu", outs=(40,))
    x, y = torch.randn(1, IN), torch.zeros(1, 40)
    expected = y.clone()
    add_lora_reference(expected, x, pools, [(32, 5)])
    add_lora_kernels(y, x, pools, build_kernel_mappings([(32, 5)], "cpu"))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_mapping_groups_tokens_by_slot_per_rank_class() -> None:
    routes: list[Route | None] = [(8, 2), None, (16, 0), (8, 2), (8, 1), None, (16, 0)]
    mappings = build_kernel_mappings(routes, "cpu")
    assert [m.rank_class for m in mappings] == [8, 16]
    m8, m16 = mappings
    assert m8.chunk_slots.tolist() == [1, 2] and m8.chunk_counts.tolist() == [1, 2]
    assert m8.chunk_starts.tolist() == [0, 1] and m8.token_indices.tolist() == [4, 0, 3]
    assert m16.chunk_slots.tolist() == [0] and m16.token_indices.tolist() == [2, 6]
    assert build_kernel_mappings([None, None], "cpu") == []


def test_large_groups_are_cut_into_chunks_of_at_most_16_tokens() -> None:
    routes: list[Route | None] = [(8, 0)] * 35 + [(8, 1)] * 16 + [(8, 2)]
    (m,) = build_kernel_mappings(routes, "cpu")
    assert m.chunk_slots.tolist() == [0, 0, 0, 1, 2]
    assert m.chunk_counts.tolist() == [16, 16, 3, 16, 1]
    assert m.chunk_starts.tolist() == [0, 16, 32, 35, 51]
    assert m.token_indices.tolist() == list(range(52))


def test_padding_chunks_change_nothing() -> None:
    """Chunks of count 0 (what a captured CUDA graph launches beyond the live ones) are
    no-ops, so one launch shape serves any mix."""
    pools = _pools(torch.float32, "cpu")
    routes: list[Route | None] = [(16, 2), None, (16, 5), (16, 2)]
    (m,) = build_kernel_mappings(routes, "cpu")
    pad = torch.zeros(5, dtype=torch.int32)
    padded = KernelMapping(
        16,
        torch.cat([m.token_indices, pad]),
        torch.cat([m.chunk_slots, pad + 3]),  # a real slot: only the count makes it empty
        torch.cat([m.chunk_starts, pad]),
        torch.cat([m.chunk_counts, pad]),
    )
    x, y0 = torch.randn(4, IN), torch.randn(4, sum(OUTS))
    expected, got = y0.clone(), y0.clone()
    add_lora_kernels(expected, x, pools, [m])
    add_lora_kernels(got, x, pools, [padded])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_lora_batch_with_kernels_equals_the_torch_path() -> None:
    """Decode tokens and prefill segments together, as the engine builds a step."""
    pools = _pools(torch.float32, "cpu")
    dense: list[Route | None] = [(8, 1), None, (16, 4), (8, 1), (32, 0)]
    segments = [Segment(5, 17, 16, 2), Segment(25, 31, 8, 1)]  # tokens 17..24: base prefill
    x, y0 = torch.randn(31, IN), torch.randn(31, sum(OUTS))
    torch_path, kernel_path = y0.clone(), y0.clone()
    add_lora(torch_path, x, pools, build_lora_batch(dense, segments))
    batch = build_lora_batch(dense, segments, backend=TRITON_KERNELS)
    assert batch.active and not batch.groups and not batch.segments
    add_lora(kernel_path, x, pools, batch)
    torch.testing.assert_close(kernel_path, torch_path, rtol=1e-4, atol=1e-4)
    assert torch.equal(kernel_path[17:25], y0[17:25])


def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake (meta) implementation and dispatch agree: what torch.compile needs."""
    pools = _pools(torch.float32, "cpu")
    routes: list[Route | None] = [(16, 1), None, (16, 1), (16, 3)]
    (m,) = build_kernel_mappings(routes, "cpu")
    a, bs = pools[16]
    x = torch.randn(4, IN)
    index = m.index
    torch.library.opcheck(torch.ops.adapterhub.lora_shrink.default, (x, a, *index))
    h = torch.ops.adapterhub.lora_shrink(x, a, *index)
    y = torch.zeros(4, sum(OUTS))
    torch.library.opcheck(torch.ops.adapterhub.lora_expand.default, (y, h, list(bs), *index))


def test_kernels_compose_with_torch_compile() -> None:
    pools = _pools(torch.float32, "cpu")
    routes: list[Route | None] = [(8, 0), (32, 2), None, (8, 0)]
    mappings = build_kernel_mappings(routes, "cpu")
    x = torch.randn(4, IN)

    def layer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y * 2
        add_lora_kernels(y, x, pools, mappings)
        return y + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # no graph breaks
    y0 = torch.randn(4, sum(OUTS))
    torch.testing.assert_close(compiled(x, y0.clone()), layer(x, y0.clone()))


@pytest.mark.gpu
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_on_cuda(mix: str, dtype: torch.dtype) -> None:
    _check(dtype, "cuda", MIXES[mix](300, random.Random(3)), seed=4)


def test_kernel_selection() -> None:
    from adapterhub_server.config import EngineConfig

    assert str(EngineConfig(device="cpu").lora_backend()) != "triton"  # auto: Triton on CUDA only
    assert str(EngineConfig(device="cpu", lora_kernel="torch").lora_backend()) == "torch"
    assert str(EngineConfig(device="cpu", lora_kernel="triton").lora_backend()) == "triton"
    with pytest.raises(ValueError, match="lora_kernel"):
        EngineConfig(lora_kernel="cutlass")
