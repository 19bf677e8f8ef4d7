"""Continuous batching: who runs in the next step, with how many tokens, in which blocks.

Each step first gives one token to every decoding sequence (so prefills never starve
running decodes), then spends what is left of the token budget on prompt chunks: prompts
already being prefilled first, then newly admitted requests in arrival order. A request is
admitted when a sequence slot, its adapter's device slot and KV blocks for its first chunk
are free; its prompt starts after the longest run of its blocks already in the prefix cache.

When a running sequence needs a block and none is free, the newest running sequences give
theirs back (*preemption*): they return to the head of the queue and are recomputed from
their tokens (prompt and output so far) when blocks free up, so their output is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adapterhub_server.engine.kv_cache_manager import KVCacheManager
from adapterhub_server.engine.sequence import Sequence, SequenceStatus
from adapterhub_server.lora.ops import Route

logger = logging.getLogger(__name__)

# How far past the queue head admission looks for a request whose adapter is ready, so one
# cold adapter does not block everything behind it.
_ADMIT_LOOKAHEAD = 64
# Blocks admission leaves free for the running sequences to grow into: without headroom a
# new request would be preempted again at once by the decodes of the others.
_WATERMARK = 0.01


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
        kv: KVCacheManager,
        acquire_adapter: Callable[[Sequence], Route | None],
        release_adapter: Callable[[Sequence], None],
        identity: Callable[[Sequence], str],
    ) -> None:
        """
        Args:
            acquire_adapter: pin a waiting sequence's adapter in a device slot; its route,
                or None while it is not ready.
            release_adapter: unpin it (a sequence that is preempted or not admitted).
            identity: the content identity a sequence's keys and values are cached under
                (its adapter's, or the base weights').
        """
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv = kv
        self.acquire_adapter = acquire_adapter
        self.release_adapter = release_adapter
        self.identity = identity
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Oldest first: the newest are preempted first."""
        self.num_preemptions = 0
        self._watermark = max(1, int(_WATERMARK * kv.pool.usable_blocks))
        self._leaders: dict[Sequence, Sequence] = {}
        """Follower -> leader: sequences with the leader's prompt (the other choices of an
        `n > 1` request) that wait for the leader's prompt to be in the prefix cache."""

    def add(self, seq: Sequence, *, follows: Sequence | None = None) -> None:
        """Queue `seq`. With `follows` (a queued sequence with the same prompt and adapter),
        `seq` is admitted only once the leader's prompt has been computed, so that it reads
        the leader's full prompt blocks from the prefix cache instead of computing them
        again in the same step (the choices of one request share their prompt's KV)."""
        if follows is not None and self.kv.prefix_caching:
            self._leaders[seq] = follows
        self.waiting.append(seq)

    def _waits_for_leader(self, seq: Sequence) -> bool:
        leader = self._leaders.get(seq)
        if leader is None:
            return False
        if leader.finished or leader.num_computed >= len(leader.prompt_ids) - 1:
            # The leader's prompt blocks are published (or it is gone and whatever it
            # cached stays in the LRU): from now on the follower is an ordinary request.
            del self._leaders[seq]
            return False
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            want = min(seq.num_tokens - seq.num_computed, budget)
            n = self._fit(seq, want)
            if n == 0:
                break  # `seq` itself was preempted: everything after it too
            scheduled.append((seq, n))
            budget -= n
            i += 1
        for seq, n in scheduled:
            if seq.prefilling:
                out.prefills.append(ScheduledChunk(seq, n))
            else:
                out.decodes.append(seq)
        if not self.waiting or budget <= 0:
            return out
        self._admit(out, budget)
        return out

    def _fit(self, seq: Sequence, want: int) -> int:
        """Blocks for `seq`'s next `want` tokens (fewer for a prompt chunk when that is all
        that fits); preempts the newest running sequences while none fit. 0: `seq` itself
        was preempted."""
        kv = self.kv
        while True:
            room = (len(kv.block_ids(seq)) + kv.pool.num_free) * kv.block_size - seq.num_computed
            n = min(want, room) if seq.prefilling else want
            if n > 0 and kv.grow(seq, seq.num_computed, n):
                return n
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return 0

    def preempt(self, seq: Sequence) -> None:
        """Give a running sequence's blocks back; it waits at the head of the queue and is
        recomputed from its tokens later."""
        self.running.remove(seq)
        self.kv.close(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        if seq.route is not None:
            self.release_adapter(seq)
            seq.route = None
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug(
            "preempted %s (%d tokens) for lack of KV blocks", seq.request_id, seq.num_tokens
        )

    def _cached_first(self) -> None:
        """Move the waiting requests whose prompt starts with cached blocks ahead of those
        that would compute theirs, keeping arrival order within each part.

        A hit costs a few tokens of prefill, a miss the whole prompt: when many requests
        share a system prompt across several adapters, this lets the ones whose adapter's
        prefix is already cached start at once instead of queueing behind the first request
        of every other adapter (SGLang's longest-prefix-first, reduced to hit or miss).
        """
        if len(self.waiting) < 2 or not self.kv.prefix_caching:
            return
        head = [self.waiting.popleft() for _ in range(min(_ADMIT_LOOKAHEAD, len(self.waiting)))]
        hits, misses = [], []
        for seq in head:
            identity = self._known_identity(seq)
            cached = identity is not None and self.kv.cached_prefix(seq, identity) > 0
            (hits if cached else misses).append(seq)
        self.waiting.extendleft(reversed(hits + misses))

    def _known_identity(self, seq: Sequence) -> str | None:
        try:
            return self.identity(seq)
        except KeyError:  # its adapter's files have not been read yet
            return None

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Sequence] = []
        looked = 0
        kv = self.kv
        self._cached_first()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if looked >= _ADMIT_LOOKAHEAD:
                break
            seq = self.waiting.popleft()
            looked += 1
            if self._leaders and self._waits_for_leader(seq):
                skipped.append(seq)
                continue
            try:
                route = self.acquire_adapter(seq) if seq.adapter is not None else None
            except Exception as exc:  # one bad adapter fails its own request only
                out.failed.append((seq, exc))
                continue
            if seq.adapter is not None and route is None:
                skipped.append(seq)
                continue
            seq.route = route
            # Cached blocks hold keys and values, not logits: prompt logprobs need the prompt.
            hit = kv.open(seq, self.identity(seq), lookup=not seq.needs_prompt_logprobs)
            n = min(seq.num_tokens - hit, budget)
            needed = kv.pool.blocks_for(hit + n) - len(kv.block_ids(seq))
            # Headroom only matters when others run: alone, a request may use every block.
            headroom = self._watermark if self.running else 0
            if needed + headroom > kv.pool.num_free or not kv.grow(seq, hit, n):
                kv.close(seq)
                if route is not None:
                    self.release_adapter(seq)
                    seq.route = None
                self.waiting.appendleft(seq)
                break
            kv.count_lookup(seq.num_tokens, hit)
            seq.num_computed = hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.prefills.append(ScheduledChunk(seq, n))
            budget -= n
        # Requests whose adapter is not ready keep their place at the head of the queue.
        self.waiting.extendleft(reversed(skipped))

    def finish(self, seq: Sequence) -> None:
        """Take a running or waiting sequence out; its blocks go back to the pool."""
        self._leaders.pop(seq, None)
        if seq in self.running:
            self.running.remove(seq)
            self.kv.close(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
