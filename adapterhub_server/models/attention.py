"""Static per-sequence KV cache and the attention of a flattened mixed batch.

Each running sequence owns one *row* of a preallocated cache
``[layers, rows, kv_heads, max_len, head_dim]`` and writes its keys and values in place at
its positions: nothing is re-padded or re-copied as the batch changes. A step's tokens are
flattened as ``[decode tokens (one per sequence)..., prefill chunk tokens...]``.

Decode attention runs once for all decoding sequences: when their rows are ``0..n-1`` (the
engine keeps rows compact) the cache is used through a view, otherwise rows are gathered.
Prefill chunks attend per chunk to their cached prefix plus themselves (causal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapterhub_server.models.transfer import to_device


@dataclass
class PrefillChunk:
    """Tokens ``[t0, t1)`` of the flat batch are positions ``[start, start + t1 - t0)`` of the
    sequence that owns cache row `row`."""

    t0: int
    t1: int
    row: int
    start: int


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat batch, built once and read by every layer."""

    num_decode: int
    decode_rows: torch.Tensor
    """``[num_decode]`` int64 cache row of each decode token."""
    decode_positions: torch.Tensor
    """``[num_decode]`` int64 position each decode token is written at."""
    decode_rows_are_prefix: bool
    """True when decode_rows == arange(num_decode): the cache is read through a view."""
    decode_len: int
    """Keys attended by the decode part: max(decode_positions) + 1."""
    decode_mask: torch.Tensor | None
    """``[num_decode, 1, 1, decode_len]`` bool, True where a key is visible."""
    prefills: list[PrefillChunk] = field(default_factory=list)


def build_attention_metadata(
    decode_rows: list[int],
    decode_positions: list[int],
    prefills: list[PrefillChunk],
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    n = len(decode_rows)
    pos = torch.tensor(decode_positions, dtype=torch.long)
    decode_len = max(decode_positions) + 1 if n else 0
    mask = None
    if n:
        mask = (torch.arange(decode_len)[None, :] <= pos[:, None])[:, None, None, :]
        mask = to_device(mask, torch.bool, device)
    return AttentionMetadata(
        num_decode=n,
        decode_rows=to_device(decode_rows, torch.long, device),
        decode_positions=to_device(pos, torch.long, device),
        decode_rows_are_prefix=decode_rows == list(range(n)),
        decode_len=decode_len,
        decode_mask=mask,
        prefills=prefills,
    )


def decode_only_metadata(positions: torch.Tensor, key_len: int) -> AttentionMetadata:
    """Layout of a decode-only step over cache rows ``0..B-1``, built on the device from
    `positions` alone: the only host values are B and `key_len`, so a captured CUDA graph
    of the step serves any positions below `key_len`.

    Args:
        positions: ``[B]`` int64, where each sequence's token is written; padding rows
            (beyond the live sequences) write position 0 of a free cache row, which the
            prefill of whichever sequence gets that row later overwrites.
        key_len: keys attended per row (a bucket >= every live position + 1).
    """
    b = positions.shape[0]
    keys = torch.arange(key_len, device=positions.device)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
    return AttentionMetadata(
        num_decode=b,
        decode_rows=torch.arange(b, device=positions.device),
        decode_positions=positions,
        decode_rows_are_prefix=True,
        decode_len=key_len,
        decode_mask=mask,
    )


class KVCache:
    """Preallocated keys and values: ``[layers, rows, kv_heads, max_len, head_dim]`` each."""

    def __init__(
        self,
        *,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, rows, num_kv_heads, max_len, head_dim)
        # Zeros, not empty: masked keys still multiply their values, and 0 * NaN garbage
        # would poison the output.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = rows
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Relocate a sequence's first `length` positions (keeps decode rows compact)."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write this step's keys/values into the cache and attend.

    Args:
        q: ``[T, heads, head_dim]`` (rotary already applied).
        k: ``[T, kv_heads, head_dim]`` (rotary already applied).
        v: ``[T, kv_heads, head_dim]``.
    Returns:
        ``[T, heads * head_dim]``.
    """
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    k_cache = cache.k[layer]
    v_cache = cache.v[layer]
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)

    n = meta.num_decode
    if n:
        k_cache[meta.decode_rows, :, meta.decode_positions] = k[:n]
        v_cache[meta.decode_rows, :, meta.decode_positions] = v[:n]
        length = meta.decode_len
        if meta.decode_rows_are_prefix:
            keys = k_cache[:n, :, :length]
            values = v_cache[:n, :, :length]
        else:
            keys = k_cache[meta.decode_rows, :, :length]
            values = v_cache[meta.decode_rows, :, :length]
        # One query per sequence: folding the query heads that share a KV head into the
        # query-length axis gives grouped-query attention without repeating keys.
        qd = q[:n].view(n, kv_heads, group, head_dim)
        od = F.scaled_dot_product_attention(qd, keys, values, attn_mask=meta.decode_mask)
        out[:n] = od.reshape(n, num_heads, head_dim)

    for c in meta.prefills:
        end = c.start + (c.t1 - c.t0)
        k_cache[c.row, :, c.start : end] = k[c.t0 : c.t1].transpose(0, 1)
        v_cache[c.row, :, c.start : end] = v[c.t0 : c.t1].transpose(0, 1)
        keys = k_cache[c.row, :, :end].repeat_interleave(group, dim=0)  # [heads, end, d]
        values = v_cache[c.row, :, :end].repeat_interleave(group, dim=0)
        qp = q[c.t0 : c.t1].transpose(0, 1)  # [heads, len, d]
        if c.start == 0:
            op = F.scaled_dot_product_attention(qp, keys, values, is_causal=True)
        else:
            qpos = torch.arange(c.start, end, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= qpos[:, None]
            op = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask)
        out[c.t0 : c.t1] = op.transpose(0, 1)
    return out.view(num_tokens, num_heads * head_dim)
