"""Paged KV cache and the attention of a flattened mixed batch.

Keys and values live in fixed-size blocks: ``[layers, num_blocks, block_size, kv_heads,
head_dim]`` each. A sequence's *block table* lists its blocks in position order (block i
holds positions ``[i * block_size, (i + 1) * block_size)``); who owns which block is the
engine's business (`engine.kv_cache_manager`), this module only reads and writes them.

A step's tokens are flattened as ``[decode tokens (one per sequence)..., prefill chunk
tokens...]``. Every token's key and value are written in one indexed copy per layer, at its
*slot* (``block * block_size + offset``). Decode attention runs once for all decoding
sequences: on CPU through the C kernel of `cpu_attention`, which reads their blocks in
place, else over their blocks gathered into one batch (`decode_attention_torch`). Prefill
chunks attend per chunk to their cached prefix plus themselves (causal): on CPU through the
same kernel, a query per token over the chunk's table, else gathered and through SDPA.
Block 0 is the null block: table padding and positions a sequence no longer keeps point
there, always masked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapterhub_server.models import cpu_attention
from adapterhub_server.models.transfer import to_device


@dataclass
class PrefillChunk:
    """Tokens ``[t0, t1)`` of the flat batch are positions ``[start, start + t1 - t0)`` of a
    sequence whose blocks (covering at least positions ``[0, start + t1 - t0)``) are
    `blocks`."""

    t0: int
    t1: int
    start: int
    blocks: torch.Tensor
    """``[num_blocks]`` int64 block table of the sequence."""

    # Built at first use, by the CPU attention kernel only (no copy to a device for steps
    # that never read them), then kept: every layer of the step passes the same tensors.
    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """``[t1 - t0]`` int64: the chunk's positions, ``start, start + 1, ...``."""
        return torch.arange(self.start, self.start + self.t1 - self.t0, device=self.blocks.device)

    @functools.cached_property
    def table(self) -> torch.Tensor:
        """`blocks` as one table row, ``[1, num_blocks]``, shared by the chunk's queries."""
        return self.blocks.view(1, -1)


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat batch, built once and read by every layer."""

    slot_mapping: torch.Tensor
    """``[T]`` int64 cache slot each token's key and value are written to."""
    num_decode: int
    decode_positions: torch.Tensor
    """``[num_decode]`` int64 position of each decode token."""
    decode_block_table: torch.Tensor
    """``[num_decode, max_blocks]`` int64 blocks of each decoding sequence, padded with the
    null block."""
    decode_mask: torch.Tensor | None
    """``[num_decode, 1, 1, max_blocks * block_size]`` bool, True where a key is visible."""
    prefills: list[PrefillChunk] = field(default_factory=list)
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_window_mask(self, window: int) -> torch.Tensor:
        """``[num_decode, 1, 1, L]`` bool: keys within `window` of each decode token's
        position (built once per step and window, from device tensors only)."""
        mask = self._window_masks.get(window)
        if mask is None:
            assert self.decode_mask is not None
            keys = torch.arange(self.decode_mask.shape[-1], device=self.decode_positions.device)
            mask = (keys[None, :] > self.decode_positions[:, None] - window)[:, None, None, :]
            self._window_masks[window] = mask
        return mask


def slots_for(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions ``[start, end)`` of a sequence with block table `blocks`."""
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]


def build_attention_metadata(
    decode_tables: list[list[int]],
    decode_positions: list[int],
    prefills: list[tuple[list[int], int, int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """The layout of one step.

    Args:
        decode_tables: per decoding sequence, its block table.
        decode_positions: per decoding sequence, the position of its token.
        prefills: per prefill chunk, in flat order after the decodes: (block table, first
            position, number of tokens).
        block_size: positions per block.
    """
    n = len(decode_tables)
    slots: list[int] = []
    for blocks, p in zip(decode_tables, decode_positions):
        slots.append(blocks[p // block_size] * block_size + p % block_size)
    width = max((len(b) for b in decode_tables), default=0)
    padded = [b + [0] * (width - len(b)) for b in decode_tables]
    chunks: list[PrefillChunk] = []
    t = n
    for blocks, start, num in prefills:
        slots.extend(slots_for(blocks, start, start + num, block_size))
        chunks.append(PrefillChunk(t, t + num, start, to_device(blocks, torch.long, device)))
        t += num
    pos = torch.tensor(decode_positions, dtype=torch.long)
    mask = None
    if n:
        mask = (torch.arange(width * block_size)[None, :] <= pos[:, None])[:, None, None, :]
        mask = to_device(mask, torch.bool, device)
    return AttentionMetadata(
        slot_mapping=to_device(slots, torch.long, device),
        num_decode=n,
        decode_positions=to_device(pos, torch.long, device),
        decode_block_table=to_device(
            torch.tensor(padded, dtype=torch.long).view(n, width), torch.long, device
        ),
        decode_mask=mask,
        prefills=chunks,
    )


def decode_only_metadata(
    positions: torch.Tensor, block_table: torch.Tensor, block_size: int
) -> AttentionMetadata:
    """Layout of a decode-only step built on the device from `positions` and `block_table`
    alone: the only host values are their shapes, so a captured CUDA graph of the step
    serves any positions and tables of those shapes.

    Args:
        positions: ``[B]`` int64, where each sequence's token is written; padding rows
            (beyond the live sequences) have position 0 and an all-null table, so they
            write into the null block, which is only ever read masked.
        block_table: ``[B, max_blocks]`` int64, padded with the null block.
    """
    b, width = block_table.shape
    rows = torch.arange(b, device=positions.device)
    slots = block_table[rows, positions // block_size] * block_size + positions % block_size
    keys = torch.arange(width * block_size, device=positions.device)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
    return AttentionMetadata(
        slot_mapping=slots,
        num_decode=b,
        decode_positions=positions,
        decode_block_table=block_table,
        decode_mask=mask,
    )


class KVCache:
    """Paged keys and values: ``[layers, num_blocks, block_size, kv_heads, head_dim]`` each.

    Allocated empty: a block is zeroed the first time it is handed out (`zero_blocks`),
    so untouched memory is never committed and masked keys never hold NaN garbage (masked
    positions still multiply their values by zero, and 0 * NaN is NaN).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.zero_blocks([0])

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @staticmethod
    def bytes_per_block(
        *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Keys plus values of one block over every layer."""
        element = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values of `blocks`, copied out in that order.

        Args:
            blocks: ``[N]`` block ids.
        Returns:
            keys, values: ``[N, block_size, kv_heads, head_dim]`` each. On CPU they are
            views of scratch buffers reused by the next call: a fresh tensor of megabytes
            per layer and step costs page faults worth six times the copy (16 sequences of
            656 tokens on the default model: 1.18 ms per layer and step, 0.18 ms into the
            scratch buffer).
        """
        k, v = self.k[layer], self.v[layer]
        if not k.is_cpu or torch.compiler.is_compiling():
            # CUDA's caching allocator has no page-fault cost, and a traced step (the
            # decode graphs) must not depend on Python-side buffer state.
            return k[blocks], v[blocks]
        n = blocks.shape[0]
        if self._scratch is None or self._scratch[0].shape[0] < n:
            old = 0 if self._scratch is None else self._scratch[0].shape[0]
            shape = (max(n, 2 * old), *k.shape[1:])
            self._scratch = (torch.empty(shape, dtype=k.dtype), torch.empty(shape, dtype=k.dtype))
        sk, sv = self._scratch
        return (
            torch.index_select(k, 0, blocks, out=sk[:n]),
            torch.index_select(v, 0, blocks, out=sv[:n]),
        )

    def zero_blocks(self, blocks: list[int]) -> None:
        # Through pinned memory: a pageable copy would sync the host with the device in
        # every step that opens a block.
        index = to_device(blocks, torch.long, self.k.device)
        self.k.index_fill_(1, index, 0)
        self.v.index_fill_(1, index, 0)


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
    """Write this step's keys/values into their cache slots and attend.

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
    k_cache = cache.k[layer]  # [blocks, block_size, kv_heads, d]
    v_cache = cache.v[layer]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)

    n = meta.num_decode
    # One decision per layer call: decode and every prefill chunk take the same path.
    in_place = cpu_attention.applies(q, k_cache, softcap)
    kernel_scale = scale if scale is not None else head_dim**-0.5
    if n and in_place:
        # Keys and values read in place: the gather below copies every visible block.
        cpu_attention.paged_attention(
            q[:n],
            k_cache,
            v_cache,
            meta.decode_block_table,
            meta.decode_positions,
            out[:n],
            scale=kernel_scale,
            sliding_window=sliding_window,
        )
    elif n:
        out[:n] = decode_attention_torch(
            q[:n], cache, layer, meta, scale=scale, sliding_window=sliding_window, softcap=softcap
        )

    for c in meta.prefills:
        if in_place:
            # Each token a query at its position over the chunk's table: causal, its cached
            # prefix read in place rather than copied and repeated for every query head.
            cpu_attention.paged_attention(
                q[c.t0 : c.t1],
                k_cache,
                v_cache,
                c.table,
                c.positions,
                out[c.t0 : c.t1],
                scale=kernel_scale,
                sliding_window=sliding_window,
            )
            continue
        end = c.start + (c.t1 - c.t0)
        first = 0
        if sliding_window is not None:
            # Keys before the chunk's first window are never visible: not even read.
            first = max(0, c.start - sliding_window + 1)
        if c.start == 0:
            # Nothing cached before the chunk: its own keys are all it attends to.
            keys, values = k[c.t0 : c.t1], v[c.t0 : c.t1]
        else:
            keys, values = cache.gather(layer, c.blocks)
            keys = keys.view(-1, kv_heads, head_dim)[:end]
            values = values.view(-1, kv_heads, head_dim)[:end]
        keys = keys[first:].transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, len, d]
        values = values[first:].transpose(0, 1).repeat_interleave(group, dim=0)
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


def decode_attention_torch(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    *,
    scale: float | None,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """The decoding sequences' attention in torch ops: their blocks gathered out of the
    cache, then SDPA under the step's mask (the reference `cpu_attention` is held to, and
    the path on CUDA, with soft-capping, and where the kernel is not built).

    Args:
        q: ``[n, heads, head_dim]``, one query per decoding sequence.
    Returns:
        ``[n, heads, head_dim]``.
    """
    n, num_heads, head_dim = q.shape
    kv_heads = cache.k.shape[3]
    group = num_heads // kv_heads
    width = meta.decode_block_table.shape[1]
    length = width * cache.block_size
    # [n, width, block_size, kv_heads, d] -> [n, kv_heads, length, d]
    keys, values = cache.gather(layer, meta.decode_block_table.view(-1))
    keys = keys.view(n, length, kv_heads, head_dim)
    values = values.view(n, length, kv_heads, head_dim)
    mask = meta.decode_mask
    if sliding_window is not None:
        mask = mask & meta.decode_window_mask(sliding_window)
    # One query per sequence: folding the query heads that share a KV head into the
    # query-length axis gives grouped-query attention without repeating keys.
    qd = q.view(n, kv_heads, group, head_dim)
    od = _attention(
        qd, keys.transpose(1, 2), values.transpose(1, 2), mask, scale=scale, softcap=softcap
    )
    return od.reshape(n, num_heads, head_dim)


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
