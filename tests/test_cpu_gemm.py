"""`cpu_gemm`, the C GEMM for frozen float32 weights, against a float64 reference, and
`FrozenLinear`'s choice between it, oneDNN and ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterhub_server import cpu_gemm
from adapterhub_server.frozen_linear import FrozenLinear
from adapterhub_server.torch_threads import single_threaded

pytestmark = pytest.mark.skipif(
    cpu_gemm.load() is None, reason="the C GEMM kernel cannot be built here"
)


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return out if bias is None else out + bias.double()


def _check(rows: int, n: int, k: int, *, bias: bool, gap: int = 0) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    wide = torch.randn(rows, k + gap, generator=g)
    x = wide[:, :k]  # rows `k + gap` apart
    out = cpu_gemm.linear(x, cpu_gemm.pack(w), b, n)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    # float32 sums over k terms of unit-variance products
    torch.testing.assert_close(out.double(), _reference(x, w, b), rtol=0, atol=2e-6 * k + 1e-5)


# Row counts: the one-tile path's 4/8/12/16-row instances and their partial fills, and the
# many-row path's 12-row tiles, whole and partial. Columns: whole blocks, a partial block, a
# partial pair, whole pairs.
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 12, 13, 16, 17, 24, 25, 40, 130])
@pytest.mark.parametrize("n", [16, 40, 48, 96])
def test_matches_the_float64_reference(rows: int, n: int) -> None:
    _check(rows, n, 67, bias=False)


@pytest.mark.parametrize("rows", [2, 16, 29])
@pytest.mark.parametrize("n", [7, 33, 64])
@pytest.mark.parametrize("k", [1, 5, 576])
def test_bias_and_odd_shapes(rows: int, n: int, k: int) -> None:
    _check(rows, n, k, bias=True)


@pytest.mark.parametrize("rows", [3, 16, 50])
def test_x_rows_apart(rows: int) -> None:
    _check(rows, 48, 64, bias=True, gap=13)


@pytest.mark.parametrize("rows", [5, 40])
def test_one_thread_gives_the_same_result(rows: int) -> None:
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(200, 96, generator=g), torch.randn(rows, 96, generator=g)
    packed = cpu_gemm.pack(w)
    both = cpu_gemm.linear(x, packed, None, 200)
    with single_threaded():
        one = cpu_gemm.linear(x, packed, None, 200)
    # each output is one work item's sum in k order: the split over threads changes nothing
    assert torch.equal(one, both)


def test_nan_stays_in_its_row() -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(40, 32, generator=g), torch.randn(20, 32, generator=g)
    x[17, 5] = float("nan")
    out = cpu_gemm.linear(x, cpu_gemm.pack(w), None, 40)
    assert out[17].isnan().all()
    rest = torch.cat([out[:17], out[18:]])
    assert rest.isfinite().all()


def test_pack_layout_and_refusals() -> None:
    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    packed = cpu_gemm.pack(w)
    assert packed.shape == (4, 3, 16)  # 40 columns -> two 32-column pairs
    assert torch.equal(packed[1, 2], w[16:32, 2])  # block 1, k = 2: columns 16-31
    assert torch.equal(packed[2, :, :8].T, w[32:40])
    assert not packed[2, :, 8:].any() and not packed[3].any()  # zero padding
    assert cpu_gemm.pack(w.bfloat16()) is None
    assert cpu_gemm.pack(w[:, :0]) is None
    with pytest.raises(ValueError):
        cpu_gemm.linear(torch.randn(2, 4), packed, None, 40)  # K mismatch
    with pytest.raises(ValueError):
        cpu_gemm.linear(torch.randn(2, 3), packed, None, 65)  # more columns than packed
    with pytest.raises(ValueError):
        cpu_gemm.linear(torch.randn(3, 2).T, packed, None, 40)  # columns not contiguous
    assert cpu_gemm.linear(torch.randn(0, 3), packed, None, 40).shape == (0, 40)


def test_frozen_linear_routes_by_dtype_and_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    layer = FrozenLinear(w, b)
    assert layer.gemm_packed is not None and layer.packed is None  # one packed copy
    calls: list[int] = []
    real = cpu_gemm.linear
    monkeypatch.setattr(cpu_gemm, "linear", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    for rows in (1, cpu_gemm.MAX_ROWS, cpu_gemm.MAX_ROWS + 1):
        x = torch.randn(rows, 64, generator=g)
        torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert calls == [1, cpu_gemm.MAX_ROWS]  # prefill-sized inputs go to F.linear
    # a strided x is made contiguous rather than refused
    x = torch.randn(64, 5, generator=g).T
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)

    half = FrozenLinear(w.bfloat16(), None)
    assert half.gemm_packed is None  # bfloat16: oneDNN (AMX where the CPU has it)


def test_frozen_linear_keeps_autograd() -> None:
    w = torch.randn(32, 16)
    x = torch.randn(4, 16, requires_grad=True)
    FrozenLinear(w, None)(x).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 16))


def test_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERHUB_CPU_GEMM_KERNEL", "0")
    cpu_gemm.load.cache_clear()
    try:
        assert cpu_gemm.load() is None
        layer = FrozenLinear(torch.randn(32, 16), None)
        assert layer.gemm_packed is None
        x = torch.randn(3, 16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    finally:
        monkeypatch.delenv("ADAPTERHUB_CPU_GEMM_KERNEL")
        cpu_gemm.load.cache_clear()
    assert cpu_gemm.load() is not None
