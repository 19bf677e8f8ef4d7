"""Per-sequence KV block bookkeeping on top of the `BlockPool`: prefix matches, growth,
publishing full blocks, sliding-window release, and freeing.

The scheduler asks it whether a sequence's next tokens fit and the engine commits what a
step computed; nothing here touches tensors (the cache's tensors are indexed by the block
tables this class keeps).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol
from weakref import WeakKeyDictionary

from adapterhub_server.engine.kv_blocks import (
    NULL_BLOCK,
    BlockPool,
    BlockTable,
    chain_hash,
    identity_root,
)


class TokenSource(Protocol):
    """What the manager needs of a sequence: its tokens so far (prompt, then output)."""

    @property
    def num_tokens(self) -> int: ...

    def token_at(self, position: int) -> int: ...


@dataclass
class PrefixStats:
    """Counters since start (plain ints, read from other threads)."""

    queried_tokens: int = 0
    """Prompt tokens looked up in the prefix cache at admission."""
    hit_tokens: int = 0
    """Of those, tokens whose keys and values came from the cache."""


class KVCacheManager:
    """Owns every sequence's `BlockTable`."""

    def __init__(self, pool: BlockPool, *, sliding_window: int | None = None) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.sliding_window = sliding_window
        """Set when *every* layer attends only within this window: blocks that fell out of
        it are released. (With any global layer, every block stays needed.)"""
        self.stats = PrefixStats()
        self._tables: dict[int, BlockTable] = {}
        self._chains: WeakKeyDictionary[object, tuple[bytes, list[bytes]]] = WeakKeyDictionary()
        """Per live sequence: (identity root, hashes of its full blocks so far)."""

    # -- capacity --------------------------------------------------------------------------

    def blocks_needed(self, total_tokens: int, chunk_tokens: int) -> int:
        """Most blocks one sequence of `total_tokens` can hold at once, computing at most
        `chunk_tokens` per step."""
        tokens = total_tokens
        if self.sliding_window is not None:
            # Blocks behind the window are released before every step.
            tokens = min(tokens, self.sliding_window + chunk_tokens + self.block_size)
        return self.pool.blocks_for(tokens)

    @property
    def prefix_caching(self) -> bool:
        """Whether full blocks are kept by content for later requests to reuse."""
        return self.pool.prefix_caching

    @property
    def usable_blocks(self) -> int:
        """Blocks sequences may hold (the pool less its reserved null block)."""
        return self.pool.usable_blocks

    def usage(self) -> float:
        """Fraction of usable blocks referenced by running sequences (0-1)."""
        return self.pool.num_used / self.pool.usable_blocks

    # -- sequences -------------------------------------------------------------------------

    def table(self, seq: object) -> BlockTable:
        return self._tables[id(seq)]

    def block_ids(self, seq: object) -> list[int]:
        return self._tables[id(seq)].blocks

    def has(self, seq: object) -> bool:
        return id(seq) in self._tables

    def open(self, seq: TokenSource, identity: str, *, lookup: bool = True) -> int:
        """Start `seq`'s table, taking the longest run of cached blocks that match its
        tokens (none without `lookup`); returns the number of tokens whose keys and values
        are already there.

        At least the last token is always left to compute: its logits are what the first
        step samples from.
        """
        table = BlockTable(root=identity_root(identity))
        self._tables[id(seq)] = table
        for h in self._cached_chain(seq, table.root) if lookup else ():
            block = self.pool.lookup(h)
            assert block is not None
            self.pool.take(block)
            table.blocks.append(block)
        table.num_published = len(table.blocks)
        return len(table.blocks) * self.block_size

    def cached_prefix(self, seq: TokenSource, identity: str) -> int:
        """Tokens `open` would find cached for `seq` now (nothing is taken)."""
        return sum(1 for _ in self._cached_chain(seq, identity_root(identity))) * self.block_size

    def _cached_chain(self, seq: TokenSource, root: bytes) -> Iterator[bytes]:
        """Hashes of `seq`'s leading full blocks that are cached, stopping before its last
        token's block (that token is always computed)."""
        if not self.pool.prefix_caching:
            return
        for _, h in zip(range((seq.num_tokens - 1) // self.block_size), self._chain(seq, root)):
            if self.pool.lookup(h) is None:
                return
            yield h

    def _chain(self, seq: TokenSource, root: bytes) -> Iterator[bytes]:
        """The hash chain of `seq`'s full blocks, in order. Positions never change once
        they hold a token, so each hash is computed once per sequence and kept while the
        sequence lives: a long prompt waiting in the queue is not rehashed every step."""
        memo = self._chains.get(seq)
        if memo is None or memo[0] != root:
            memo = self._chains[seq] = (root, [])
        chain = memo[1]
        bs = self.block_size
        for i in range(seq.num_tokens // bs):
            if i == len(chain):
                parent = chain[-1] if chain else root
                chain.append(
                    chain_hash(parent, [seq.token_at(p) for p in range(i * bs, (i + 1) * bs)])
                )
            yield chain[i]

    def count_lookup(self, queried: int, hit: int) -> None:
        """Record an admitted sequence's prefix lookup (a lookup whose admission is put
        off is counted when it is retried and succeeds)."""
        self.stats.queried_tokens += queried
        self.stats.hit_tokens += hit

    def grow(self, seq: object, num_computed: int, num_new: int) -> bool:
        """Give `seq` blocks for positions up to ``num_computed + num_new``; False (nothing
        allocated) when too few blocks are free."""
        missing = self._missing(seq, num_computed + num_new)
        if missing > self.pool.num_free:
            return False
        if missing > 0:
            self._tables[id(seq)].blocks.extend(self.pool.allocate(missing))
        return True

    def commit(self, seq: TokenSource, num_computed: int) -> None:
        """After a step: publish `seq`'s blocks that are now full, and release the blocks
        its next tokens can no longer see."""
        table = self._tables[id(seq)]
        full = num_computed // self.block_size
        if self.pool.prefix_caching and full > table.num_published:
            for i, h in enumerate(islice(self._chain(seq, table.root), full)):
                if i >= table.num_published and table.blocks[i] != NULL_BLOCK:
                    self.pool.publish(table.blocks[i], h)
        table.num_published = max(table.num_published, full)
        self._release_outside_window(table, num_computed)

    def close(self, seq: object) -> None:
        """Drop `seq`'s table; its blocks go back to the pool (full ones stay cached)."""
        table = self._tables.pop(id(seq), None)
        if table is not None:
            self.pool.release(table.blocks)

    def _missing(self, seq: object, num_tokens: int) -> int:
        return max(0, self.pool.blocks_for(num_tokens) - len(self._tables[id(seq)].blocks))

    def _release_outside_window(self, table: BlockTable, num_computed: int) -> None:
        """A query at position p >= num_computed sees keys at positions > p - window, so a
        block whose last position is <= num_computed - window is never read again."""
        if self.sliding_window is None:
            return
        last_dead = max(0, (num_computed - self.sliding_window + 1) // self.block_size)
        dead = [b for b in table.blocks[:last_dead] if b != NULL_BLOCK]
        if dead:
            self.pool.release(dead)
            table.blocks[:last_dead] = [NULL_BLOCK] * last_dead
