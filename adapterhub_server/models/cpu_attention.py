"""Attention over the paged KV cache on CPU, in C: keys and values read in place.

The torch path of `attention.attend` copies every decoding sequence's blocks out of the
cache (`KVCache.gather`) and runs SDPA over the copy under a mask; a prefill chunk with a
cached prefix copies its prefix the same way and repeats it for every query head. Those
copies grow with the context: 16 sequences at 1,024 tokens on the default model spent ~72
ms per decode step in attention, as much as the whole rest of the step, and a 20-token
chunk after 1,000 cached tokens ~85 ms per forward (``bench/attention_cpu.py`` measures
both paths). This kernel walks the block table and reads the visible keys and values where
they lie: one work item per query (a decoding sequence's token, or one token of a prefill
chunk, whose queries share the chunk's table), whose blocks hold every KV head's keys side
by side, so each block streams once in address order; each key and value vector is loaded
once for all the query heads that share it (grouped-query attention), and the work is
spread over torch's OpenMP threads.

Semantics, for query i at position p = ``positions[i]``, query head h of KV head
``h // group``, and visible positions ``lo <= j <= p`` (``lo = p - window + 1`` with a
sliding window, else 0)::

    s_j = scale * q[i, h] . K[j]
    out[i, h] = sum_j softmax(s)_j * V[j]

with ``K[j]``, ``V[j]`` the key and value of position j, at offset ``j % block_size`` of
block ``block_table[i, j // block_size]`` (row 0 for every query when the table has one
row). A prefill chunk is causal this way: its token at position p sees up to p, its own key
included, as `attend` writes the step's keys and values before attending. Products and
sums in float32 (bfloat16 q, cache and out widened as loaded, out rounded once); the
softmax subtracts the row's maximum and its exponential is a polynomial within 2 ulp of
float32's (SDPA on CPU uses a vectorized one too). Positions outside ``[lo, p]`` are never
read, so table padding and blocks a sequence gave back may hold anything. Soft-capping is
not computed here: those layers take the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections.abc import Callable

import torch

from adapterhub_server.c_build import VECTOR_HELPERS, load_function

_SOURCE = (
    VECTOR_HELPERS
    + r"""
#include <math.h>

/* The element type `at` of q, the cache and out: float32, or bfloat16 (-DACT_BF16). */
#ifdef ACT_BF16
typedef uint16_t at;
static inline v16 loada16(const at *p) { return bf16_load16(p); }
static inline float loada(const at *p) { return bf16_load(p); }
static inline void storea(at *p, float f) { bf16_store(p, f); }
#else
typedef float at;
static inline v16 loada16(const at *p) { return load16(p); }
static inline float loada(const at *p) { return *p; }
static inline void storea(at *p, float f) { *p = f; }
#endif

#define MAX_GROUP 16

typedef int32_t i32x16 __attribute__((vector_size(64)));

/* a where m is all ones, else b (C has no ?: on vectors). */
static inline v16 vselect(i32x16 m, v16 a, v16 b) {
    i32x16 ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const i32x16 r = (m & ai) | (~m & bi);
    v16 v;
    memcpy(&v, &r, sizeof v);
    return v;
}

/* exp(x) for x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2,
   exp(r) by Cephes' expf polynomial, 2^n put into the exponent bits. Below -87.3 the
   result is 0 (float32 underflows there anyway); NaN stays NaN. */
static inline v16 exp_nonpositive(v16 x) {
    const i32x16 under = x < -87.3f;
    const v16 xc = vselect(under, (v16){0} - 87.3f, x);
    /* n = round(x / ln2): x <= 0, so truncating 0.5 - x / ln2 (> 0) is a floor */
    const i32x16 n = -__builtin_convertvector(0.5f - xc * 1.44269504088896341f, i32x16);
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
    v16 p = (v16){0} + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    const i32x16 bits = (n + 127) << 23;
    v16 two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const v16 e = vselect(under, (v16){0}, p * two_n);
    return vselect(x != x, x, e);
}

/* Ask for the `bytes` at p ahead of use: a sequence's blocks are scattered over the
   cache, each a run of a few KiB, too short for the hardware prefetcher to get ahead of. */
static inline void prefetch_run(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 3);
}

/* s[g * span] = dot(qf[g * d :], kp) for NH <= 4 query heads sharing one key: each
   vector of the key is loaded once for all of them. */
static inline __attribute__((always_inline)) void dot_heads(const float *restrict qf,
                                                            const at *restrict kp, int64_t d,
                                                            const int NH, float *s,
                                                            int64_t span) {
    v16 acc[4];
    for (int g = 0; g < NH; g++) acc[g] = (v16){0};
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
        const v16 kv = loada16(kp + k);
        for (int g = 0; g < NH; g++) acc[g] += load16(qf + g * d + k) * kv;
    }
    for (int g = 0; g < NH; g++) {
        float t = hsum(acc[g]);
        for (int64_t kk = k; kk < d; kk++) t += qf[g * d + kk] * loada(kp + kk);
        s[g * span] = t;
    }
}

/* s[g * span + o] = dot(qf[g * D :], kp[o * row :]) for `keys` keys of one block and
   NH query heads of head size D, both constants: the heads' q vectors stay in registers
   across the keys, so a key costs D / 16 loads and NH horizontal sums. D = 0: head size d,
   any other, through `dot_heads`. */
static inline __attribute__((always_inline)) void scores_run(
    const float *restrict qf, const at *restrict kp, int64_t row, int64_t keys,
    float *restrict s, int64_t span, int64_t d, const int D, const int NH) {
    if (D == 0) { /* another head size: one key at a time */
        for (int64_t o = 0; o < keys; o++) dot_heads(qf, kp + o * row, d, NH, s + o, span);
        return;
    }
    v16 qv[4][8];
    for (int g = 0; g < NH; g++)
        for (int c = 0; c < D / 16; c++) qv[g][c] = load16(qf + g * D + c * 16);
    for (int64_t o = 0; o < keys; o++) {
        const at *k = kp + o * row;
        v16 acc[4];
        for (int g = 0; g < NH; g++) acc[g] = (v16){0};
        for (int c = 0; c < D / 16; c++) {
            const v16 kv = loada16(k + c * 16);
            for (int g = 0; g < NH; g++) acc[g] += qv[g][c] * kv;
        }
        for (int g = 0; g < NH; g++) s[g * span + o] = hsum(acc[g]);
    }
}

/* acc[g * d + k] += sum_o w[g * span + o] * vp[o * row + k] over `keys` keys of one block,
   for NH <= 4 query heads sharing the values: the sums stay in registers across the
   block's keys, and each value vector is loaded once for all the heads. */
static inline __attribute__((always_inline)) void axpy_heads(
    float *restrict acc, const float *restrict w, int64_t span, const at *restrict vp,
    int64_t row, int64_t keys, int64_t d, const int NH) {
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
        v16 a[4];
        for (int g = 0; g < NH; g++) a[g] = load16(acc + g * d + k);
        for (int64_t o = 0; o < keys; o++) {
            const v16 v = loada16(vp + o * row + k);
            for (int g = 0; g < NH; g++) a[g] += w[g * span + o] * v;
        }
        for (int g = 0; g < NH; g++) store16(acc + g * d + k, a[g]);
    }
    for (; k < d; k++)
        for (int64_t o = 0; o < keys; o++)
            for (int g = 0; g < NH; g++)
                acc[g * d + k] += w[g * span + o] * loada(vp + o * row + k);
}

/* acc[g * D :] += sum_o w[g * span + o] * vp[o * row :] for `keys` keys, NH query heads
   and head size D, both constants: every (head, 16 columns) sum its own register, so the
   adds of consecutive keys do not wait on each other. D = 0: head size d, through
   `axpy_heads`. */
static inline __attribute__((always_inline)) void values_run(
    float *restrict acc, const float *restrict w, int64_t span, const at *restrict vp,
    int64_t row, int64_t keys, int64_t d, const int D, const int NH) {
    if (D == 0) { /* another head size */
        axpy_heads(acc, w, span, vp, row, keys, d, NH);
        return;
    }
    v16 a[4][8];
    for (int g = 0; g < NH; g++)
        for (int c = 0; c < D / 16; c++) a[g][c] = load16(acc + g * D + c * 16);
    for (int64_t o = 0; o < keys; o++) {
        float wo[4];
        for (int g = 0; g < NH; g++) wo[g] = w[g * span + o];
        for (int c = 0; c < D / 16; c++) {
            const v16 v = loada16(vp + o * row + c * 16);
            for (int g = 0; g < NH; g++) a[g][c] += wo[g] * v;
        }
    }
    for (int g = 0; g < NH; g++)
        for (int c = 0; c < D / 16; c++) store16(acc + g * D + c * 16, a[g][c]);
}

/* Query heads of a group taken at once, `left` of them to go: for the specialised head
   sizes as many as their vectors fit in 16 registers, else 4. */
static inline int heads_at_once(int64_t d, int64_t left) {
    const int64_t most = d == 128 ? 2 : 4;
    return (int)(left < most ? left : most);
}

/* CALL(D, NH) with constant D and NH: head sizes 64 and 128 (the common models') get code
   of their own; D = 0 serves any other. */
#define BY_SHAPE(d, nh, CALL)                                                              \
    switch ((d) == 64 || (d) == 128 ? (d) * 8 + (nh) : (nh)) {                             \
    case 64 * 8 + 4: CALL(64, 4); break;                                                   \
    case 64 * 8 + 3: CALL(64, 3); break;                                                   \
    case 64 * 8 + 2: CALL(64, 2); break;                                                   \
    case 64 * 8 + 1: CALL(64, 1); break;                                                   \
    case 128 * 8 + 2: CALL(128, 2); break;                                                 \
    case 128 * 8 + 1: CALL(128, 1); break;                                                 \
    case 4: CALL(0, 4); break;                                                             \
    case 3: CALL(0, 3); break;                                                             \
    case 2: CALL(0, 2); break;                                                             \
    default: CALL(0, 1); break;                                                            \
    }

/* One block's keys o0 <= o < o1 for every query head: with VALUES = 0 their scores,
   s[hq * span + o - o0] = dot(qf[hq * d :], K[o]); with VALUES = 1 their weighted values,
   acc[hq * d :] += s[hq * span + o - o0] * V[o]. `kv` is the block (keys or values); the
   next one (`next`, or NULL) is asked for a share per KV head meanwhile: spread out, so
   that the requests do not queue up behind each other. */
static inline __attribute__((always_inline)) void block_heads(
    const int VALUES, const float *qf, float *s, float *acc, const at *kv, const at *next,
    int64_t block_size, int64_t row, int64_t o0, int64_t o1, int64_t kv_heads, int64_t group,
    int64_t d, int64_t span) {
    const int64_t keys = o1 - o0;
    const int64_t share = (block_size * row * (int64_t)sizeof(at) + kv_heads - 1) / kv_heads;
    for (int64_t h = 0; h < kv_heads; h++) {
        if (next != NULL) prefetch_run((const char *)next + h * share, share);
        const at *p = kv + o0 * row + h * d;
        for (int64_t g = 0; g < group;) {
            const int64_t hq = h * group + g;
            const int nh = heads_at_once(d, group - g);
#define RUN(D, NH)                                                                         \
    if (VALUES) values_run(acc + hq * d, s + hq * span, span, p, row, keys, d, D, NH);     \
    else scores_run(qf + hq * d, p, row, keys, s + hq * span, span, d, D, NH)
            BY_SHAPE(d, nh, RUN)
#undef RUN
            g += nh;
        }
    }
}

/* `block_heads` over every block of positions lo..p (block table `blocks`) of the
   cache `kv` (keys for VALUES = 0, values for 1); scores[hq * span + j - lo] is position
   j's. */
static inline __attribute__((always_inline)) void over_blocks(
    const int VALUES, const at *kv, const int64_t *blocks, int64_t lo, int64_t p,
    int64_t block_size, int64_t row, const float *qf, float *scores, float *acc,
    int64_t kv_heads, int64_t group, int64_t d, int64_t span) {
    for (int64_t j0 = lo - lo % block_size; j0 <= p; j0 += block_size) {
        const int64_t o0 = lo > j0 ? lo - j0 : 0;
        const int64_t o1 = p - j0 + 1 < block_size ? p - j0 + 1 : block_size;
        const at *next =
            j0 + block_size <= p ? kv + blocks[j0 / block_size + 1] * block_size * row : NULL;
        block_heads(VALUES, qf, scores + (j0 + o0 - lo), acc,
                    kv + blocks[j0 / block_size] * block_size * row, next, block_size, row, o0,
                    o1, kv_heads, group, d, span);
    }
}

/* See the Python module docstring. q: [n, heads, d] with token stride qs and head stride
   qh; kc, vc: one layer's [blocks, block_size, kv_heads, d]; out: [n, heads, d]
   contiguous; query i's block table starts at table + i * table_stride (0: one table for
   every query, a prefill chunk's). One query per work item: a block's keys (and values)
   of every KV head lie together, so the item streams each block once, in address order.
   Returns 0, 1 when scratch cannot be allocated, 2 for shapes it does not take (heads
   not a multiple of kv_heads, a group over MAX_GROUP). */
int paged_attention(const at *q, int64_t qs, int64_t qh, const at *kc, const at *vc, at *out,
                    const int64_t *table, int64_t table_stride, const int64_t *pos, int64_t n,
                    int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, float scale,
                    int64_t window, int64_t num_threads) {
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP) return 2;
    const int64_t group = heads / kv_heads, row = kv_heads * d;
    int64_t longest = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t len = pos[i] + 1;
        if (window > 0 && len > window) len = window;
        if (len > longest) longest = len;
    }
    const int64_t span = (longest + 15) / 16 * 16; /* scores per head, padded to vectors */
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* Per thread: scores [heads, span], scaled q [heads, d], output sums [heads, d],
           each head's sum of weights. */
        float *scores = malloc(sizeof(float) * (size_t)(heads * (span + 2 * d + 1)));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *qf = scores, *acc = scores, *total = scores; /* set below, when allocated */
        if (scores != NULL) {
            qf = scores + heads * span;
            acc = qf + heads * d;
            total = acc + heads * d;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; i++) {
            if (scores == NULL) continue;
            const int64_t p = pos[i];
            const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const int64_t len = p + 1 - lo, padded = (len + 15) / 16 * 16;
            const int64_t *blocks = table + i * table_stride;
            for (int64_t hq = 0; hq < heads; hq++)
                for (int64_t k = 0; k < d; k++)
                    qf[hq * d + k] = loada(q + i * qs + hq * qh + k) * scale;
            /* Scores, block by block: each key is loaded once for its query heads. */
            over_blocks(0, kc, blocks, lo, p, block_size, row, qf, scores, NULL, kv_heads, group,
                        d, span);
            /* Each head's top score (NaN if any score is NaN), then the weights
               exp(s - top) and their sum; the padding lanes (-inf) come out 0. */
            for (int64_t hq = 0; hq < heads; hq++) {
                float *sh = scores + hq * span;
                for (int64_t jj = len; jj < padded; jj++) sh[jj] = -INFINITY;
                v16 m = (v16){0} - INFINITY;
                for (int64_t jj = 0; jj < padded; jj += 16) {
                    const v16 x = load16(sh + jj);
                    m = vselect((x > m) | (x != x), x, m);
                }
                float t = m[0];
                for (int lane = 1; lane < 16; lane++)
                    if (m[lane] > t || m[lane] != m[lane]) t = m[lane];
                v16 sum = {0};
                for (int64_t jj = 0; jj < padded; jj += 16) {
                    const v16 e = exp_nonpositive(load16(sh + jj) - t);
                    store16(sh + jj, e);
                    sum += e;
                }
                total[hq] = hsum(sum);
            }
            /* Weighted values, block by block. */
            memset(acc, 0, sizeof(float) * (size_t)(heads * d));
            over_blocks(1, vc, blocks, lo, p, block_size, row, NULL, scores, acc, kv_heads,
                        group, d, span);
            for (int64_t hq = 0; hq < heads; hq++) {
                at *o = out + (i * heads + hq) * d;
                const float inv = 1.0f / total[hq];
                for (int64_t k = 0; k < d; k++) storea(o + k, acc[hq * d + k] * inv);
            }
        }
        free(scores);
    }
    return failed;
}
"""
)

DTYPES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: (),
    torch.bfloat16: ("-DACT_BF16",),
}
"""The dtypes (of q, the cache and the output alike) the kernel is built for, with each
build's C defines."""
MAX_GROUP = 16
"""The C code's MAX_GROUP: query heads per KV head."""


@functools.cache
def load(dtype: torch.dtype = torch.float32) -> Callable[..., int] | None:
    """The kernel built for `dtype` (`DTYPES`); None where it cannot serve
    (`c_build.load_function`) or ``ADAPTERHUB_CPU_ATTENTION_KERNEL=0``."""
    if dtype not in DTYPES:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    return load_function(
        _SOURCE,
        "paged_attention",
        [p, i, i, p, p, p, p, i, p, i, i, i, i, i, ctypes.c_float, i, i],
        defines=DTYPES[dtype],
        switch="ADAPTERHUB_CPU_ATTENTION_KERNEL",
    )


def applies(q: torch.Tensor, k_cache: torch.Tensor, softcap: float | None) -> bool:
    """Whether `paged_attention` computes this layer's attention: a CPU cache of
    a built dtype, q of the same dtype with contiguous head vectors, no soft-capping, a
    query group it takes, and not while tracing (a traced step must stay torch ops)."""
    return (
        softcap is None
        and k_cache.is_cpu
        and q.dtype == k_cache.dtype
        and q.stride(-1) == 1
        and q.shape[1] % k_cache.shape[2] == 0
        and q.shape[1] // k_cache.shape[2] <= MAX_GROUP
        and not torch.compiler.is_compiling()
        and load(q.dtype) is not None
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Attention of the queries `q` over the cache, written into `out` (see the module
    docstring; call only where `applies`).

    Args:
        q: ``[n, heads, d]``, the last dim contiguous (rotary applied).
        k_cache, v_cache: one layer's ``[blocks, block_size, kv_heads, d]``, contiguous.
        block_table: ``[n, width]`` int64 (a table per query: decode), or ``[1, width]``
            (one table for all: a prefill chunk), contiguous, covering the positions.
        positions: ``[n]`` int64, contiguous: each query's position.
        out: ``[n, heads, d]``, contiguous, q's dtype.
    """
    n, heads, d = q.shape
    blocks, block_size, kv_heads, kd = k_cache.shape
    if (
        q.stride(2) != 1
        or kd != d
        or v_cache.shape != k_cache.shape
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
        or v_cache.dtype != q.dtype
        or out.shape != q.shape
        or out.dtype != q.dtype
        or not out.is_contiguous()
        or block_table.dtype != torch.long
        or positions.dtype != torch.long
        or block_table.dim() != 2
        or block_table.shape[0] not in (1, n)
        or not block_table.is_contiguous()
        or positions.shape != (n,)
        or not positions.is_contiguous()
    ):
        raise ValueError("paged attention: tensors do not match")
    if n == 0:
        return
    _check_table(block_table, positions, blocks, block_size)
    kernel = load(q.dtype)
    if kernel is None:
        raise RuntimeError(f"the CPU attention kernel for {q.dtype} is not available here")
    status = kernel(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        block_table.data_ptr(),
        block_table.shape[1] if block_table.shape[0] == n else 0,
        positions.data_ptr(),
        n,
        heads,
        kv_heads,
        d,
        block_size,
        scale,
        sliding_window or 0,
        torch.get_num_threads(),
    )
    if status == 1:
        raise MemoryError("the CPU attention kernel could not allocate its scratch buffer")
    if status:
        raise ValueError(f"the CPU attention kernel refused its arguments (status {status})")


# (block table, positions, cache shape) found inside the cache lately: every layer of a
# step passes the same tensors (the decode batch's, each prefill chunk's), so they are
# checked once per step, not once per layer.
_CHECKED: list[tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int, int]] = []
_CHECKED_KEPT = 16


def _check_table(
    block_table: torch.Tensor, positions: torch.Tensor, blocks: int, block_size: int
) -> None:
    """Refuse a table the kernel would read outside of the cache with: it trusts both."""
    for table_ref, positions_ref, *shape in _CHECKED:
        if (
            table_ref() is block_table
            and positions_ref() is positions
            and shape == [blocks, block_size]
        ):
            return
    if int(positions.min()) < 0 or int(positions.max()) >= block_table.shape[1] * block_size:
        raise ValueError("paged attention: a position lies past its block table")
    if int(block_table.min()) < 0 or int(block_table.max()) >= blocks:
        raise ValueError("paged attention: a block id lies outside the cache")
    _CHECKED.append((weakref.ref(block_table), weakref.ref(positions), blocks, block_size))
    del _CHECKED[:-_CHECKED_KEPT]
