"""The fused CPU LoRA kernel against the loop reference: adapter-popularity mixes, several
rank classes, base rows, uneven tokens per slot, shapes off the vector width, thread counts
that do and do not divide the slots, and prefill segments beside it."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from adapterhub_server.config import EngineConfig
from adapterhub_server.lora import cpu_kernel
from adapterhub_server.lora.ops import (
    CPU_KERNEL,
    GEMM_MIN_TOKENS,
    TORCH_OPS,
    LoRABatch,
    PackedPool,
    Route,
    Segment,
    add_lora,
    add_lora_reference,
    build_lora_batch,
    lora_backend,
)
from tests.lora.popularity import CLASSES, MIXES, mixed_routes

pytestmark = pytest.mark.skipif(
    cpu_kernel.load() is None, reason="the CPU LoRA kernel cannot be built here"
)

D_IN = 83  # not a multiple of the kernel's 32-float steps: the tails matter
PACKINGS = {"single": (40,), "packed": (40, 17, 16), "wide": (300, 300)}


def _pools(outs: tuple[int, ...], seed: int = 0) -> tuple[dict[int, PackedPool], dict]:
    """float32 pools for the kernel and the same values in float64 for the reference."""
    gen = torch.Generator().manual_seed(seed)
    pools64 = {}
    for cls, slots in CLASSES.items():
        a = torch.randn(slots, len(outs) * cls, D_IN, generator=gen, dtype=torch.float64)
        bs = tuple(torch.randn(slots, cls, o, generator=gen, dtype=torch.float64) for o in outs)
        pools64[cls] = (a, bs)
    pools32 = {c: (a.float(), tuple(b.float() for b in bs)) for c, (a, bs) in pools64.items()}
    return pools32, pools64


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """1 and 2 split whole slots between threads; 3 leaves a remainder of slots, which
    takes the kernel's row/column split instead."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _check(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)


def _assert_matches_reference(
    batch: LoRABatch,
    routes: list[Route | None],
    outs: tuple[int, ...],
    pools32: dict[int, PackedPool],
    pools64: dict,
) -> None:
    """`add_lora` with `batch` on random inputs equals the loop reference over `routes`."""
    n = len(routes)
    x = torch.randn(n, D_IN, dtype=torch.float64)
    expected = torch.zeros(n, sum(outs), dtype=torch.float64)
    add_lora_reference(expected, x, pools64, routes)
    got = torch.zeros(n, sum(outs))
    add_lora(got, x.float(), pools32, batch)
    _check(got, expected)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 70])
def test_dense_tokens_match_reference(
    mix: str, num_tokens: int, packing: str, threads: int
) -> None:
    rng = random.Random(num_tokens)
    outs = PACKINGS[packing]
    pools32, pools64 = _pools(outs)
    routes = mixed_routes(mix, num_tokens, rng)
    x = torch.randn(num_tokens, D_IN, dtype=torch.float64)
    base = torch.randn(num_tokens, sum(outs), dtype=torch.float64)
    expected = base.clone()
    add_lora_reference(expected, x, pools64, routes)
    batch = build_lora_batch(routes, backend=CPU_KERNEL)
    busiest = max((routes.count(r) for r in set(routes) if r is not None), default=0)
    assert bool(batch.groups) == (busiest >= GEMM_MIN_TOKENS)
    assert batch.active == any(r is not None for r in routes)
    got = base.float()
    add_lora(got, x.float(), pools32, batch)
    _check(got, expected)


@pytest.mark.parametrize("mix", MIXES)
def test_decode_plus_prefill_segments_match_reference(mix: str, threads: int) -> None:
    """Dense decode tokens and short prefill chunks (and a base-model chunk between them)
    through the kernel, in one call per rank class."""
    rng = random.Random(7)
    outs = PACKINGS["packed"]
    pools32, pools64 = _pools(outs, seed=1)
    dense = mixed_routes(mix, 9, rng)
    routes = list(dense)
    segments = []
    t = len(dense)
    for route, n in zip([(32, 1), None, (8, 3)], [5, 4, 6]):
        routes.extend([route] * n)
        if route is not None:
            segments.append(Segment(t, t + n, route[0], route[1]))
        t += n
    x = torch.randn(t, D_IN, dtype=torch.float64)
    expected = torch.zeros(t, sum(outs), dtype=torch.float64)
    add_lora_reference(expected, x, pools64, routes)
    got = torch.zeros(t, sum(outs))
    batch = build_lora_batch(dense, segments, backend=CPU_KERNEL)
    assert not batch.segments and not batch.groups
    add_lora(got, x.float(), pools32, batch)
    _check(got, expected)


def test_prefill_chunks_route_by_length_and_by_their_adapters_total(threads: int) -> None:
    """A chunk of `GEMM_MIN_TOKENS` tokens stays a segment (GEMMs on a view of its slot);
    shorter chunks join the dense tokens, and an adapter whose dense and short-chunk tokens
    together reach `GEMM_MIN_TOKENS` takes a GEMM pair; the rest go to the kernel, unequal
    token counts per slot included. Base-model chunks in between get nothing."""
    outs = PACKINGS["packed"]
    pools32, pools64 = _pools(outs, seed=6)
    half = GEMM_MIN_TOKENS // 2
    dense: list[Route | None] = [(16, 2), (8, 1), None, (16, 0), (16, 2)]
    chunks: list[tuple[Route | None, int]] = [
        ((16, 2), half),  # with the next one and 2 dense tokens: 66 tokens on (16, 2)
        (None, 5),
        ((16, 2), half),
        ((8, 3), GEMM_MIN_TOKENS),  # long: a segment
        ((8, 1), 9),  # short, beside a single dense token of the same adapter
    ]
    routes = list(dense)
    segments = []
    for route, n in chunks:
        if route is not None:
            segments.append(Segment(len(routes), len(routes) + n, *route))
        routes += [route] * n
    batch = build_lora_batch(dense, segments, backend=CPU_KERNEL)
    assert [(s.rank_class, s.slot, s.t1 - s.t0) for s in batch.segments] == [
        (8, 3, GEMM_MIN_TOKENS)
    ]
    assert [(g.rank_class, g.slot_lo, g.slot_hi) for g in batch.groups] == [(16, 2, 3)]
    in_kernel = {(mp.rank_class, int(s)) for mp in batch.cpu_mappings for s in mp.slots}
    assert in_kernel == {(16, 0), (8, 1)}
    _assert_matches_reference(batch, routes, outs, pools32, pools64)


def test_busy_adapters_take_the_gemms_beside_the_kernel(threads: int) -> None:
    """An adapter with many dense tokens runs as torch GEMMs and the rest through the
    kernel, in one step; its tokens scattered among the others, as decode tokens are."""
    outs = PACKINGS["packed"]
    pools32, pools64 = _pools(outs, seed=4)
    rng = random.Random(4)
    busy: list[Route | None] = [(16, 2)] * GEMM_MIN_TOKENS + [(8, 1)] * (GEMM_MIN_TOKENS + 3)
    routes = busy + mixed_routes("with_base", 20, rng) + mixed_routes("all_distinct", 10, rng)
    rng.shuffle(routes)
    batch = build_lora_batch(routes, backend=CPU_KERNEL)
    assert {(g.rank_class, g.slot_lo) for g in batch.groups} == {(16, 2), (8, 1)}
    assert batch.cpu_mappings
    _assert_matches_reference(batch, routes, outs, pools32, pools64)


def _bfloat16(pools64: dict) -> tuple[dict[int, PackedPool], dict]:
    """The pools rounded to bfloat16 (as ``lora_dtype=bfloat16`` keeps them), and the same
    rounded values in float64 for the reference."""
    pools16 = {c: (a.bfloat16(), tuple(b.bfloat16() for b in bs)) for c, (a, bs) in pools64.items()}
    rounded = {c: (a.double(), tuple(b.double() for b in bs)) for c, (a, bs) in pools16.items()}
    return pools16, rounded


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("num_tokens", [7, 70])
def test_bfloat16_weights_match_reference(mix: str, num_tokens: int, threads: int) -> None:
    """Weights kept in bfloat16: the kernel widens them to float32 as it loads them, and
    busy adapters' GEMMs and prefill segments widen their slices, so every path matches
    the reference on the same rounded weights as closely as float32 weights do."""
    rng = random.Random(num_tokens + 100)
    outs = PACKINGS["packed"]
    _, pools64 = _pools(outs, seed=5)
    pools16, rounded = _bfloat16(pools64)
    dense = mixed_routes(mix, num_tokens, rng)
    routes = list(dense)
    segments = [Segment(num_tokens, num_tokens + 6, 16, 1)]
    routes += [(16, 1)] * 6
    x = torch.randn(len(routes), D_IN, dtype=torch.float64)
    base = torch.randn(len(routes), sum(outs), dtype=torch.float64)
    expected = base.clone()
    add_lora_reference(expected, x, rounded, routes)
    got = base.float()
    add_lora(got, x.float(), pools16, build_lora_batch(dense, segments, backend=CPU_KERNEL))
    _check(got, expected)
    # The rounding is real: float32 weights give another result.
    exact = base.clone()
    add_lora_reference(exact, x, pools64, routes)
    assert not torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["w32", "w16"])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("num_tokens", [7, 40])
def test_bfloat16_activations_are_rounded_once(
    mix: str, num_tokens: int, weights: torch.dtype, threads: int
) -> None:
    """Serving in bfloat16: x and y bfloat16, the weights either dtype. The kernel sums each
    output in float32 and rounds it once, so nearly every element equals the exact sum
    rounded to bfloat16 (float32 sums may differ from the exact one at a rounding
    boundary); the torch ops round the shrink, the expand and the add, and so miss it far
    more often. Short prefill chunks beside the dense tokens take the same path."""
    rng = random.Random(num_tokens + 200)
    outs = PACKINGS["packed"]
    _, pools64 = _pools(outs, seed=7)
    pools = {c: (a.to(weights), tuple(b.to(weights) for b in bs)) for c, (a, bs) in pools64.items()}
    exact_weights = {c: (a.double(), tuple(b.double() for b in bs)) for c, (a, bs) in pools.items()}
    dense = mixed_routes(mix, num_tokens, rng)
    segments = [Segment(num_tokens, num_tokens + 6, 16, 1)]
    routes = [*dense, *[(16, 1)] * 6]
    x = torch.randn(len(routes), D_IN).bfloat16()
    base = torch.randn(len(routes), sum(outs)).bfloat16()
    exact = base.double()
    add_lora_reference(exact, x.double(), exact_weights, routes)
    rounded = exact.bfloat16()

    got = base.clone()
    add_lora(got, x, pools, build_lora_batch(dense, segments, backend=CPU_KERNEL))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2**-7, atol=1e-2)
    routed = torch.tensor([r is not None for r in routes])
    kernel_miss = (got != rounded)[routed].float().mean().item()
    assert kernel_miss < 0.01, kernel_miss
    via_torch = base.clone()
    add_lora(via_torch, x, pools, build_lora_batch(dense, segments, backend=TORCH_OPS))
    torch_miss = (via_torch != rounded)[routed].float().mean().item()
    assert kernel_miss < torch_miss, (kernel_miss, torch_miss)
    assert torch.equal(got[~routed], base[~routed])


def test_bfloat16_activations_keep_nan_and_inf() -> None:
    """Rounding to bfloat16 keeps a NaN a NaN (a plain round-to-nearest on its bits can
    carry into the sign) and an infinity infinite."""
    pools32, _ = _pools((40,))
    pools = {c: (a.bfloat16(), tuple(b.bfloat16() for b in bs)) for c, (a, bs) in pools32.items()}
    x = torch.randn(3, D_IN).bfloat16()
    y = torch.zeros(3, 40, dtype=torch.bfloat16)
    y[0, 5] = float("nan")
    y[1, 38] = float("inf")  # the scalar tail past the last 16 columns
    y[2, 7] = float("-inf")
    add_lora(y, x, pools, build_lora_batch([(8, 0), (8, 1), (16, 2)], backend=CPU_KERNEL))
    assert y[0, 5].isnan() and y[1, 38] == float("inf") and y[2, 7] == float("-inf")
    assert y.isfinite().sum() == 3 * 40 - 3


def test_matches_the_torch_ops() -> None:
    """Both float32 paths on the same inputs: the kernel only reorders float sums."""
    outs = PACKINGS["packed"]
    pools32, _ = _pools(outs, seed=2)
    routes = mixed_routes("skewed", 40, random.Random(2))
    x = torch.randn(40, D_IN)
    base = torch.randn(40, sum(outs))
    via_torch, via_kernel = base.clone(), base.clone()
    add_lora(via_torch, x, pools32, build_lora_batch(routes, backend=TORCH_OPS))
    add_lora(via_kernel, x, pools32, build_lora_batch(routes, backend=CPU_KERNEL))
    torch.testing.assert_close(via_kernel, via_torch, rtol=1e-4, atol=1e-4)


def test_base_rows_are_untouched() -> None:
    pools32, _ = _pools((40,))
    routes = [None, (8, 0), None, (16, 2), None]
    x = torch.randn(5, D_IN)
    y = torch.randn(5, 40)
    before = y.clone()
    add_lora(y, x, pools32, build_lora_batch(routes, backend=CPU_KERNEL))
    for t in (0, 2, 4):
        assert torch.equal(y[t], before[t])
    assert not torch.equal(y[1], before[1])


def test_strided_rows() -> None:
    """x and y may be views whose rows are longer than their width (slices of a wider
    tensor), as long as each row is contiguous."""
    outs = PACKINGS["packed"]
    pools32, pools64 = _pools(outs, seed=3)
    routes = mixed_routes("with_base", 12, random.Random(3))
    wide_x = torch.randn(12, D_IN + 5)
    x = wide_x[:, 2 : 2 + D_IN]
    wide_y = torch.zeros(12, sum(outs) + 9)
    y = wide_y[:, 4 : 4 + sum(outs)]
    expected = torch.zeros(12, sum(outs), dtype=torch.float64)
    add_lora_reference(expected, x.double(), pools64, routes)
    add_lora(y, x, pools32, build_lora_batch(routes, backend=CPU_KERNEL))
    _check(y, expected)
    assert torch.equal(wide_y[:, :4], torch.zeros(12, 4))
    assert torch.equal(wide_y[:, 4 + sum(outs) :], torch.zeros(12, 5))


def test_auto_picks_the_kernel_for_float32_and_bfloat16_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert str(lora_backend("auto", cpu, torch.float32)) == "cpu"
    assert str(lora_backend("auto", cpu, torch.bfloat16)) == "cpu"
    assert str(lora_backend("auto", cpu, torch.float16)) == "torch"
    assert str(lora_backend("torch", cpu, torch.float32)) == "torch"
    with pytest.raises(ValueError, match="float32 or bfloat16 on CPU"):
        lora_backend("cpu", cpu, torch.float16)
    with pytest.raises(ValueError, match="cannot serve"):
        build_lora_batch([(8, 0)], dtype=torch.float16, backend=CPU_KERNEL)
    assert str(EngineConfig(device="cpu", dtype="bfloat16").lora_backend()) == "cpu"
    # float32 weights under bfloat16 activations: one more build.
    assert str(lora_backend("auto", cpu, torch.bfloat16, torch.float32)) == "cpu"
    assert str(EngineConfig(device="cpu").lora_backend()) == "cpu"
    assert str(EngineConfig(device="cpu", lora_kernel="torch").lora_backend()) == "torch"
    # bfloat16 weights under float32 activations: the kernel's other build.
    assert str(lora_backend("auto", cpu, torch.float32, torch.bfloat16)) == "cpu"
    assert str(EngineConfig(device="cpu", lora_dtype="bfloat16").lora_backend()) == "cpu"
    assert cpu_kernel.load(torch.float16) is None


def test_lora_dtype_other_than_the_serving_dtype_is_cpu_only() -> None:
    assert EngineConfig(device="cpu").torch_lora_dtype() == torch.float32
    assert EngineConfig(device="cpu", lora_dtype="bfloat16").torch_lora_dtype() == torch.bfloat16
    assert EngineConfig(device="cuda").torch_lora_dtype() == torch.bfloat16
    assert EngineConfig(device="cuda", lora_dtype="bfloat16").torch_lora_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match="only CPU serving"):
        EngineConfig(device="cuda", lora_dtype="float32").torch_lora_dtype()
    with pytest.raises(ValueError, match="unknown lora_dtype"):
        EngineConfig(lora_dtype="float16")
    with pytest.raises(ValueError, match=r"reads torch\.float32 weights"):
        lora_backend("triton", torch.device("cpu"), torch.float32, torch.bfloat16)


def test_refuses_what_would_leave_its_tensors() -> None:
    """The C code trusts its pointers, so mismatches are refused before the call."""
    pools32, _ = _pools((40,))
    x = torch.randn(3, D_IN)
    y = torch.zeros(3, 40)
    with pytest.raises(ValueError, match="do not match"):  # slot 7 is past the pool's 5
        add_lora(y, x, pools32, build_lora_batch([(8, 7)], backend=CPU_KERNEL))
    with pytest.raises(ValueError, match="do not match"):  # token 5 is past x's 3 rows
        add_lora(y, x, pools32, build_lora_batch([None] * 5 + [(8, 0)], backend=CPU_KERNEL))
    with pytest.raises(ValueError, match="do not match"):  # x is narrower than A
        add_lora(y, x[:, :10], pools32, build_lora_batch([(8, 0)], backend=CPU_KERNEL))
    with pytest.raises(TypeError, match="float32"):
        add_lora(y.double(), x.double(), pools32, build_lora_batch([(8, 0)], backend=CPU_KERNEL))
    with pytest.raises(TypeError, match="one dtype"):  # x and y must share a dtype
        add_lora(y.bfloat16(), x, pools32, build_lora_batch([(8, 0)], backend=CPU_KERNEL))
    with pytest.raises(ValueError, match="contiguous rows"):
        add_lora(y, x.t().contiguous().t(), pools32, build_lora_batch([(8, 0)], backend=CPU_KERNEL))
    a, bs = pools32[8]
    mixed = {8: (a.bfloat16(), bs)}  # A and B must share one weight dtype
    with pytest.raises(ValueError, match="do not match"):
        add_lora(y, x, mixed, build_lora_batch([(8, 0)], backend=CPU_KERNEL))
    halves = {8: (a.half(), tuple(b.half() for b in bs))}  # no build for float16 weights
    with pytest.raises(ValueError, match="do not match"):
        add_lora(y, x, halves, build_lora_batch([(8, 0)], backend=CPU_KERNEL))


def test_builds_into_the_cache_and_can_be_turned_off(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERHUB_KERNEL_CACHE", str(tmp_path))
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is not None
        (built,) = tmp_path.glob("lora_sgmv_*.so")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]
        cpu_kernel.load.cache_clear()
        assert cpu_kernel.load() is not None  # reused, not rebuilt
        assert list(tmp_path.glob("lora_sgmv_*.so")) == [built]
        monkeypatch.setenv("ADAPTERHUB_CPU_LORA_KERNEL", "0")
        cpu_kernel.load.cache_clear()
        assert cpu_kernel.load() is None
        assert str(lora_backend("auto", torch.device("cpu"), torch.float32)) == "torch"
    finally:
        monkeypatch.undo()
        cpu_kernel.load.cache_clear()


def test_without_a_working_compiler_the_torch_ops_serve(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERHUB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None
        assert str(EngineConfig(device="cpu").lora_backend()) == "torch"
        with pytest.raises(ValueError, match="cannot be built"):
            EngineConfig(device="cpu", lora_kernel="cpu").lora_backend()
    finally:
        monkeypatch.undo()
        cpu_kernel.load.cache_clear()
