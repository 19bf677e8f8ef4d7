"""Frozen float32 linear layers on CPU, in C: a GEMM that keeps the weight stream moving.

A decode step multiplies a few rows (one per sequence) by every frozen weight of the
model, so the step is bound by reading the weights. oneDNN's GEMM on a prepacked weight
reads them at about half of what the cores could: over SmolLM2-135M's 30 layers and its
lm_head at 16 rows it takes ~40 ms on 2 cores, where one row streams the 538 MB in ~21 ms.
A loop that does 16 FMAs per 64-byte line of weights leaves the hardware prefetchers
behind; prefetching the weight stream by software 64 lines ahead lets the arithmetic hide
under the memory traffic (~30 ms at 16 rows; ``bench/linear_cpu.py`` measures all three
GEMMs). More rows run in tiles of 12 rows against 32-column panel pairs that stay in the
core's L2; past `MAX_ROWS` rows (prefill) MKL's and oneDNN's compute-bound GEMMs are
faster, and `frozen_linear` calls ``F.linear``.

Layout: the weight ``[N, K]`` is packed once into ``[2 ceil(N / 32), K, 16]`` (16 output
columns side by side for every k, zero-padded past N); each call transposes x into tiles
of ``[K, 16]`` (16 rows, or 12 when there are more than 16). One work item is a 16-column
block (up to 16 rows) or a 32-column pair times a tile; its accumulators are vector
registers, one per row and block, and each FMA broadcasts one x value against 16 weights.
Sums are float32, in k order: the result is the GEMM up to float summation order, like
oneDNN's and MKL's. The torch reference is ``F.linear`` on the unpacked weight;
``ADAPTERHUB_CPU_GEMM_KERNEL=0`` turns the kernel off (`frozen_linear` then prepacks for
oneDNN as before).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from adapterhub_server.c_build import VECTOR_HELPERS, load_function

BLOCK = 16
"""Output columns per packed block, and rows per tile: one 16-float vector."""
MAX_ROWS = 128
"""Calls with more rows are better served by ``F.linear``: over the default model's stack
of weights the kernel is 1.34x oneDNN's speed at 16 rows, 1.05x at 96, even at 128 and
0.9x at 256-512 (``bench/linear_cpu.py``)."""

_SOURCE = (
    VECTOR_HELPERS
    + r"""
#define BLOCK 16
/* How far ahead (in 64-byte lines of the weight stream) a panel read from memory is
   prefetched: over the default model's weights at 16 rows, 32 to 128 lines all took
   ~30% off the time without (40 ms), 16 lines ~22%. */
#define PREFETCH 64

/* Rows m < R of the one tile (M <= 16) times one 16-column block:
   out[m][c] = b[c] + sum_k xt[k][m] w[k][c] for c < cols, the panel streamed from memory.
   `R` is a constant per instance, so the accumulators live in registers. */
#define TILE(R)                                                                          \
    static void tile_##R(const float *restrict w, const float *restrict xt, int64_t K,     \
                         v16 b, float *restrict out, int64_t ldo, int rows, int cols) {    \
        v16 acc[R];                                                                        \
        _Pragma("GCC unroll 16") for (int m = 0; m < R; m++) acc[m] = b;                   \
        for (int64_t k = 0; k < K; k++) {                                                  \
            __builtin_prefetch(w + (k + PREFETCH) * BLOCK, 0, 1);                          \
            const v16 wk = load16(w + k * BLOCK);                                          \
            const float *xk = xt + k * BLOCK;                                              \
            _Pragma("GCC unroll 16") for (int m = 0; m < R; m++) acc[m] += xk[m] * wk;     \
        }                                                                                  \
        for (int m = 0; m < rows; m++) {                                                   \
            if (cols == BLOCK) store16(out + m * ldo, acc[m]);                             \
            else memcpy(out + m * ldo, &acc[m], (size_t)cols * sizeof(float));            \
        }                                                                                  \
    }
TILE(4)
TILE(8)
TILE(12)
TILE(16)

/* Rows m < TR of one tile times two adjacent column blocks (32 columns); the compute-bound
   shape for many rows: 24 accumulators, two weight vectors and one x broadcast per FMA pair,
   from a tile and a panel pair that the core's L2 holds. */
#define TR 12
static void pair_tile(const float *restrict w, const float *restrict xt, int64_t K,
                      const float *restrict bias, int prefetch, float *restrict out,
                      int64_t ldo, int rows, int cols) {
    const float *w1 = w + K * BLOCK;
    v16 b0 = {0}, b1 = {0};
    if (bias != NULL) {
        memcpy(&b0, bias, (size_t)(cols < BLOCK ? cols : BLOCK) * sizeof(float));
        if (cols > BLOCK) memcpy(&b1, bias + BLOCK, (size_t)(cols - BLOCK) * sizeof(float));
    }
    v16 a0[TR], a1[TR];
    _Pragma("GCC unroll 16") for (int m = 0; m < TR; m++) { a0[m] = b0; a1[m] = b1; }
    for (int64_t k = 0; k < K; k++) {
        if (prefetch) {
            __builtin_prefetch(w + (k + PREFETCH) * BLOCK, 0, 1);
            __builtin_prefetch(w1 + (k + PREFETCH) * BLOCK, 0, 1);
        }
        const v16 u = load16(w + k * BLOCK), v = load16(w1 + k * BLOCK);
        const float *xk = xt + k * BLOCK;
        _Pragma("GCC unroll 16") for (int m = 0; m < TR; m++) {
            a0[m] += xk[m] * u;
            a1[m] += xk[m] * v;
        }
    }
    for (int m = 0; m < rows; m++) {
        float *o = out + m * ldo;
        if (cols >= BLOCK) store16(o, a0[m]);
        else memcpy(o, &a0[m], (size_t)cols * sizeof(float));
        if (cols == 2 * BLOCK) store16(o + BLOCK, a1[m]);
        else if (cols > BLOCK) memcpy(o + BLOCK, &a1[m], (size_t)(cols - BLOCK) * sizeof(float));
    }
}

/* x's rows [r0, r0 + rows) transposed into dst [K][16], rows past `rows` zero. */
static void transpose_tile(const float *x, int64_t ldx, int64_t K, int64_t rows, float *dst) {
    for (int64_t k = 0; k < K; k++) {
        for (int64_t m = 0; m < rows; m++) dst[k * BLOCK + m] = x[m * ldx + k];
        for (int64_t m = rows; m < BLOCK; m++) dst[k * BLOCK + m] = 0.0f;
    }
}

/* out[m, n] = sum_k x[m, k] wp[n / 16, k, n % 16] (+ bias[n]) for m < M, n < N.
   x: [M, K], rows ldx apart; wp: [2 ceil(N / 32), K, 16]; bias: [N] or NULL;
   out: [M, N], rows ldo apart. Up to 16 rows: one tile, each 16-column block a work item
   streaming its panel; more: tiles of TR rows times 32-column pairs.
   Returns 0, or 1 when the x tiles cannot be allocated. */
int frozen_gemm(const float *x, int64_t ldx, const float *wp, const float *bias, float *out,
                int64_t ldo, int64_t M, int64_t N, int64_t K, int64_t num_threads) {
    const int64_t rows_per_tile = M <= BLOCK ? BLOCK : TR;
    const int64_t tiles = (M + rows_per_tile - 1) / rows_per_tile;
    float *xt = aligned_alloc(64, (size_t)(tiles * K * BLOCK) * sizeof(float));
    if (xt == NULL) return 1;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t r0 = t * rows_per_tile;
            const int64_t rows = M - r0 < rows_per_tile ? M - r0 : rows_per_tile;
            transpose_tile(x + r0 * ldx, ldx, K, rows, xt + t * K * BLOCK);
        }
        if (M <= BLOCK) {
            const int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < blocks; nb++) {
                const int cols = N - nb * BLOCK < BLOCK ? (int)(N - nb * BLOCK) : BLOCK;
                v16 b = {0};
                if (bias != NULL) memcpy(&b, bias + nb * BLOCK, (size_t)cols * sizeof(float));
                const float *w = wp + nb * K * BLOCK;
                float *o = out + nb * BLOCK;
                const int rows = (int)M;
                switch ((rows + 3) / 4) {
                case 1: tile_4(w, xt, K, b, o, ldo, rows, cols); break;
                case 2: tile_8(w, xt, K, b, o, ldo, rows, cols); break;
                case 3: tile_12(w, xt, K, b, o, ldo, rows, cols); break;
                default: tile_16(w, xt, K, b, o, ldo, rows, cols); break;
                }
            }
        } else {
            const int64_t pairs = (N + 2 * BLOCK - 1) / (2 * BLOCK);
#pragma omp for collapse(2) schedule(static)
            for (int64_t np = 0; np < pairs; np++) {
                for (int64_t t = 0; t < tiles; t++) {
                    const int64_t c0 = np * 2 * BLOCK, r0 = t * TR;
                    const int cols = N - c0 < 2 * BLOCK ? (int)(N - c0) : 2 * BLOCK;
                    const int rows = M - r0 < TR ? (int)(M - r0) : TR;
                    /* The first tile streams the panels from memory; later ones find
                       them in L2. */
                    pair_tile(wp + 2 * np * K * BLOCK, xt + t * K * BLOCK, K,
                              bias == NULL ? NULL : bias + c0, t == 0, out + r0 * ldo + c0,
                              ldo, rows, cols);
                }
            }
        }
    }
    free(xt);
    return 0;
}
"""
)


@functools.cache
def load() -> Callable[..., int] | None:
    """The kernel; None where it cannot serve (`c_build.load_function`) or
    ``ADAPTERHUB_CPU_GEMM_KERNEL=0``."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return load_function(
        _SOURCE,
        "frozen_gemm",
        [p, i, p, p, p, i, i, i, i, i],
        switch="ADAPTERHUB_CPU_GEMM_KERNEL",
    )


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` ``[N, K]`` packed for `linear` as ``[2 ceil(N / 32), K, 16]``; None where the
    kernel does not serve it (not a float32 CPU matrix, or no kernel here)."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or not weight.is_cpu:
        return None
    n, k = weight.shape
    if n == 0 or k == 0 or load() is None:
        return None
    blocks = 2 * -(-n // (2 * BLOCK))  # whole column pairs, for the many-row path
    padded = weight.detach()
    if blocks * BLOCK != n:
        padded = torch.cat([padded, padded.new_zeros(blocks * BLOCK - n, k)])
    return padded.view(blocks, BLOCK, k).transpose(1, 2).contiguous()


def linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """``x @ weight.T + bias`` for the packed weight.

    Args:
        x: ``[T, K]`` float32 on CPU, rows contiguous.
        packed: ``[2 ceil(N / 32), K, 16]`` from `pack`.
        bias: ``[N]`` float32, or None.
        out_features: N.

    Returns:
        ``[T, N]`` float32.
    """
    blocks, k, block = packed.shape
    t = x.shape[0]
    if (
        x.dim() != 2
        or x.shape[1] != k
        or x.dtype != torch.float32
        or x.stride(1) != 1
        or not packed.is_contiguous()
        or block != BLOCK
        or not 0 < out_features <= blocks * BLOCK
        or (
            bias is not None
            and (
                bias.shape != (out_features,)
                or bias.dtype != torch.float32
                or not bias.is_contiguous()
            )
        )
    ):
        raise ValueError("frozen GEMM: tensors do not match")
    out = x.new_empty(t, out_features)
    if t == 0:
        return out
    kernel = load()
    if kernel is None:
        raise RuntimeError("the CPU GEMM kernel is not available here")
    status = kernel(
        x.data_ptr(),
        x.stride(0),
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        out_features,
        t,
        out_features,
        k,
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("the CPU GEMM kernel could not allocate its x tiles")
    return out
