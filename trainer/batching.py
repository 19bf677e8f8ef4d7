"""From tokenized examples to micro-batches: epoch order, packing, collation, rank sharding.

A micro-batch is a list of rows; a row is a list of example indices laid out one after the
other. The three `TrainConfig.batching` modes differ only in how rows are formed:

- `padded`: `batch_size` rows of one example each, right-padded to the longest;
- `padding_free`: one row holding the batch's `batch_size` examples back to back;
- `packed`: rows filled with whole examples up to `max_seq_len` tokens, `batch_size` rows.

Rows with several examples carry `position_ids` that restart at 0 for each example and no
attention mask: transformers then builds a block-diagonal causal mask, so no token attends
across examples (the same mechanism as its flash-attention "padding-free" path). The first
token of every example carries no label, so the last token of one example never learns to
predict the first of the next.

The data order is a pure function of (seed, epoch): a resumed run sees the same batches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from trainer.data import IGNORE_INDEX, Example

Row = list[int]
MicroBatch = list[Row]

_OPEN_ROWS = 64
"""Packing is first-fit over the most recent rows only: linear time on large datasets,
within a few percent of full first-fit density on typical length mixes."""


@dataclass(frozen=True)
class StepBatches:
    """The micro-batches of one optimizer step that this rank runs."""

    epoch: int
    step_in_epoch: int
    micro_batches: list[MicroBatch]


class BatchPlan:
    """Deterministic micro-batches per epoch for one rank of `world_size`.

    Each optimizer step consumes `grad_accum * world_size` consecutive micro-batches of the
    epoch; rank r runs the r-th, (r+W)-th, ... of them. An epoch's list is padded to a
    multiple of `world_size` by repeating its first micro-batches (as torch's
    DistributedSampler does) so that every rank has work in every step.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batching: str,
        batch_size: int,
        grad_accum: int,
        max_seq_len: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.lengths = list(lengths)
        self.batching = batching
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self._cache: dict[int, list[MicroBatch]] = {}

    def order(self, epoch: int) -> list[int]:
        """The example indices of `epoch`, shuffled by (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def micro_batches(self, epoch: int) -> list[MicroBatch]:
        """Every micro-batch of `epoch` (all ranks), padded to a multiple of world_size."""
        cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        order = self.order(epoch)
        if self.batching == "packed":
            rows = pack_rows(order, self.lengths, self.max_seq_len)
            batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        else:
            chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            if self.batching == "padding_free":
                batches = [[chunk] for chunk in chunks]
            else:
                batches = [[[index] for index in chunk] for chunk in chunks]
        short = -len(batches) % self.world_size
        batches = batches + [batches[i % len(batches)] for i in range(short)]
        self._cache = {epoch: batches}  # one epoch at a time is all a run needs
        return batches

    def steps_in_epoch(self, epoch: int) -> int:
        per_step = self.grad_accum * self.world_size
        return math.ceil(len(self.micro_batches(epoch)) / per_step)

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def steps(self, start_step: int = 0) -> Iterator[StepBatches]:
        """Endless: this rank's micro-batches for optimizer steps start_step+1, +2, ...

        Earlier steps are skipped by counting, without collating anything.
        """
        per_step = self.grad_accum * self.world_size
        skipped = 0
        for epoch in itertools.count():
            n = self.steps_in_epoch(epoch)
            if skipped + n <= start_step:
                skipped += n
                continue
            batches = self.micro_batches(epoch)
            for k in range(n):
                if skipped < start_step:
                    skipped += 1
                    continue
                group = batches[k * per_step : (k + 1) * per_step]
                yield StepBatches(epoch, k, group[self.rank :: self.world_size])


def pack_rows(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[Row]:
    """First-fit packing of examples (in `order`) into rows of at most `capacity` tokens."""
    rows: list[Row] = []
    room: list[int] = []
    for index in order:
        n = lengths[index]
        start = max(0, len(rows) - _OPEN_ROWS)
        for r in range(start, len(rows)):
            if room[r] >= n:
                rows[r].append(index)
                room[r] -= n
                break
        else:
            rows.append([index])
            room.append(capacity - n)
    return rows


@dataclass
class Batch:
    """One collated micro-batch."""

    inputs: dict[str, torch.Tensor]
    """`input_ids` [R, L]; plus `attention_mask` [R, L] (1 = real token) when every row holds
    one example, else `position_ids` [R, L] restarting at 0 at each example (padding gets its
    own run of positions, so it forms a separate block)."""
    labels: torch.Tensor
    """[R, L]: the token id where the loss applies, IGNORE_INDEX elsewhere (padding and the
    first token of each example)."""
    real_tokens: int
    """Non-padding tokens."""
    trained_tokens: int
    """Tokens whose prediction carries loss (labels[:, 1:] != IGNORE_INDEX)."""

    def to(self, device: torch.device) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            self.labels.to(device, non_blocking=True),
            self.real_tokens,
            self.trained_tokens,
        )


def collate(micro_batch: MicroBatch, examples: Sequence[Example], pad_id: int) -> Batch:
    """Lay out the rows of `micro_batch` into tensors, L = the longest row."""
    lengths = [sum(len(examples[i].input_ids) for i in row) for row in micro_batch]
    width = max(lengths)
    shape = (len(micro_batch), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    multi = any(len(row) > 1 for row in micro_batch)
    positions = torch.zeros(shape, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(micro_batch):
        at = 0
        for index in row:
            example = examples[index]
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(example.labels[1:])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        mask[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)
    inputs = {"input_ids": input_ids}
    if multi:
        inputs["position_ids"] = positions
    else:
        inputs["attention_mask"] = mask
    return Batch(
        inputs=inputs,
        labels=labels,
        real_tokens=sum(lengths),
        trained_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
    )
