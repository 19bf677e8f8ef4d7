"""The CPU decode-attention kernel against a float64 reference and against the torch path
(gather + SDPA): grouped-query shapes, head sizes off the vector width, block sizes,
sliding windows, scattered block tables, thread counts; it never reads past the visible
positions, and it refuses tables outside the cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from adapterhub_server.models import cpu_attention
from adapterhub_server.models.attention import (
    KVCache,
    attend,
    build_attention_metadata,
    decode_attention_torch,
)

pytestmark = pytest.mark.skipif(
    cpu_attention.load() is None, reason="the CPU attention kernel cannot be built here"
)


@dataclass
class Case:
    cache: KVCache
    q: torch.Tensor
    """``[n, heads, head_dim]``: one query per sequence."""
    tables: list[list[int]]
    positions: list[int]


def _setup(
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    positions: list[int],
    dtype: torch.dtype,
    seed: int = 0,
) -> Case:
    """A one-layer cache of random keys and values, each sequence's blocks scattered over
    it in a shuffled order, and one query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    needed = [p // block_size + 1 for p in positions]
    num_blocks = 1 + sum(needed) + 3
    cache = KVCache(
        num_layers=1,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device="cpu",
    )
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = []
    for n in needed:
        tables.append(order[:n])
        order = order[n:]
    q = torch.randn(len(positions), heads, head_dim, generator=gen).to(dtype)
    return Case(cache, q, tables, positions)


def _reference(case: Case, scale: float, window: int | None) -> torch.Tensor:
    """float64 softmax attention over each sequence's visible positions, read one by one."""
    cache, q, tables, positions = case.cache, case.q, case.tables, case.positions
    n, heads, d = q.shape
    kv_heads, bs = cache.k.shape[3], cache.block_size
    group = heads // kv_heads
    out = torch.empty(n, heads, d, dtype=torch.float64)
    for i, (table, p) in enumerate(zip(tables, positions)):
        lo = max(0, p - window + 1) if window else 0
        rows = [table[j // bs] * bs + j % bs for j in range(lo, p + 1)]
        keys = cache.k[0].reshape(-1, kv_heads, d)[rows].double()  # [L, kv_heads, d]
        values = cache.v[0].reshape(-1, kv_heads, d)[rows].double()
        for h in range(heads):
            s = keys[:, h // group] @ q[i, h].double() * scale
            out[i, h] = torch.softmax(s, 0) @ values[:, h // group]
    return out


def _kernel(case: Case, scale: float, window: int | None) -> torch.Tensor:
    cache, q = case.cache, case.q
    meta = build_attention_metadata(case.tables, case.positions, [], cache.block_size)
    out = torch.empty_like(q)
    cpu_attention.paged_attention(
        q,
        cache.k[0],
        cache.v[0],
        meta.decode_block_table,
        meta.decode_positions,
        out,
        scale=scale,
        sliding_window=window,
    )
    return out


def _torch_path(case: Case, scale: float, window: int | None) -> torch.Tensor:
    meta = build_attention_metadata(case.tables, case.positions, [], case.cache.block_size)
    return decode_attention_torch(
        case.q, case.cache, 0, meta, scale=scale, sliding_window=window, softcap=None
    )


SHAPES = {  # (heads, kv_heads, head_dim)
    "mha": (4, 4, 64),
    "gqa-3": (9, 3, 64),
    "gqa-6": (12, 2, 64),
    "gqa-4-dim-128": (8, 2, 128),
    "mqa-5-dim-128": (5, 1, 128),
    "gqa-4-dim-40": (8, 2, 40),
    "mqa-6-dim-80": (6, 1, 80),
    "group-16-dim-8": (16, 1, 8),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_matches_reference_and_torch_path(
    shape: str, block_size: int, window: int | None, threads: int
) -> None:
    heads, kv_heads, d = SHAPES[shape]
    positions = [0, 1, 4, 15, 16, 37, 70, 6]
    case = _setup(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        block_size=block_size,
        positions=positions,
        dtype=torch.float32,
    )
    scale = d**-0.5
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _kernel(case, scale, window)
    finally:
        torch.set_num_threads(previous)
    ref = _reference(case, scale, window)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got, _torch_path(case, scale, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["gqa-3", "gqa-4-dim-40"])
def test_bfloat16_rounds_once_from_float32_sums(shape: str) -> None:
    heads, kv_heads, d = SHAPES[shape]
    positions = [3, 40, 129, 0]
    case = _setup(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        block_size=16,
        positions=positions,
        dtype=torch.bfloat16,
    )
    got = _kernel(case, d**-0.5, None)
    assert got.dtype == torch.bfloat16
    ref = _reference(case, d**-0.5, None)
    # The sums are float32 over bfloat16 inputs, then one rounding: within a unit in the
    # last place of the result (bfloat16 has 8 bits of mantissa), not the drift of a
    # bfloat16 accumulation.
    ulp = ref.abs().clamp_min(1e-3) * 2.0**-7
    assert ((got.double() - ref).abs() <= ulp).float().mean() > 0.99
    torch_path = _torch_path(case, d**-0.5, None)
    torch.testing.assert_close(got.float(), torch_path.float(), rtol=2e-2, atol=2e-2)


def test_reads_only_the_visible_positions() -> None:
    """NaN everywhere a sequence does not see (the rest of its last block, table padding,
    positions behind a sliding window) leaves its output finite; a NaN it does see makes
    its output NaN, and only its own."""
    positions = [20, 3, 33]
    case = _setup(
        heads=4, kv_heads=2, head_dim=16, block_size=8, positions=positions, dtype=torch.float32
    )
    window = 10
    cache = case.cache
    visible = torch.zeros(cache.k.shape[1] * 8, dtype=torch.bool)
    for table, p in zip(case.tables, positions):
        for j in range(max(0, p - window + 1), p + 1):
            visible[table[j // 8] * 8 + j % 8] = True
    for t in (cache.k, cache.v):
        t.view(-1, 2, 16)[~visible] = float("nan")
    got = _kernel(case, 0.25, window)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _reference(case, 0.25, window), rtol=2e-6, atol=2e-6)
    cache.v.view(-1, 2, 16)[case.tables[1][0] * 8 + 2] = float("nan")  # sequence 1 sees it
    got = _kernel(case, 0.25, window)
    assert torch.isnan(got[1]).all()
    assert torch.isfinite(got[[0, 2]]).all()


def test_refuses_a_table_outside_the_cache() -> None:
    case = _setup(
        heads=2, kv_heads=1, head_dim=16, block_size=4, positions=[5], dtype=torch.float32
    )
    out = torch.empty_like(case.q)

    def run(table: list[int], position: int) -> None:
        cpu_attention.paged_attention(
            case.q,
            case.cache.k[0],
            case.cache.v[0],
            torch.tensor([table]),
            torch.tensor([position]),
            out,
            scale=0.25,
            sliding_window=None,
        )

    run(case.tables[0], 5)
    with pytest.raises(ValueError, match="past its block table"):
        run(case.tables[0], 8)  # position 8 would need a third block
    with pytest.raises(ValueError, match="outside the cache"):
        run([1, case.cache.num_blocks], 5)


def test_attend_takes_the_kernel_except_for_soft_capping(monkeypatch: pytest.MonkeyPatch) -> None:
    positions = [9, 30]
    case = _setup(
        heads=6, kv_heads=2, head_dim=32, block_size=16, positions=positions, dtype=torch.float32
    )
    meta = build_attention_metadata(case.tables, positions, [], 16)
    k = torch.randn(2, 2, 32)
    v = torch.randn(2, 2, 32)
    calls: list[int] = []
    real = cpu_attention.paged_attention
    monkeypatch.setattr(
        cpu_attention, "paged_attention", lambda *a, **kw: (calls.append(1), real(*a, **kw))
    )
    out = attend(case.q, k, v, case.cache, 0, meta)
    assert calls == [1]
    assert torch.isfinite(out).all()
    # attend wrote this step's keys and values before attending over them
    torch.testing.assert_close(
        out.view(2, 6, 32).double(),
        _reference(case, 32**-0.5, None),
        rtol=2e-6,
        atol=2e-6,
    )
    attend(case.q, k, v, case.cache, 0, meta, softcap=5.0)
    assert calls == [1]  # soft-capping: the torch path


def test_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 2, 16)
    k_cache = torch.zeros(3, 4, 1, 16)
    cpu_attention.load.cache_clear()
    try:
        assert cpu_attention.applies(q, k_cache, None)
        assert not cpu_attention.applies(q, k_cache, 30.0)
        assert not cpu_attention.applies(q.double(), k_cache.double(), None)
        assert not cpu_attention.applies(torch.randn(1, 17, 16), k_cache, None)  # group > 16
        assert not cpu_attention.applies(torch.randn(1, 16, 2).transpose(1, 2), k_cache, None)
        monkeypatch.setenv("ADAPTERHUB_CPU_ATTENTION_KERNEL", "0")
        cpu_attention.load.cache_clear()
        assert not cpu_attention.applies(q, k_cache, None)
    finally:
        monkeypatch.undo()
        cpu_attention.load.cache_clear()


def test_long_contexts_over_many_blocks() -> None:
    """Scores of a few thousand keys per head: the exponential's range reduction and the
    padded score rows at sizes well past one vector."""
    positions = [2047, 1000]
    case = _setup(
        heads=4, kv_heads=2, head_dim=32, block_size=16, positions=positions, dtype=torch.float32
    )
    case.q.mul_(4.0)  # sharper softmax: weights spanning many orders of magnitude
    got = _kernel(case, 32**-0.5, None)
    ref = _reference(case, 32**-0.5, None)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert not math.isnan(got.sum().item())


@pytest.mark.parametrize("start", [0, 49])
@pytest.mark.parametrize("window", [None, 7])
def test_a_prefill_chunk_is_causal_over_one_shared_table(
    start: int, window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's tokens are queries at their own positions over the chunk's one table
    (``[1, width]``): each sees up to itself. Through `attend` (which writes the chunk's
    keys and values first) the kernel equals the torch path (gather, or the chunk's own
    keys when nothing is cached, then SDPA)."""
    chunk = 12
    case = _setup(
        heads=9,
        kv_heads=3,
        head_dim=64,
        block_size=16,
        positions=[start + chunk - 1],
        dtype=torch.float32,
    )
    table = case.tables[0]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(chunk, 9, 64, generator=gen)
    k = torch.randn(chunk, 3, 64, generator=gen)
    v = torch.randn(chunk, 3, 64, generator=gen)
    meta = build_attention_metadata([], [], [(table, start, chunk)], 16)
    got = attend(q, k, v, case.cache, 0, meta, sliding_window=window).view(chunk, 9, 64)
    positions = list(range(start, start + chunk))
    ref = _reference(Case(case.cache, q, [table] * chunk, positions), 64**-0.5, window)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)
    monkeypatch.setattr(cpu_attention, "applies", lambda *_: False)
    torch_path = attend(q, k, v, case.cache, 0, meta, sliding_window=window)
    torch.testing.assert_close(got, torch_path.view(chunk, 9, 64), rtol=1e-5, atol=1e-5)
