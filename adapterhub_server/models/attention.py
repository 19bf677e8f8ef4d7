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
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_window_mask(self, window: int) -> torch.Tensor:
        """``[num_decode, 1, 1, decode_len]`` bool: keys within `window` of each decode
        token's position (built once per step and window, from device tensors only)."""
        mask = self._window_masks.get(window)
        if mask is None:
            keys = torch.arange(self.decode_len, device=self.decode_positions.device)
            mask = (keys[None, :] > self.decode_positions[:, None] - window)[:, None, None, :]
            self._window_masks[window] = mask
        return mask


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
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write this step's keys/values into the cache and attend.

    Args:
        q: ``[T, heads, head_dim]`` (rotary already applied).
        k: ``[T, kv_heads, head_dim]`` (rotary already applied).
        v: ``[T, kv_heads, head_dim]``.
        scale: multiplies q·k (default ``head_dim ** -0.5``).
        sliding_window: a query at position p sees only keys at positions
            ``p - sliding_window < j <= p`` (transformers' meaning); None sees all of them.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the softmax.
    Returns:
        ``[T, heads * head_dim]``.

    Semantics, for each token t of sequence s at position p:
        out[t] = softmax_j(cap(scale * q[t] · K_s[j]) masked to visible j) · V_s[j]
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
        mask = meta.decode_mask
        if sliding_window is not None:
            mask = mask & meta.decode_window_mask(sliding_window)
        # One query per sequence: folding the query heads that share a KV head into the
        # query-length axis gives grouped-query attention without repeating keys.
        qd = q[:n].view(n, kv_heads, group, head_dim)
        od = _attention(qd, keys, values, mask, scale=scale, softcap=softcap)
        out[:n] = od.reshape(n, num_heads, head_dim)

    for c in meta.prefills:
        end = c.start + (c.t1 - c.t0)
        k_cache[c.row, :, c.start : end] = k[c.t0 : c.t1].transpose(0, 1)
        v_cache[c.row, :, c.start : end] = v[c.t0 : c.t1].transpose(0, 1)
        first = 0
        if sliding_window is not None:
            # Keys before the chunk's first window are never visible: not even read.
            first = max(0, c.start - sliding_window + 1)
        keys = k_cache[c.row, :, first:end].repeat_interleave(group, dim=0)  # [heads, len, d]
        values = v_cache[c.row, :, first:end].repeat_interleave(group, dim=0)
        qp = q[c.t0 : c.t1].transpose(0, 1)  # [heads, chunk, d]
        if c.start == 0 and sliding_window is None and softcap is None:
            op = F.scaled_dot_product_attention(qp, keys, values, is_causal=True, scale=scale)
        else:
            qpos = torch.arange(c.start, end, device=q.device)[:, None]
            kpos = torch.arange(first, end, device=q.device)[None, :]
            mask = kpos <= qpos
            if sliding_window is not None:
                mask = mask & (kpos > qpos - sliding_window)
            op = _attention(qp, keys, values, mask, scale=scale, softcap=softcap)
        out[c.t0 : c.t1] = op.transpose(0, 1)
    return out.view(num_tokens, num_heads * head_dim)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """SDPA, or (with `softcap`, which SDPA lacks) the same computed step by step.

    Args:
        q: ``[..., Lq, d]``; k, v: ``[..., Lk, d]``; mask: bool, broadcastable to
            ``[..., Lq, Lk]``, True where a key is visible.
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
