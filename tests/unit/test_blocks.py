"""The paged cache's block bookkeeping (worker/paged/blocks.py), with integer tokens and no model."""
from __future__ import annotations

import pytest

from worker.paged.blocks import BlockPool, PoolExhausted

SYSTEM = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 and 8 more


def test_a_row_gets_blocks_for_its_prompt_and_slots_in_order():
    pool = BlockPool(8, 16)
    table = pool.allocate(list(range(20)))
    assert table.length == 0 and len(table.blocks) == 2
    assert [pool.slot(table, p) for p in (0, 15, 16, 19)] == [table.blocks[0] * 16, table.blocks[0] * 16 + 15,
                                                              table.blocks[1] * 16, table.blocks[1] * 16 + 3]
    assert pool.free_blocks == 6


def test_a_registered_prefix_is_shared_and_the_last_prompt_token_is_always_computed():
    pool = BlockPool(16, 16)
    first = pool.allocate(SYSTEM + [1, 2, 3])
    first.length = len(SYSTEM) + 3
    pool.register(first, SYSTEM + [1, 2, 3])
    second = pool.allocate(SYSTEM + [7, 8])
    assert second.length == 32 and second.blocks[:2] == first.blocks[:2]  # two full blocks shared
    assert second.blocks[2] != first.blocks[2]  # the partial block is private
    exact = pool.allocate(SYSTEM[:32])  # the whole prompt is cached: its last block is computed again
    assert exact.length == 16 and exact.blocks[0] == first.blocks[0]
    assert pool.hit_tokens == 32 + 16 and pool.miss_tokens == 43 + 10 + 16


def test_other_tokens_in_an_earlier_block_break_the_chain():
    pool = BlockPool(16, 16)
    a = pool.allocate(SYSTEM + [1])
    a.length = 41
    pool.register(a, SYSTEM + [1])
    changed = [0] + SYSTEM[1:] + [1]  # the first block differs: the second one, identical, is not reused
    assert pool.cached_prefix(changed) == []
    assert len(pool.cached_prefix(SYSTEM[:16] + [9] * 25)) == 1


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    pool = BlockPool(4, 4)
    a = pool.allocate([1, 2, 3, 4, 5])
    a.length = 5
    pool.register(a, [1, 2, 3, 4, 5])
    pool.release(a)
    assert pool.free_blocks == 4
    again = pool.allocate([1, 2, 3, 4, 6])
    assert again.length == 4  # the freed block was still registered
    pool.release(again)
    # Three fresh blocks are taken before the registered one (freed last of all, with its prefix first).
    filler = pool.allocate(list(range(12)))
    assert len(pool.cached_prefix([1, 2, 3, 4, 7])) == 1
    pool.allocate([9])  # the last free block: the registered one is overwritten
    assert pool.cached_prefix([1, 2, 3, 4, 7]) == []
    assert pool.free_blocks == 0
    with pytest.raises(PoolExhausted):
        pool.allocate([1])
    pool.release(filler)
    assert pool.free_blocks == 3


def test_a_shared_block_is_freed_only_when_its_last_holder_leaves():
    pool = BlockPool(8, 4)
    a = pool.allocate([1, 2, 3, 4, 5])
    a.length = 5
    pool.register(a, [1, 2, 3, 4, 5])
    b = pool.allocate([1, 2, 3, 4, 6])
    shared = a.blocks[0]
    assert b.blocks[0] == shared
    pool.release(a)
    assert shared not in pool._free
    pool.release(b)
    assert shared in pool._free


def test_without_the_prefix_cache_nothing_is_shared_or_counted():
    pool = BlockPool(8, 4, prefix_cache=False)
    a = pool.allocate([1, 2, 3, 4, 5])
    a.length = 5
    pool.register(a, [1, 2, 3, 4, 5])
    assert pool.allocate([1, 2, 3, 4, 5]).length == 0
    assert pool.hit_tokens == pool.miss_tokens == 0


def test_an_allocation_that_does_not_fit_gives_its_blocks_back():
    pool = BlockPool(3, 4)
    with pytest.raises(PoolExhausted):
        pool.allocate(list(range(13)))
    assert pool.free_blocks == 3
