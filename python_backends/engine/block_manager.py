"""BlockManager: hands out fixed-size KV-cache blocks to sequences (a paged KV cache).

Each sequence owns a block table: the i-th entry is the physical block that holds its
tokens [i * block_size, (i + 1) * block_size). Blocks are reference counted so that a later
prefix cache can share them between sequences.
"""

from __future__ import annotations

from collections import deque

from python_backends.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks_needed(self.block_size)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for every token it has (prompt, plus outputs after preemption)."""
        assert not seq.block_table, f"sequence {seq.request_id} already has blocks"
        needed = seq.num_blocks_needed(self.block_size)
        if needed > self.num_free_blocks:
            raise RuntimeError("allocate() called without can_allocate()")
        seq.block_table = [self._take_block() for _ in range(needed)]

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next token of `seq` has a slot (a new block only at a boundary)."""
        needs_block = len(seq.block_table) * self.block_size < seq.num_tokens
        return not needs_block or self.num_free_blocks >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Make room for one more token; call before the decode step that writes it."""
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take_block())

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        self.ref_counts[block_id] = 1
        return block_id
