"""The fused CPU LoRA kernel (C, compiled at first use), and the per-step grouping it reads.

A decode step on CPU spends its LoRA time reading adapter weights (each slot's A and B once
per layer) and, through torch ops, dispatching ~10 small ops per adapted layer (gather,
shrink ``bmm``, one expand ``bmm`` per module, ``cat``, scatter). This kernel does the
shrink and the expand of every module of a packed group in one call: each adapter's A and
B are streamed once, tokens are read and written in place (no gather, no scatter, no
intermediate tensors), and the work is split over torch's own OpenMP threads: whole slots
per thread when the slots carry equal token counts (decode), else rows of A and then
columns of y handed out round-robin (short prefill chunks come here too, beside the decode
tokens, so one slot may carry dozens of tokens and the others one each). The shrink
reads four rows of A at once against up to four tokens (every loaded vector of x serves
four rows); the expand holds 64 output columns of up to four tokens in registers while it
goes down B's rows, so y is read and written once per call (summed into row by row of B,
it took two stores per loaded vector of B, and the stores bound the loop). Decode-shaped
calls are bound by reading the adapter weights from memory (in the engine the base
weights evict them from cache every step), so both loops prefetch the rows they read
next, and the weights may be kept in bfloat16 (`WEIGHT_DTYPES`, the engine's
``lora_dtype``), which halves the bytes: ``bench/lora_ops.py --decode-step`` measures it
against the torch ops.

The kernel is C rather than torch because a decode step's LoRA work is ~120 calls of a few
microseconds of arithmetic each: dispatch, not FLOPs, was the cost (`bench/profile_step.py`).
It is built the way Triton builds its launchers, with the system compiler at first use.

Semantics, for every group g (one adapter slot s = ``slots[g]``, its tokens
``tokens[starts[g] : starts[g + 1]]``), every token t of it and every module j::

    y[t, o_j : o_j + out_j] += (A[s, j*c : (j+1)*c] @ x[t]) @ B_j[s]

with ``A [slots, m * c, in]``, ``B_j [slots, c, out_j]`` (the pool layout of `lora.ops`)
and ``o_j = out_0 + ... + out_{j-1}``: x and y float32 or bfloat16, A and B float32 or
bfloat16 (one build per pair), every product and sum in float32, and bfloat16 y rounded
once per element, after its sum; ``c`` a multiple of 4 (rank classes are powers of two
from 8).

Built at first use by `c_build`. Where it cannot be built or loaded (no compiler, not
Linux, a torch without OpenMP) `load` returns None and the torch ops serve;
``ADAPTERHUB_CPU_LORA_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from adapterhub_server.c_build import VECTOR_HELPERS, load_function
from adapterhub_server.lora.routing import Route, group_routes

_SOURCE = (
    VECTOR_HELPERS
    + r"""
/* The adapter weights' storage type `wt`: float32, or bfloat16 (-DWEIGHTS_BF16) widened
   to float32 as it is loaded, so that only the weights are rounded. */
#ifdef WEIGHTS_BF16
typedef uint16_t wt;
static inline v16 loadw16(const wt *p) { return bf16_load16(p); }
static inline float loadw(const wt *p) { return bf16_load(p); }
#else
typedef float wt;
static inline v16 loadw16(const wt *p) { return load16(p); }
static inline float loadw(const wt *p) { return *p; }
#endif

/* The activations' type `at` (x read, y updated in place): float32, or bfloat16
   (-DACT_BF16), widened as loaded; y is then rounded once, to nearest even, after all of
   a token's products are summed in float32 (`expand_tokens`). */
#ifdef ACT_BF16
typedef uint16_t at;
static inline v16 loadx16(const at *p) { return bf16_load16(p); }
static inline float loadx(const at *p) { return bf16_load(p); }
static inline void storex16(at *p, v16 v) { bf16_store16(p, v); }
static inline void storex(at *p, float f) { bf16_store(p, f); }
#else
typedef float at;
static inline v16 loadx16(const at *p) { return load16(p); }
static inline float loadx(const at *p) { return *p; }
static inline void storex16(at *p, v16 v) { store16(p, v); }
static inline void storex(at *p, float f) { *p = f; }
#endif

/* h[l * hs + r] = dot(a[r * in :], x[tok[l]]) for RB = 4 rows of A and NT <= 4 tokens: four
   rows stream at once (memory-level parallelism) and every loaded x vector serves four
   rows; RB * NT independent accumulators, so the adds do not wait on each other. */
static inline __attribute__((always_inline)) void dot_block(
    const wt *restrict a, int64_t in, const at *restrict x, int64_t xs,
    const int64_t *tok, const int NT, float *restrict h, int64_t hs) {
    const at *xp[4];
    v16 acc[4][4];
    for (int l = 0; l < NT; l++) xp[l] = x + tok[l] * xs;
    for (int r = 0; r < 4; r++)
        for (int l = 0; l < NT; l++) acc[r][l] = (v16){0};
    int64_t k = 0;
    for (; k + 16 <= in; k += 16) {
        v16 xv[4];
        for (int l = 0; l < NT; l++) xv[l] = loadx16(xp[l] + k);
        /* The next block of 4 rows, ahead of use: weights come from memory (a step's
           base weights evict them from cache), and one slot's rows are streams too short
           for the hardware prefetcher to get ahead of. Past a slot's last rows this reads
           into the next slot, which the thread usually takes next, or past the pool, which
           a prefetch may do: it never faults. */
        for (int r = 0; r < 4; r++) __builtin_prefetch(a + (4 + r) * in + k, 0, 3);
        for (int r = 0; r < 4; r++) {
            const v16 av = loadw16(a + r * in + k);
            for (int l = 0; l < NT; l++) acc[r][l] += av * xv[l];
        }
    }
    for (int r = 0; r < 4; r++)
        for (int l = 0; l < NT; l++) {
            float s = hsum(acc[r][l]);
            for (int64_t kk = k; kk < in; kk++) s += loadw(a + r * in + kk) * loadx(xp[l] + kk);
            h[l * hs + r] = s;
        }
}

/* Rows [r0, r1) of one slot's A (r1 - r0 a multiple of 4) against its nt tokens. */
static void shrink_rows(const wt *a, int64_t in, int64_t r0, int64_t r1, const at *x,
                        int64_t xs, const int64_t *tok, int64_t nt, float *h, int64_t hs) {
    for (int64_t r = r0; r < r1; r += 4) {
        const wt *ar = a + r * in;
        int64_t l = 0;
        for (; l + 4 <= nt; l += 4) dot_block(ar, in, x, xs, tok + l, 4, h + l * hs + r, hs);
        switch (nt - l) {
        case 3: dot_block(ar, in, x, xs, tok + l, 3, h + l * hs + r, hs); break;
        case 2: dot_block(ar, in, x, xs, tok + l, 2, h + l * hs + r, hs); break;
        case 1: dot_block(ar, in, x, xs, tok + l, 1, h + l * hs + r, hs); break;
        }
    }
}

/* y[tok[l], lo : hi] += sum_r h[l * hs + r] * b[r * bs + lo : hi] for NT <= 4 tokens:
   the output columns go 64 at a time (NT x 4 accumulators in registers) down all c rows
   of B, so y is read and written once per column, and each token's sum is rounded once
   (to bfloat16 for bfloat16 y, after its float32 sum, as the module docstring says). */
static inline __attribute__((always_inline)) void expand_tokens(
    const wt *restrict b, int64_t bs, int64_t c, const float *restrict h, int64_t hs,
    at *restrict y, int64_t ys, const int64_t *tok, const int NT, int64_t lo, int64_t hi) {
    at *yr[4];
    for (int l = 0; l < NT; l++) yr[l] = y + tok[l] * ys;
    int64_t o = lo;
    for (; o + 64 <= hi; o += 64) {
        v16 acc[4][4];
        for (int l = 0; l < NT; l++)
            for (int i = 0; i < 4; i++) acc[l][i] = (v16){0};
        for (int64_t r = 0; r < c; r++) {
            const wt *br = b + r * bs + o;
            /* This row's columns two blocks on: the c rows are c streams, each too short
               (a module's out columns) for the hardware prefetcher to get ahead of. */
            for (size_t p = 0; p < 64 * sizeof(wt); p += 64)
                __builtin_prefetch((const char *)(br + 128) + p, 0, 3);
            v16 bv[4];
            for (int i = 0; i < 4; i++) bv[i] = loadw16(br + 16 * i);
            for (int l = 0; l < NT; l++) {
                const float hv = h[l * hs + r];
                for (int i = 0; i < 4; i++) acc[l][i] += hv * bv[i];
            }
        }
        for (int l = 0; l < NT; l++)
            for (int i = 0; i < 4; i++)
                storex16(yr[l] + o + 16 * i, loadx16(yr[l] + o + 16 * i) + acc[l][i]);
    }
    for (; o + 16 <= hi; o += 16) {
        v16 acc[4];
        for (int l = 0; l < NT; l++) acc[l] = (v16){0};
        for (int64_t r = 0; r < c; r++) {
            const v16 bv = loadw16(b + r * bs + o);
            for (int l = 0; l < NT; l++) acc[l] += h[l * hs + r] * bv;
        }
        for (int l = 0; l < NT; l++) storex16(yr[l] + o, loadx16(yr[l] + o) + acc[l]);
    }
    for (; o < hi; o++)
        for (int l = 0; l < NT; l++) {
            float s = 0;
            for (int64_t r = 0; r < c; r++) s += h[l * hs + r] * loadw(b + r * bs + o);
            storex(yr[l] + o, loadx(yr[l] + o) + s);
        }
}

/* Output columns [lo, hi) of one module of one slot, for its nt tokens. */
static void expand_cols(const wt *b, int64_t bs, int64_t c, const float *h, int64_t hs,
                        at *y, int64_t ys, const int64_t *tok, int64_t nt, int64_t lo,
                        int64_t hi) {
    for (int64_t l = 0; l < nt; l += 4) {
        switch (nt - l < 4 ? nt - l : 4) {
        case 4: expand_tokens(b, bs, c, h + l * hs, hs, y, ys, tok + l, 4, lo, hi); break;
        case 3: expand_tokens(b, bs, c, h + l * hs, hs, y, ys, tok + l, 3, lo, hi); break;
        case 2: expand_tokens(b, bs, c, h + l * hs, hs, y, ys, tok + l, 2, lo, hi); break;
        case 1: expand_tokens(b, bs, c, h + l * hs, hs, y, ys, tok + l, 1, lo, hi); break;
        }
    }
}

#define MAX_MODULES 8

/* See the Python module docstring. Returns 0, or 1 when the scratch allocation fails,
   2 when there are more than MAX_MODULES modules or c is not a multiple of 4. */
int lora_sgmv(const at *x, int64_t x_stride, at *y, int64_t y_stride,
              const wt *a, int64_t in, int64_t c, int64_t m,
              const wt *const *bs, const int64_t *outs, const int64_t *tokens,
              const int64_t *slots, const int64_t *starts, int64_t groups,
              int64_t num_threads) {
    if (m > MAX_MODULES || c % 4 != 0) return 2;
    const int64_t rows = m * c, n = starts[groups];
    if (n == 0) return 0;
    float *h = malloc(sizeof(float) * (size_t)(n * rows)); /* [n, rows], in token order */
    if (h == NULL) return 1;
    int64_t col0[MAX_MODULES];
    for (int64_t j = 0, o = 0; j < m; j++) {
        col0[j] = o;
        o += outs[j];
    }
    int uniform = 1; /* every slot has as many tokens (decode: one per sequence) */
    for (int64_t g = 1; g < groups; g++)
        if (starts[g + 1] - starts[g] != starts[1] - starts[0]) uniform = 0;
    if (num_threads <= 1 || (uniform && groups % num_threads == 0)) {
        /* Whole slots per thread: A then B of one slot stream back to back, with no
           barrier in between. Balanced because the slots cost the same. */
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t t0 = starts[g], nt = starts[g + 1] - t0;
            shrink_rows(a + slots[g] * rows * in, in, 0, rows, x, x_stride, tokens + t0, nt,
                        h + t0 * rows, rows);
            for (int64_t j = 0; j < m; j++)
                expand_cols(bs[j] + slots[g] * c * outs[j], outs[j], c, h + t0 * rows + j * c,
                            rows, y + col0[j], y_stride, tokens + t0, nt, 0, outs[j]);
        }
    } else {
        /* Too few slots to share out evenly, or slots of different token counts (short
           prefill chunks beside decode tokens): split the rows of A (blocks of 4), then
           (after the barrier) the output columns. Equal slots go out in contiguous runs
           of work items; unequal ones round-robin, so that every thread gets about half
           of every slot's work whatever its tokens cost. */
        const int64_t row_blocks = rows / 4, shrink_items = groups * row_blocks;
        int64_t blocks[MAX_MODULES], width[MAX_MODULES], per_group = 0;
        /* Column blocks per module: about 4 per thread over all equal slots; unequal
           slots split each module into 2 per thread, so that a busy slot is shared too. */
        const int64_t want =
            uniform ? (4 * num_threads + groups * m - 1) / (groups * m) : 2 * num_threads;
        for (int64_t j = 0; j < m; j++) {
            int64_t w = (outs[j] + want - 1) / want;
            w = (w + 63) / 64 * 64;
            width[j] = w;
            blocks[j] = (outs[j] + w - 1) / w;
            per_group += blocks[j];
        }
        const int64_t expand_items = groups * per_group;
        const int64_t shrink_chunk = uniform ? (shrink_items + num_threads - 1) / num_threads : 1;
        const int64_t expand_chunk = uniform ? (expand_items + num_threads - 1) / num_threads : 1;
#pragma omp parallel num_threads(num_threads)
        {
#pragma omp for schedule(static, shrink_chunk)
            for (int64_t item = 0; item < shrink_items; item++) {
                const int64_t g = item / row_blocks, r = (item % row_blocks) * 4;
                const int64_t t0 = starts[g];
                shrink_rows(a + slots[g] * rows * in, in, r, r + 4, x, x_stride, tokens + t0,
                            starts[g + 1] - t0, h + t0 * rows, rows);
            }
#pragma omp for schedule(static, expand_chunk)
            for (int64_t item = 0; item < expand_items; item++) {
                const int64_t g = item / per_group, t0 = starts[g];
                int64_t blk = item % per_group, j = 0;
                while (blk >= blocks[j]) blk -= blocks[j++];
                const int64_t lo = blk * width[j];
                const int64_t hi = lo + width[j] < outs[j] ? lo + width[j] : outs[j];
                expand_cols(bs[j] + slots[g] * c * outs[j], outs[j], c, h + t0 * rows + j * c,
                            rows, y + col0[j], y_stride, tokens + t0, starts[g + 1] - t0, lo,
                            hi);
            }
        }
    }
    free(h);
    return 0;
}
"""
)

_MAX_MODULES = 8
"""The C code's MAX_MODULES."""
WEIGHT_DTYPES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: (),
    torch.bfloat16: ("-DWEIGHTS_BF16",),
}
"""The adapter weight dtypes the kernel is built for, with each build's C defines."""
ACTIVATION_DTYPES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: (),
    torch.bfloat16: ("-DACT_BF16",),
}
"""The activation (x, y) dtypes the kernel is built for, with each build's C defines; one
build per (activations, weights) pair."""


@dataclass(frozen=True)
class CpuMapping:
    """One step's dense tokens of one rank class, grouped by adapter slot (host tensors)."""

    rank_class: int
    tokens: torch.Tensor
    """``[n]`` int64 token positions, grouped by slot, ascending within a slot."""
    slots: torch.Tensor
    """``[G]`` int64 slot of each group, ascending."""
    starts: torch.Tensor
    """``[G + 1]`` int64: group g's tokens are ``tokens[starts[g] : starts[g + 1]]``."""
    num_rows: int
    """Rows `x` and `y` must have at least: the highest token position + 1."""
    max_slot: int
    num_threads: int
    """torch's intra-op thread count when the step was built; the kernel uses as many."""

    call_args: tuple[int, int, int, int, int]
    """The kernel's routing arguments: tokens, slots and starts pointers, groups, threads
    (into `tokens`, `slots` and `starts`, which this mapping keeps alive)."""


def build_cpu_mappings(routes: Sequence[Route | None]) -> list[CpuMapping]:
    """Group a step's dense tokens by (rank class, slot), once per step for every layer.

    Args:
        routes: per dense token, ``(rank_class, slot)`` or None (base model: no work).
    """
    threads = torch.get_num_threads()
    mappings = []
    for cls, by_slot in group_routes(routes).items():
        slots = list(by_slot)
        tokens: list[int] = []
        starts = [0]
        for s in slots:
            tokens += by_slot[s]
            starts.append(len(tokens))
        # One host tensor, three views: a step builds this once for ~100 kernel calls.
        packed = torch.tensor(tokens + slots + starts, dtype=torch.int64)
        n, g = len(tokens), len(slots)
        tokens_t, slots_t, starts_t = packed[:n], packed[n : n + g], packed[n + g :]
        mappings.append(
            CpuMapping(
                rank_class=cls,
                tokens=tokens_t,
                slots=slots_t,
                starts=starts_t,
                num_rows=max(tokens) + 1,
                max_slot=slots[-1],
                num_threads=threads,
                call_args=(
                    tokens_t.data_ptr(),
                    slots_t.data_ptr(),
                    starts_t.data_ptr(),
                    g,
                    threads,
                ),
            )
        )
    return mappings


def add_lora_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    pools: Mapping[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
    mappings: Sequence[CpuMapping],
) -> None:
    """`add_lora` for the dense tokens of a step, through the C kernel.

    Args:
        y: ``[T, sum(out_j)]`` float32 or bfloat16 (`ACTIVATION_DTYPES`), rows contiguous
            (modified in place; bfloat16 rounded once per element, after the sum).
        x: ``[T, in]``, y's dtype, rows contiguous.
        pools: rank class ``c`` -> ``(A [slots, m * c, in], (B_j [slots, c, out_j], ...))``,
            contiguous, float32 or bfloat16 (`WEIGHT_DTYPES`; A and B alike).
        mappings: this step's `build_cpu_mappings`.
    """
    # The kernel trusts its pointers: the checks that keep it inside its tensors are here
    # (the pools' once per pool, in `_pool_args`; a decode step makes ~120 of these calls).
    if x.dtype != y.dtype or x.dtype not in ACTIVATION_DTYPES or not (x.is_cpu and y.is_cpu):
        raise TypeError(
            "the CPU LoRA kernel takes float32 or bfloat16 CPU tensors of one dtype, got "
            f"x {x.dtype} on {x.device}, y {y.dtype} on {y.device}"
        )
    xs, ys = x.stride(), y.stride()
    if len(xs) != 2 or len(ys) != 2 or xs[1] != 1 or ys[1] != 1:
        raise ValueError("x and y must be 2-D with contiguous rows")
    rows = min(x.shape[0], y.shape[0])
    x_args = (x.data_ptr(), xs[0], y.data_ptr(), ys[0])
    for mp in mappings:
        pool = _pool_args(mp.rank_class, *pools[mp.rank_class], x.dtype)
        if (
            rows < mp.num_rows
            or mp.max_slot >= pool.slots
            or x.shape[1] != pool.in_features
            or y.shape[1] != pool.out_features
        ):
            raise ValueError(
                f"rank class {mp.rank_class}: pool tensors do not match x, y or the routes"
            )
        status = pool.kernel(*x_args, *pool.args, *mp.call_args)
        if status == 1:
            raise MemoryError("the CPU LoRA kernel could not allocate its scratch buffer")
        if status:
            raise ValueError(f"the CPU LoRA kernel refused its arguments (status {status})")


@dataclass(frozen=True)
class _PoolArgs:
    """One packed pool's kernel arguments, checked once: its tensors live for the
    engine's life (reallocated only when a rank class grows, which makes a new A)."""

    bs: tuple[torch.Tensor, ...]
    kernel: Callable[..., int]
    """The build for the pool's weight dtype and `activations`."""
    activations: torch.dtype
    slots: int
    in_features: int
    out_features: int
    args: tuple[object, ...]
    """``a, in, c, m, B pointers, outs``, as the kernel takes them."""


# By id(A), with a weak reference that drops the entry when A is freed (a tensor's == is
# elementwise, so tensors cannot be dictionary keys; torch's WeakIdKeyDictionary cost
# ~9 us per lookup, 1 ms per decode step).
_POOL_ARGS: dict[int, tuple[weakref.ref[torch.Tensor], _PoolArgs]] = {}


def _pool_args(
    c: int, a: torch.Tensor, bs: tuple[torch.Tensor, ...], activations: torch.dtype
) -> _PoolArgs:
    hit = _POOL_ARGS.get(id(a))
    if hit is not None and hit[0]() is a and hit[1].bs is bs and hit[1].activations is activations:
        return hit[1]
    m = len(bs)
    outs = [b.shape[2] if b.dim() == 3 else -1 for b in bs]
    slots = a.shape[0] if a.dim() == 3 else 0
    if (
        m > _MAX_MODULES
        or not _fits(a, a.dtype, slots, m * c, a.shape[-1])
        or not all(_fits(b, a.dtype, slots, c, out) for b, out in zip(bs, outs))
    ):
        raise ValueError(f"rank class {c}: pool tensors do not match x, y or the routes")
    kernel = load(a.dtype, activations)
    if kernel is None:
        raise RuntimeError(
            f"the CPU LoRA kernel for {a.dtype} weights and {activations} activations is not "
            "available here"
        )
    args = (
        a.data_ptr(),
        a.shape[2],
        c,
        m,
        (ctypes.c_void_p * m)(*[b.data_ptr() for b in bs]),
        (ctypes.c_int64 * m)(*outs),
    )
    cached = _PoolArgs(bs, kernel, activations, slots, a.shape[2], sum(outs), args)
    key = id(a)
    _POOL_ARGS[key] = (weakref.ref(a, lambda _, key=key: _POOL_ARGS.pop(key, None)), cached)
    return cached


def _fits(t: torch.Tensor, dtype: torch.dtype, slots: int, rows: int, cols: int) -> bool:
    """Whether a pool tensor is a contiguous CPU ``[slots, rows, cols]`` of `dtype`, a
    dtype the kernel is built for."""
    return (
        t.is_cpu
        and t.dtype == dtype
        and dtype in WEIGHT_DTYPES
        and t.is_contiguous()
        and t.dim() == 3
        and t.shape[0] == slots
        and t.shape[1] == rows
        and t.shape[2] == cols
    )


@functools.cache
def load(
    weights: torch.dtype = torch.float32, activations: torch.dtype = torch.float32
) -> Callable[..., int] | None:
    """The kernel compiled for adapter weights of dtype `weights` (`WEIGHT_DTYPES`) and
    activations of dtype `activations` (`ACTIVATION_DTYPES`), building it on first use;
    None where it cannot serve (`c_build.load_function`) or
    ``ADAPTERHUB_CPU_LORA_KERNEL=0``."""
    if weights not in WEIGHT_DTYPES or activations not in ACTIVATION_DTYPES:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    return load_function(
        _SOURCE,
        "lora_sgmv",
        [p, i, p, i, p, i, i, i, p, p, p, p, p, i, i],
        defines=WEIGHT_DTYPES[weights] + ACTIVATION_DTYPES[activations],
        switch="ADAPTERHUB_CPU_LORA_KERNEL",
    )
