"""Decode steps replayed from CUDA graphs, one per (batch bucket, block-table bucket, LoRA).

A decode step of a 1B model at tens of sequences launches hundreds of small kernels; on a
GPU the host's launch overhead, not the math, then sets the step time. A CUDA graph records
the step's kernels once and replays them with one launch. A graph replays the exact
kernels, shapes and addresses it recorded, so everything a step varies must live in device
buffers the graph reads, and every host-side value must be fixed per graph:

* the batch is padded to a bucket B (1, 2, 4, 8, then multiples of 8 up to
  ``max_num_seqs``); padding rows decode token 0 at position 0 with an all-null block
  table and no adapter (they write only into the null block), and their logits are dropped;
* attention reads a bucketed block-table width W (powers of two of blocks from 64 tokens
  up to ``max_model_len``) from a static ``[B, W]`` table buffer, and builds its slots and
  mask on the device from the positions and the table
  (`models.attention.decode_only_metadata`);
* LoRA runs through the Triton kernels with static per-rank-class chunk tables sized for
  the worst case of B tokens (`lora.triton_ops.KernelMapping`): padding chunks have count 0,
  so one graph serves any adapter mix. The adapter weights are read from the pool's slot
  tensors; when the pool reallocates them (it grew), every graph is dropped and recaptured.
  A step in which no sequence uses an adapter replays a graph without the LoRA kernels.
  A step with a DoRA adapter in it replays a graph that also rescales every row by a static
  ``[B]`` buffer of DoRA table rows (row 0, the identity, for the other rows; `lora.dora`).

Per step the host writes ids, positions, block tables and chunk tables into pinned memory,
issues one non-blocking copy per buffer, and replays. Graphs are captured on first use of a bucket.

With ``capture=False`` the same static buffers and padded layout run eagerly: that is how
the tests check on CPU that the padded, bucketed step computes what the dynamic one does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterhub_server.lora.ops import LoRABatch, Route
from adapterhub_server.lora.pool import LoRAWeightPool
from adapterhub_server.lora.routing import CHUNK_TOKENS, plan_chunks
from adapterhub_server.lora.triton_ops import KernelMapping
from adapterhub_server.models.attention import KVCache, decode_only_metadata
from adapterhub_server.models.causal_lm import BatchedCausalLM

logger = logging.getLogger(__name__)

_MIN_KEY_LEN = 64


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, 16, 24, ... and `max_num_seqs` itself."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


def table_width_buckets(max_model_len: int, block_size: int) -> list[int]:
    """Block-table widths: powers of two of blocks from 64 tokens' worth, and the width of
    a `max_model_len` sequence."""
    widest = -(-max_model_len // block_size)
    sizes = []
    n = max(1, -(-_MIN_KEY_LEN // block_size))
    while n < widest:
        sizes.append(n)
        n *= 2
    return [*sizes, widest]


def _bucket(buckets: Sequence[int], n: int) -> int | None:
    return next((b for b in buckets if b >= n), None)


def chunk_capacity(batch: int, slots: int) -> int:
    """Most chunks `batch` tokens can form over `slots` slots of one rank class.

    Each slot in use contributes ``ceil(n_g / 16) <= 1 + (n_g - 1) // 16`` chunks, so the
    total is at most ``min(batch, slots + batch // 16)``.
    """
    return min(batch, slots + batch // CHUNK_TOKENS)


@dataclass
class _Step:
    """The static buffers of one (B, L, LoRA) bucket and, on CUDA, its captured graph."""

    batch: int
    width: int
    classes: tuple[tuple[int, int], ...]
    """(rank class, chunk capacity) per class the graph launches the kernels for."""
    ids_positions: torch.Tensor
    """``[2, B]`` int64: token ids, then positions."""
    block_table: torch.Tensor
    """``[B, W]`` int64 block tables, padded with the null block."""
    tables: torch.Tensor
    """int32, per class ``[tokens B | slots C | starts C | counts C]``."""
    lora: LoRABatch | None
    logits_index: torch.Tensor
    dora_rows: torch.Tensor | None = None
    """``[B]`` int64 each row's DoRA table row (0: unchanged); None in graphs without DoRA."""
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Runs eligible decode steps from per-bucket static buffers (and CUDA graphs)."""

    def __init__(
        self,
        model: BatchedCausalLM,
        cache: KVCache,
        pool: LoRAWeightPool,
        *,
        max_num_seqs: int,
        max_model_len: int,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.cache = cache
        self.pool = pool
        self.capture = capture
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.width_buckets = table_width_buckets(max_model_len, cache.block_size)
        self._device = cache.k.device
        self._steps: dict[tuple[int, int, bool, bool], _Step] = {}
        """(batch bucket, table-width bucket, any adapter in the step, any DoRA adapter in
        the step) -> buffers, graph."""
        self._failed: set[tuple[int, int, bool, bool]] = set()
        self._pool_version = pool.version
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        # Every graph writes its logits here rather than into its own output tensor: one
        # [B, vocab] float32 output per captured bucket would add up to gigabytes, while
        # the graphs' intermediates share one memory pool (they never run concurrently).
        self._logits = torch.empty(
            self.batch_buckets[-1], model.shape.vocab_size, device=self._device
        )
        self.num_captures = 0
        self.num_runs = 0
        """Steps served from the static buffers (replayed, or run eagerly without capture)."""

    @property
    def num_graphs(self) -> int:
        return sum(s.graph is not None for s in self._steps.values())

    def run(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        routes: Sequence[Route | None],
        tables: Sequence[Sequence[int]],
    ) -> torch.Tensor | None:
        """Decode one token for each of n sequences.

        Args:
            ids, positions: per sequence, its input token and where it is written.
            routes: per sequence, ``(rank_class, slot)`` or None.
            tables: per sequence, its block table.
        Returns:
            ``[n, vocab]`` float32 logits (a view of a static buffer, valid until the next
            call), or None when this step does not fit a bucket: the caller runs it eagerly.
        """
        n = len(ids)
        batch = _bucket(self.batch_buckets, n)
        width = _bucket(self.width_buckets, max(len(t) for t in tables))
        # Steps without any adapter replay a graph without LoRA kernels: base traffic pays
        # nothing for the adapters resident in the pool.
        dora = self.pool.dora_rows
        key = (
            batch,
            width,
            any(r is not None for r in routes),
            any(r in dora for r in routes if r is not None),
        )
        if batch is None or width is None or key in self._failed:
            return None
        if self.pool.version != self._pool_version:
            self._drop_all("the adapter pool was reallocated")
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._new_step(batch, width, lora=key[2], dora=key[3])
        known = {c for c, _ in step.classes}
        if any(r is not None and r[0] not in known for r in routes):
            return None  # a rank class the pool did not have when the buffers were made
        self._fill(step, ids, positions, routes, tables)
        if not self.capture:
            self._forward(step)
            self.num_runs += 1
            return self._logits[:n]
        if step.graph is None:
            try:
                self._capture(step)
            except Exception:
                logger.exception(
                    "capturing the decode graph for batch %d, table width %d failed; "
                    "that bucket runs eagerly",
                    batch,
                    width,
                )
                self._failed.add(key)
                del self._steps[key]
                return None
        assert step.graph is not None
        step.graph.replay()
        self.num_runs += 1
        return self._logits[:n]

    # -- buffers -------------------------------------------------------------------------

    def _new_step(self, batch: int, width: int, *, lora: bool, dora: bool = False) -> _Step:
        dev = self._device
        classes = tuple(
            (c, chunk_capacity(batch, self.pool.capacity(c)))
            for c in (self.pool.rank_classes() if lora else ())
        )
        tables = torch.zeros(
            sum(batch + 3 * cap for _, cap in classes), dtype=torch.int32, device=dev
        )
        mappings = []
        o = 0
        for c, cap in classes:
            views = []
            for size in (batch, cap, cap, cap):
                views.append(tables[o : o + size])
                o += size
            mappings.append(KernelMapping(c, *views))
        dora_rows = torch.zeros(batch, dtype=torch.long, device=dev) if dora else None
        lora_batch = None
        if mappings:
            lora_batch = LoRABatch(kernel_mappings=mappings, dora_rows=dora_rows)
        return _Step(
            batch=batch,
            width=width,
            classes=classes,
            ids_positions=torch.zeros(2, batch, dtype=torch.long, device=dev),
            block_table=torch.zeros(batch, width, dtype=torch.long, device=dev),
            tables=tables,
            lora=lora_batch,
            logits_index=torch.arange(batch, device=dev),
            dora_rows=dora_rows,
        )

    def _fill(
        self,
        step: _Step,
        ids: Sequence[int],
        positions: Sequence[int],
        routes: Sequence[Route | None],
        tables: Sequence[Sequence[int]],
    ) -> None:
        pad = step.batch - len(ids)
        _copy_in(step.ids_positions, [[*ids, *[0] * pad], [*positions, *[0] * pad]])
        rows = [[*t, *[0] * (step.width - len(t))] for t in tables]
        _copy_in(step.block_table, rows + [[0] * step.width] * pad)
        if step.dora_rows is not None:
            dora = self.pool.dora_rows
            rows_of = [dora.get(r, 0) if r is not None else 0 for r in routes]
            _copy_in(step.dora_rows, rows_of + [0] * pad)
        if not step.classes:
            return
        plans = plan_chunks(routes)
        values: list[int] = []
        for c, cap in step.classes:
            p = plans.get(c)
            tokens, slots, starts, counts = (
                (p.tokens, p.slots, p.starts, p.counts) if p else ([], [], [], [])
            )
            values += tokens + [0] * (step.batch - len(tokens))
            for column in (slots, starts, counts):
                values += column + [0] * (cap - len(column))
        _copy_in(step.tables, values)

    # -- running -------------------------------------------------------------------------

    def _forward(self, step: _Step) -> torch.Tensor:
        """The step, from the static buffers into the shared logits buffer (whose first
        B rows it returns)."""
        ids, positions = step.ids_positions[0], step.ids_positions[1]
        attn = decode_only_metadata(positions, step.block_table, self.cache.block_size)
        logits = self.model(ids, positions, attn, self.cache, step.lora, step.logits_index)
        out = self._logits[: step.batch]
        out.copy_(logits)
        return out

    def _capture(self, step: _Step) -> None:
        # Warm-up outside the graph compiles the Triton kernels, sets up cuBLAS workspaces
        # and fills the kernels' pointer-table cache; capture forbids all of that. The
        # warm-up computes this very step, so its cache writes are the ones replay repeats.
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(step)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work on other threads (adapter loads) must not abort capture.
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            self._forward(step)
        step.graph = graph
        self.num_captures += 1
        logger.info(
            "captured the decode graph for batch %d, table width %d", step.batch, step.width
        )

    def _drop_all(self, reason: str) -> None:
        if self._steps:
            logger.info("dropping %d decode graphs: %s", len(self._steps), reason)
        self._steps.clear()
        self._failed.clear()
        self._pool_version = self.pool.version
        if self.capture:
            # The dropped graphs released their memory pool; PyTorch refuses to capture
            # into a pool that no live graph holds, so later captures take a fresh one.
            self._mempool = torch.cuda.graph_pool_handle()


def _copy_in(static: torch.Tensor, values: list) -> None:
    """Write host `values` into a static device buffer without a host-device sync."""
    host = torch.tensor(values, dtype=static.dtype)
    if static.device.type == "cuda":
        host = host.pin_memory()
    static.copy_(host.view_as(static), non_blocking=True)
