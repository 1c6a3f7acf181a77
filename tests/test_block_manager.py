from python_backends.engine.block_manager import BlockManager, block_hash
from python_backends.engine.sampling import SamplingParams
from python_backends.engine.sequence import Sequence


def seq(tokens, rid="r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=8))


def computed(bm: BlockManager, s: Sequence) -> None:
    """What the engine does after a step that computed every token of `s`."""
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)


def test_allocate_covers_prompt_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(9))  # 3 blocks
    assert bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_append_slot_takes_a_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(4))
    assert bm.allocate(s)
    s.output_token_ids.append(7)  # token 5 needs a second block
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2
    s.output_token_ids.append(8)  # token 6 fits in block 2
    bm.append_slot(s)
    assert len(s.block_table) == 2


def test_allocate_refuses_beyond_pool_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(9))
    assert not bm.allocate(s)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_hash_chains_over_the_whole_prefix():
    first = block_hash(None, (1, 2))
    assert block_hash(first, (3, 4)) != block_hash(block_hash(None, (9, 9)), (3, 4))


def test_shared_prefix_reuses_blocks_but_always_computes_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12), "a")  # 3 full blocks
    assert bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(12)) + [99], "b")
    assert bm.allocate(b)
    assert b.block_table[:3] == a.block_table and b.num_computed_tokens == 12
    assert b.num_cached_tokens == 12
    c = seq(range(12), "c")  # identical prompt: the last block is recomputed
    assert bm.allocate(c)
    assert c.block_table[:2] == a.block_table[:2] and c.num_computed_tokens == 8
    assert bm.stats.hit_tokens == 20 and bm.stats.queried_tokens == 12 + 13 + 12


def test_different_prefix_does_not_hit():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(8), "a")
    bm.allocate(a)
    computed(bm, a)
    b = seq([100] + list(range(1, 9)), "b")
    bm.allocate(b)
    assert b.num_computed_tokens == 0


def test_freed_cached_blocks_survive_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9), "a")  # blocks: 2 full + 1 partial
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = seq(range(9), "again")
    assert bm.allocate(again) and again.num_computed_tokens == 8  # still cached
    bm.free(again)
    # A different prompt that needs every block evicts the cached ones.
    other = seq(range(50, 66), "other")
    assert bm.allocate(other) and bm.num_free_blocks == 0
    bm.free(other)
    third = seq(range(9), "third")
    bm.allocate(third)
    assert third.num_computed_tokens == 0


def test_uncached_free_blocks_are_used_before_evicting_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(8), "a")
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)  # 2 cached free blocks, 2 never used
    b = seq(range(100, 108), "b")
    bm.allocate(b)
    bm.free(b)
    c = seq(range(8), "c")
    bm.allocate(c)
    assert c.num_computed_tokens == 4  # a's first block survived b


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(range(8), "a")
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(9), "b")
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and bm.cached == {}
