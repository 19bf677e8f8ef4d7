"""The C helpers every CPU kernel shares (`c_build.VECTOR_HELPERS`), against torch's own
bfloat16 conversions, bit for bit: the AVX-512 widening and the generic one (the build for
CPUs without AVX-512, forced here with ``-mno-avx512f``)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import pytest
import torch

from adapterhub_server.c_build import VECTOR_HELPERS, load_function

_SOURCE = (
    VECTOR_HELPERS
    + r"""
/* dst[i] = widen(src[i]) and narrow[i] = round(src2[i]), 16 at a time. */
int convert(const uint16_t *src, float *dst, const float *src2, uint16_t *narrow, int64_t n) {
    for (int64_t i = 0; i + 16 <= n; i += 16) {
        store16(dst + i, bf16_load16(src + i));
        bf16_store16(narrow + i, load16(src2 + i));
    }
    return 0;
}
"""
)

_FLAGS = {"avx512": (), "generic": ("-mno-avx512f",)}


def _convert(flags: tuple[str, ...]) -> Callable[..., int]:
    p = ctypes.c_void_p
    fn = load_function(
        _SOURCE, "convert", [p, p, p, p, ctypes.c_int64], defines=flags, switch="ADAPTERHUB_TEST"
    )
    if fn is None:
        pytest.skip("no C compiler here")
    return fn


def _special_floats() -> torch.Tensor:
    """Every bfloat16 bit pattern's float, plus float32 values around rounding ties."""
    every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    ties = (torch.randint(0, 1 << 16, (4096,), generator=gen, dtype=torch.int32) << 16) | 0x8000
    near = ties + torch.randint(-2, 3, (4096,), generator=gen, dtype=torch.int32)
    return torch.cat([every.float(), ties.view(torch.float32), near.view(torch.float32)])


@pytest.mark.parametrize("build", list(_FLAGS))
def test_bfloat16_widening_and_rounding_match_torch(build: str) -> None:
    fn = _convert(_FLAGS[build])
    floats = _special_floats()
    n = floats.numel()
    bits = torch.arange(0, n, dtype=torch.int32).to(torch.int16)  # every pattern, and again
    wide = torch.empty(n, dtype=torch.float32)
    narrow = torch.empty(n, dtype=torch.int16)
    fn(bits.data_ptr(), wide.data_ptr(), floats.data_ptr(), narrow.data_ptr(), n)
    # Widening is exact: the same bits, NaN payloads, signed zeros and subnormals included.
    expected = bits.view(torch.bfloat16).float()
    assert torch.equal(wide.view(torch.int32), expected.view(torch.int32))
    # Rounding to nearest, ties to even, as torch rounds; a NaN stays a (quiet) NaN.
    nan = floats.isnan()
    assert torch.equal(narrow[~nan], floats[~nan].bfloat16().view(torch.int16))
    assert bool((narrow[nan] == 0x7FC0).all()) and bool(nan.any())
