"""The block pool and per-sequence block tables: allocation, sharing, LRU reuse, windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from adapterhub_server.engine.kv_blocks import NULL_BLOCK, BlockPool, chain_hash, identity_root
from adapterhub_server.engine.kv_cache_manager import KVCacheManager


@dataclass(eq=False)
class Seq:
    tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_at(self, position: int) -> int:
        return self.tokens[position]


def test_allocation_never_hands_out_the_null_block_and_reports_fresh_blocks() -> None:
    pool = BlockPool(5, 4)
    fresh: list[list[int]] = []
    pool.on_first_use = fresh.append
    a = pool.allocate(3)
    assert NULL_BLOCK not in a and len(set(a)) == 3
    assert pool.num_free == 1 and pool.num_used == 3
    pool.release(a[:2])
    b = pool.allocate(3)
    assert NULL_BLOCK not in b and set(b) == {*a[:2], 4}
    # Each block is zeroed once, the first time it is handed out.
    assert sorted(x for batch in fresh for x in batch) == [1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_used_free_blocks_are_reused_before_never_used_ones() -> None:
    pool = BlockPool(10, 4)
    fresh: list[int] = []
    pool.on_first_use = fresh.extend
    a = pool.allocate(3)
    pool.release(a)
    b = pool.allocate(2)
    assert set(b) <= set(a) and fresh == a  # no block was handed out fresh again
    pool.release(b)
    c = pool.allocate(4)
    assert set(a) <= set(c) and len(fresh) == 4  # the three used ones, then one fresh
    assert c[-1] == fresh[-1] and c[-1] not in a


def test_release_is_reference_counted() -> None:
    pool = BlockPool(4, 4)
    (block,) = pool.allocate(1)
    h = chain_hash(identity_root("x"), [1, 2, 3, 4])
    pool.publish(block, h)
    pool.take(block)  # a second sequence shares it
    pool.release([block])
    assert pool.num_used == 1
    pool.release([block])
    assert pool.num_used == 0
    with pytest.raises(AssertionError):
        pool.release([block])


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_first() -> None:
    pool = BlockPool(4, 2)
    blocks = pool.allocate(3)
    hashes = [chain_hash(identity_root("a"), [i, i]) for i in range(3)]
    for b, h in zip(blocks, hashes):
        pool.publish(b, h)
    pool.release([blocks[1]])
    pool.release([blocks[0]])
    pool.release([blocks[2]])
    assert pool.num_free == 3 and all(pool.lookup(h) is not None for h in hashes)
    # A hit refreshes nothing by itself, but taking a block removes it from the LRU.
    pool.take(blocks[1])
    (first,) = pool.allocate(1)
    assert first == blocks[0] and pool.lookup(hashes[0]) is None
    (second,) = pool.allocate(1)
    assert second == blocks[2] and pool.lookup(hashes[2]) is None
    assert pool.lookup(hashes[1]) == blocks[1]


def test_free_blocks_are_used_before_cached_ones() -> None:
    pool = BlockPool(4, 2)
    (cached,) = pool.allocate(1)
    pool.publish(cached, b"h")
    pool.release([cached])
    got = pool.allocate(2)
    assert cached not in got and pool.lookup(b"h") == cached


def test_the_hash_chain_depends_on_identity_and_every_earlier_token() -> None:
    root = identity_root("adapter:aaa")
    h1 = chain_hash(root, [1, 2])
    assert chain_hash(identity_root("adapter:bbb"), [1, 2]) != h1
    assert chain_hash(root, [1, 3]) != h1
    assert chain_hash(chain_hash(root, [1, 2]), [5, 6]) != chain_hash(
        chain_hash(root, [1, 3]), [5, 6]
    )
    assert chain_hash(root, [1, 2]) == h1


def _manager(num_blocks: int = 16, block_size: int = 4, **kw) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, block_size), **kw)


def _run(kv: KVCacheManager, seq: Seq, identity: str) -> int:
    """Admit `seq`, compute all its tokens, publish; returns the prefix hit."""
    hit = kv.open(seq, identity)
    assert kv.grow(seq, hit, seq.num_tokens - hit)
    kv.commit(seq, seq.num_tokens)
    return hit


def test_prefix_hits_need_the_same_identity_and_tokens() -> None:
    kv = _manager()
    first = Seq(list(range(10)))
    assert _run(kv, first, "adapter:a") == 0
    # Same identity, same first 8 tokens: the two full blocks are shared.
    second = Seq([*range(8), 99, 98, 97])
    assert _run(kv, second, "adapter:a") == 8
    assert kv.block_ids(second)[:2] == kv.block_ids(first)[:2]
    # Another adapter's content: nothing shared, whatever its name.
    assert _run(kv, Seq(list(range(10))), "adapter:b") == 0
    # The chain breaks at the first differing block.
    assert _run(kv, Seq([*range(4), 50, 5, 6, 7, 8, 9]), "adapter:a") == 4


def test_the_last_token_is_always_computed() -> None:
    kv = _manager()
    _run(kv, Seq(list(range(8))), "base:x")
    # Fully cached prompt of two blocks: one block is recomputed for the last token.
    assert kv.open(Seq(list(range(8))), "base:x") == 4
    assert kv.open(Seq(list(range(9))), "base:x") == 8


def test_closed_sequences_leave_their_full_blocks_cached() -> None:
    kv = _manager(num_blocks=4, block_size=4)
    seq = Seq(list(range(8)))
    _run(kv, seq, "a")
    kv.close(seq)
    assert kv.pool.num_free == 3
    again = Seq(list(range(9)))
    assert _run(kv, again, "a") == 8
    kv.close(again)
    # Under pressure the cached blocks are reused for something else.
    other = Seq(list(range(100, 112)))
    assert _run(kv, other, "a") == 0
    assert kv.open(Seq(list(range(9))), "a") == 0


def test_growth_fails_whole_when_blocks_run_out() -> None:
    kv = _manager(num_blocks=4, block_size=4)
    seq = Seq(list(range(20)))
    kv.open(seq, "a")
    assert not kv.grow(seq, 0, 13)  # 4 blocks, 3 usable
    assert kv.block_ids(seq) == [] and kv.pool.num_free == 3
    assert kv.grow(seq, 0, 12)
    assert len(kv.block_ids(seq)) == 3


def test_blocks_behind_a_sliding_window_are_released() -> None:
    kv = _manager(num_blocks=8, block_size=4, sliding_window=6)
    seq = Seq(list(range(20)))
    kv.open(seq, "a")
    assert kv.grow(seq, 0, 16)
    kv.commit(seq, 16)
    # The next query (position 16) sees keys 11..16: blocks 0 and 1 (positions 0..7) are
    # out of reach, block 2 (8..11) is still needed.
    assert kv.block_ids(seq)[:2] == [NULL_BLOCK, NULL_BLOCK]
    assert NULL_BLOCK not in kv.block_ids(seq)[2:]
    assert kv.pool.num_used == 2
    assert kv.blocks_needed(1000, chunk_tokens=4) == kv.pool.blocks_for(6 + 4 + 4)
    kv.close(seq)
    assert kv.pool.num_used == 0


def test_usage_counts_referenced_blocks() -> None:
    kv = _manager(num_blocks=5, block_size=4)
    seq = Seq(list(range(8)))
    _run(kv, seq, "a")
    assert kv.usage() == 0.5
    kv.close(seq)
    assert kv.usage() == 0.0
