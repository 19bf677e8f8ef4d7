"""Triton kernels for the batched LoRA shrink and expand (SGMV style, one rank class).

Tokens are grouped by adapter and cut into chunks of at most ``CHUNK_TOKENS``:
``token_indices[chunk_starts[c] : chunk_starts[c] + chunk_counts[c]]`` use the adapter in
slot ``chunk_slots[c]``. One program handles one chunk against a block of output columns,
so the adapter's weight tile is read once per chunk of tokens (up to 16 decoding sequences
on one adapter share one read; a prefill segment is many chunks). Tokens without an adapter
appear in no chunk and cost nothing; padding chunks (count 0) return at once, which is what
lets a captured CUDA graph serve any adapter mix. Products accumulate in float32 whatever
the input dtype.

Import this module only where Triton is installed; `lora/kernels.py` decides when to use it
and registers these launches as torch custom ops. Under ``TRITON_INTERPRET=1`` the kernels
run on CPU tensors (slowly), which is how the tests check them without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from adapterhub_server.lora.routing import CHUNK_TOKENS

# tl.dot needs every block dimension >= 16.
_BLOCK_M = CHUNK_TOKENS
_BLOCK_K = 64
_BLOCK_R = 16


@triton.jit
def _chunk_tokens(token_ptr, slot_ptr, start_ptr, chunk, count, BLOCK_M: tl.constexpr):
    """`chunk`'s adapter slot, token ids ``[BLOCK_M]`` and their mask."""
    start = tl.load(start_ptr + chunk)
    slot = tl.load(slot_ptr + chunk).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(token_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    return slot, tokens, mask_m


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    token_ptr,
    slot_ptr,
    start_ptr,
    count_ptr,
    K,
    N,
    stride_xt,
    stride_xk,
    stride_as,
    stride_an,
    stride_ak,
    stride_ht,
    stride_hn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    chunk = tl.program_id(0)
    pid_n = tl.program_id(1)
    count = tl.load(count_ptr + chunk)
    if count > 0:
        slot, tokens, mask_m = _chunk_tokens(token_ptr, slot_ptr, start_ptr, chunk, count, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xb = tl.load(
                x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            # A is [slots, N, K]; this tile is read as [BLOCK_K, BLOCK_N] (A transposed).
            ab = tl.load(
                a_ptr
                + slot * stride_as
                + offs_n[None, :] * stride_an
                + offs_k[:, None] * stride_ak,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(xb, ab, input_precision="ieee")
            else:
                acc += tl.dot(xb, ab)
        tl.store(
            h_ptr + tokens[:, None] * stride_ht + offs_n[None, :] * stride_hn,
            acc,
            mask=mask_m[:, None] & mask_n[None, :],
        )


@triton.jit
def _expand_kernel(
    h_ptr,
    b_table_ptr,
    y_ptr,
    token_ptr,
    slot_ptr,
    start_ptr,
    count_ptr,
    out_ptr,
    y_col_ptr,
    R,
    n_blocks,
    stride_ht,
    stride_hr,
    stride_yt,
    stride_yn,
    B_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    chunk = tl.program_id(0)
    # Axis 1 enumerates (module, column block): every module of the packed group in one
    # launch, each reading its own B through the pointer table.
    module = tl.program_id(1) // n_blocks
    pid_n = tl.program_id(1) % n_blocks
    count = tl.load(count_ptr + chunk)
    n = tl.load(out_ptr + module)
    if (count > 0) & (pid_n * BLOCK_N < n):
        slot, tokens, mask_m = _chunk_tokens(token_ptr, slot_ptr, start_ptr, chunk, count, BLOCK_M)
        b_ptr = tl.load(b_table_ptr + module).to(tl.pointer_type(B_DTYPE))
        y_col0 = tl.load(y_col_ptr + module)
        h_col0 = module * R
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            hb = tl.load(
                h_ptr + tokens[:, None] * stride_ht + (h_col0 + offs_r[None, :]) * stride_hr,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            # B_j is contiguous [slots, R, n]: its strides follow from n.
            bb = tl.load(
                b_ptr + slot * R * n + offs_r[:, None] * n + offs_n[None, :],
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            # The float32 rank-space activations meet B in B's dtype (bf16 on a GPU), as
            # the tensor cores want; the sum stays in float32.
            if IEEE:
                acc += tl.dot(hb.to(B_DTYPE), bb, input_precision="ieee")
            else:
                acc += tl.dot(hb.to(B_DTYPE), bb)
        y_ptrs = y_ptr + tokens[:, None] * stride_yt + (y_col0 + offs_n[None, :]) * stride_yn
        y_mask = mask_m[:, None] & mask_n[None, :]
        old = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (old.to(tl.float32) + acc).to(old.dtype), mask=y_mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TABLES: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
"""Device-side (B pointers, out sizes, y columns) per pool layout. The key holds the
pointers themselves, so a hit is always right; pools only change when they grow."""


def _tables(bs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = [b.shape[2] for b in bs]
    key = (bs[0].device, *(b.data_ptr() for b in bs), *outs)
    tables = _TABLES.get(key)
    if tables is None:
        columns = [sum(outs[:j]) for j in range(len(outs))]
        device = bs[0].device
        tables = (
            torch.tensor([b.data_ptr() for b in bs], dtype=torch.int64, device=device),
            torch.tensor(outs, dtype=torch.int32, device=device),
            torch.tensor(columns, dtype=torch.int32, device=device),
        )
        _TABLES[key] = tables
        if len(_TABLES) > 1024:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


def _block_n(n: int) -> int:
    return max(16, min(64, triton.next_power_of_2(n)))


def shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    token_indices: torch.Tensor,
    chunk_slots: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_counts: torch.Tensor,
) -> torch.Tensor:
    """``h[t] = A[slot(t)] @ x[t]`` for every grouped token; other rows of h are zero.

    Args:
        x: ``[T, K]`` activations.
        a: ``[slots, N, K]`` the rank class's A pool (``N = m * c``).
        token_indices: ``[n]`` int32 token ids, grouped by adapter.
        chunk_slots, chunk_starts, chunk_counts: ``[C]`` int32 per chunk: its slot, first
            index into `token_indices`, and number of tokens (0 for a padding chunk).
    Returns:
        ``[T, N]`` float32.
    """
    num_tokens, k = x.shape
    n = a.shape[1]
    h = torch.zeros((num_tokens, n), dtype=torch.float32, device=x.device)
    chunks = chunk_slots.shape[0]
    if chunks == 0:
        return h
    block_n = _block_n(n)
    grid = (chunks, triton.cdiv(n, block_n))
    _shrink_kernel[grid](
        x, a, h, token_indices, chunk_slots, chunk_starts, chunk_counts,
        k, n,
        x.stride(0), x.stride(1),
        a.stride(0), a.stride(1), a.stride(2),
        h.stride(0), h.stride(1),
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_BLOCK_K,
        IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    return h


def expand(
    y: torch.Tensor,
    h: torch.Tensor,
    bs: Sequence[torch.Tensor],
    token_indices: torch.Tensor,
    chunk_slots: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_counts: torch.Tensor,
) -> None:
    """``y[t, o_j : o_j + N_j] += h[t, j*R : (j+1)*R] @ B_j[slot(t)]`` for every module j
    of the packed group, in place, in one launch (``o_j`` = the sum of the earlier N).

    Args:
        y: ``[T, sum(N_j)]`` output of the base layer (modified).
        h: ``[T, m * R]`` float32 from `shrink`.
        bs: per module, its contiguous B pool ``[slots, R, N_j]`` (transposed, scale folded
            in), all of one dtype.
        token_indices, chunk_slots, chunk_starts, chunk_counts: as for `shrink`.
    """
    chunks = chunk_slots.shape[0]
    if chunks == 0:
        return
    if any(not b.is_contiguous() for b in bs) or len({b.dtype for b in bs}) != 1:
        raise ValueError("B pools must be contiguous and of one dtype")
    r = bs[0].shape[1]
    block_n = _block_n(max(b.shape[2] for b in bs))
    n_blocks = triton.cdiv(max(b.shape[2] for b in bs), block_n)
    b_table, out_sizes, y_columns = _tables(bs)
    grid = (chunks, len(bs) * n_blocks)
    _expand_kernel[grid](
        h, b_table, y, token_indices, chunk_slots, chunk_starts, chunk_counts, out_sizes,
        y_columns,
        r, n_blocks,
        h.stride(0), h.stride(1),
        y.stride(0), y.stride(1),
        B_DTYPE=_TL_DTYPES[bs[0].dtype],
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_R=_BLOCK_R,
        IEEE=bs[0].dtype == torch.float32,
    )  # fmt: skip
