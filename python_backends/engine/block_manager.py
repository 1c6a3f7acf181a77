"""BlockManager: the paged KV cache's block pool, with automatic prefix caching.

Each sequence owns a block table: entry i is the physical block holding its tokens
[i * block_size, (i + 1) * block_size). A full block is identified by a hash chained over
the token ids of every block before it and its own (as in vLLM and nano-vllm), so two
prompts that share a prefix share its blocks. Blocks are reference counted; a freed block
that holds a cached prefix stays findable until it is evicted, least recently used first,
and only when no uncached free block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from python_backends.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    # Python's tuple-of-int hash is deterministic across runs (no hash randomization for
    # ints); collisions are caught by comparing token ids on lookup.
    return hash((parent, token_ids))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up in the cache
    hit_tokens: int = 0  # of those, found cached

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    # ------------------------------------------------------------------ allocation

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq` (never its last token: that one
        is always computed, so the step has logits to sample from)."""
        if not self.enable_prefix_caching:
            return []
        tokens = seq.all_token_ids
        hits: list[int] = []
        parent: int | None = None
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start : start + self.block_size])
            h = block_hash(parent, chunk)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
            parent = h
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks.

        Returns False (and changes nothing) when the pool cannot hold it now.
        """
        assert not seq.block_table, f"sequence {seq.request_id} already has blocks"
        hits = self._cached_prefix(seq)
        needed = seq.num_blocks_needed(self.block_size) - len(hits)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if self.num_free_blocks - reclaimed < needed:
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_cached.pop(block_id)
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(needed)]
        seq.block_hashes = [self.blocks[b].hash for b in hits]  # type: ignore[misc]
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.stats.queried_tokens += seq.num_prompt_tokens
            self.stats.hit_tokens += seq.num_computed_tokens
        return True

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next token of `seq` has a slot (a new block only at a boundary)."""
        needs_block = len(seq.block_table) * self.block_size < seq.num_tokens
        return not needs_block or self.num_free_blocks >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Make room for one more token; call before the decode step that writes it."""
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take_free_block())

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` whose tokens are all computed, for reuse by others."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        tokens = None
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            tokens = tokens or seq.all_token_ids
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, chunk)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash, block.token_ids = h, chunk
                self.cached[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        # Tail blocks first into the LRU: a sequence's last blocks are the least likely to
        # be shared, so they are evicted before its prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free_uncached.append(block_id)
                else:
                    self.free_cached[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.free_cached):
            self._uncache(self.blocks[block_id])
            self.free_uncached.append(block_id)
        self.free_cached.clear()

    def _take_free_block(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.popleft()
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the LRU cached block
            self._uncache(self.blocks[block_id])
        self.blocks[block_id].ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids = None, ()
