"""BlockManager: allocation, prefix reuse by hash chain, ref counting, freeing, running out."""

import sys

import pytest

from raymoe.engine.block_manager import BlockManager, block_hash
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence

BS = 4


def seq(tokens) -> Sequence:
    return Sequence(list(tokens), SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Pretend all of s's tokens were run: mark cached and register its full blocks."""
    s.num_cached_tokens = len(s)
    bm.cache_blocks(s)
    return s


def test_imports_no_torch():
    import subprocess

    code = "import sys, raymoe.engine.block_manager; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_takes_blocks_for_every_token():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(range(10))  # 3 blocks: 4 + 4 + 2
    assert bm.can_allocate(a)
    assert bm.allocate(a) == 0
    assert a.block_table == [0, 1, 2] and bm.num_free_blocks == 5


def test_out_of_blocks():
    bm = BlockManager(num_blocks=3, block_size=BS)
    bm.allocate(seq(range(8)))  # 2 blocks
    big = seq(range(100, 108))
    assert not bm.can_allocate(big)
    one = seq(range(200, 203))
    assert bm.can_allocate(one)
    bm.allocate(one)
    one.append_token(5)  # 4 tokens: still one block
    assert bm.num_missing_blocks(one) == 0
    one.append_token(6)  # 5 tokens: needs a second block, none left
    assert not bm.can_append(one)
    with pytest.raises(AssertionError, match="out of KV blocks"):
        bm.may_append(one)


def test_append_adds_a_block_at_the_boundary():
    bm = BlockManager(num_blocks=4, block_size=BS)
    s = seq(range(4))
    bm.allocate(s)
    s.append_token(9)
    assert bm.can_append(s)
    bm.may_append(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2


def test_prefix_shared_by_hash_with_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(range(10))
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])  # same first 2 full blocks
    assert bm.prefix_hits(b) == a.block_table[:2]
    assert bm.allocate(b) == 8  # 8 tokens' KV reused
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 8 - 3


def test_hash_chain_covers_the_whole_prefix():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    computed(bm, a)
    b = seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # second block equal, first differs: no hit
    assert bm.prefix_hits(b) == []
    assert block_hash(None, [5, 6, 7, 8]) != block_hash(block_hash(None, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_a_hit_always_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(range(8))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(8))  # identical, block-aligned prompt: only the first block may be reused
    assert bm.allocate(b) == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_only_computed_blocks_are_shared():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(range(12))
    bm.allocate(a)
    a.num_cached_tokens = 5  # first prefill chunk done: block 0 computed, block 1 half
    bm.cache_blocks(a)
    assert bm.prefix_hits(seq(range(13))) == a.block_table[:1]


def test_freed_blocks_stay_reusable_until_reallocated():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    old = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq(list(range(8)) + [77, 78])
    assert bm.can_allocate(b) and bm.allocate(b) == 8
    assert b.block_table[:2] == old[:2] and bm.num_free_blocks == 1


def test_lru_evicts_the_least_recently_freed():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = seq(range(5)), seq(range(100, 105))
    for s in (a, b):
        bm.allocate(s)
        computed(bm, s)
    bm.free(a)  # a's blocks freed first: evicted first
    bm.free(b)
    c = seq(range(200, 205))  # 2 fresh blocks: the free list's front, a's blocks
    bm.allocate(c)
    assert bm.prefix_hits(seq(range(5))) == []
    assert bm.prefix_hits(seq(range(100, 105))) != []


def test_can_allocate_counts_hits_in_the_free_list():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = seq(range(9))  # 3 blocks
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    b = seq(list(range(8)) + [1, 2, 3, 4])  # hits 2 free blocks, needs 1 fresh: 3 in all
    assert bm.can_allocate(b)
    c = seq(list(range(8)) + list(range(5)))  # 2 hits + 2 fresh = 4 > 3
    assert not bm.can_allocate(c)


def test_free_twice_is_an_invariant_breach():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = seq(range(3))
    bm.allocate(a)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(a)
