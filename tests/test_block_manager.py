import pytest

from python_backends.engine.block_manager import BlockManager
from python_backends.engine.sampling import SamplingParams
from python_backends.engine.sequence import Sequence


def seq(n_tokens: int) -> Sequence:
    return Sequence("r", list(range(n_tokens)), SamplingParams(max_tokens=8))


def test_allocate_covers_prompt_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(9)  # 3 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_append_slot_takes_a_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(4)
    bm.allocate(s)  # exactly one full block
    s.output_token_ids.append(7)  # token 5 needs a second block
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2
    s.output_token_ids.append(8)  # token 6 fits in block 2
    bm.append_slot(s)
    assert len(s.block_table) == 2


def test_cannot_allocate_beyond_pool():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(seq(9))
    with pytest.raises(RuntimeError):
        bm.allocate(seq(9))


def test_can_append_false_when_pool_empty_at_boundary():
    bm = BlockManager(num_blocks=1, block_size=4)
    s = seq(4)
    bm.allocate(s)
    s.output_token_ids.append(1)
    assert not bm.can_append(s)
