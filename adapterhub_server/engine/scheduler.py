"""Continuous batching: who runs in the next step, and with how many tokens.

Each step first gives one token to every decoding sequence (so prefills never starve
running decodes), then spends what is left of the token budget on prompt chunks: prompts
already being prefilled first, then newly admitted requests in arrival order. A request is
admitted only when a sequence slot, a KV cache row and its adapter's device slot are free.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adapterhub_server.engine.sequence import Sequence, SequenceStatus
from adapterhub_server.lora.ops import Route

logger = logging.getLogger(__name__)

# How far past the queue head admission looks for a request whose adapter is ready, so one
# cold adapter does not block everything behind it.
_ADMIT_LOOKAHEAD = 64


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int
    """Tokens of the prompt computed this step, starting at seq.num_computed."""


@dataclass
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    """Requests that could not be admitted (bad or vanished adapter files), with why: they
    fail alone."""

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_seqs(self) -> int:
        return len(self.decodes) + len(self.prefills)

    def split(self) -> tuple[SchedulerOutput, SchedulerOutput]:
        """Two plans with about half the sequences each (decodes, then prefills, in order),
        to retry a failed step in smaller pieces. `failed` is not carried over."""
        mid = self.num_seqs // 2
        cut = max(0, mid - len(self.decodes))
        return (
            SchedulerOutput(self.decodes[:mid], self.prefills[:cut]),
            SchedulerOutput(self.decodes[mid:], self.prefills[cut:]),
        )


class Scheduler:
    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        acquire_adapter: Callable[[Sequence], Route | None],
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.acquire_adapter = acquire_adapter
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_rows = list(range(max_num_seqs))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Row order, so the decode rows are 0..n-1 and attention reads the cache by view.
        running = sorted(self.running, key=lambda s: s.row)
        for seq in running:
            if not seq.prefilling and budget > 0:
                out.decodes.append(seq)
                budget -= 1
        for seq in sorted(running, key=lambda s: s.arrival):
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt_ids) - seq.num_computed, budget)
                out.prefills.append(ScheduledChunk(seq, n))
                budget -= n
        self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Sequence] = []
        looked = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if looked >= _ADMIT_LOOKAHEAD:
                break
            seq = self.waiting.popleft()
            looked += 1
            try:
                route = self.acquire_adapter(seq) if seq.adapter is not None else None
            except Exception as exc:  # one bad adapter fails its own request only
                out.failed.append((seq, exc))
                continue
            if seq.adapter is not None and route is None:
                skipped.append(seq)
                continue
            seq.route = route
            seq.row = self._free_rows.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq.prompt_ids), budget)
            out.prefills.append(ScheduledChunk(seq, n))
            budget -= n
        # Requests whose adapter is not ready keep their place at the head of the queue.
        self.waiting.extendleft(reversed(skipped))

    def finish(self, seq: Sequence) -> None:
        """Take a running or waiting sequence out; its row becomes free."""
        if seq in self.running:
            self.running.remove(seq)
            assert seq.row is not None
            self._free_rows.append(seq.row)
            self._free_rows.sort()
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def compaction_moves(self) -> list[tuple[Sequence, int, int]]:
        """Moves (sequence, old_row, new_row) that pack running sequences into the lowest rows.

        Applied by the engine (which copies the KV) after sequences finish, so that decode
        rows stay a prefix and attention keeps using a view of the cache.
        """
        moves: list[tuple[Sequence, int, int]] = []
        while self._free_rows and self.running:
            top = max(self.running, key=lambda s: s.row)
            hole = self._free_rows[0]
            if hole > top.row:
                break
            self._free_rows.pop(0)
            self._free_rows.append(top.row)
            self._free_rows.sort()
            moves.append((top, top.row, hole))
            top.row = hole
        return moves
