"""BlockManager: which KV blocks each sequence holds, with prefix sharing by block hash.

The KV pool has `num_blocks` blocks of `block_size` tokens. A block is free (in the free list) or
held by one or more sequences (`ref_count`). Prefix sharing, as in vLLM's prefix caching: once a
*full* block's KV has been computed it is registered under a hash chain,
`hash(parent block's hash, the block's token ids)`, so the hash names the whole prefix up to the
block's end. A new sequence whose leading full blocks hash-match reuses them and skips their
compute. A freed block keeps its hash and stays reusable until its slot is handed out again; the
free list is in release order, so the least recently freed block is reused first (LRU).

Only computed blocks are registered: a block allocated for a prompt chunk that has not run yet has
no KV to share. Shared blocks are never written again: only full blocks are shared, and a prefix
hit never covers a prompt's last token (logits need at least one token computed), so every write
lands in a block that its sequence holds alone.

A sequence with a `cache_salt` (chunk-cache reuse, `raymoe.engine.chunks`) mixes the salt into its
chain from the salt's first block on: its blended KV is shared only with requests of the same salt.

No torch here: this is bookkeeping over ints.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from raymoe.engine.block_hash import CacheSalt, block_hash, chain_parent

if TYPE_CHECKING:  # imports run one way: block_manager -> sequence -> sampling_params -> chunks -> block_hash
    from raymoe.engine.sequence import Sequence

__all__ = ["BlockManager", "CacheSalt", "block_hash", "chain_parent"]


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and its KV computed
        self.token_ids: tuple[int, ...] = ()  # kept with the hash to rule out collisions

    def reset(self) -> None:
        self.ref_count, self.hash, self.token_ids = 1, None, ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Ordered set of free block ids; the front is the least recently freed.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    # ----- admission -------------------------------------------------------------------------
    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the sequence's leading full blocks found in the cache, in order."""
        hits, parent = [], None
        max_blocks = (len(seq) - 1) // self.block_size  # leave the last token to compute
        if seq.needs_prompt_logprobs:  # every prompt position must run through the model
            max_blocks = 0
        for i in range(max_blocks):
            tokens = seq.block_tokens(i, self.block_size)
            parent = block_hash(chain_parent(parent, i, seq.cache_salt), tokens)
            block_id = self.hash_to_block_id.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self.prefix_hits(seq)
        num_hits_in_free_list = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks(self.block_size) - len(hits) + num_hits_in_free_list <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> int:
        """Give the sequence blocks for all its tokens; return how many leading tokens are cached."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self.prefix_hits(seq)
        for block_id in hits:
            self._share(block_id)
        seq.block_table = hits + [self._take_free() for _ in range(seq.num_blocks(self.block_size) - len(hits))]
        seq.num_hashed_blocks = len(hits)
        return len(hits) * self.block_size

    # ----- growth ----------------------------------------------------------------------------
    def num_missing_blocks(self, seq: Sequence) -> int:
        return max(0, seq.num_blocks(self.block_size) - len(seq.block_table))

    def can_append(self, seq: Sequence) -> bool:
        return self.num_missing_blocks(seq) <= self.num_free_blocks

    def may_append(self, seq: Sequence) -> None:
        """Add blocks so the table covers every token (a decode that crossed a block boundary)."""
        seq.block_table.extend(self._take_free() for _ in range(self.num_missing_blocks(seq)))

    def trim(self, seq: Sequence) -> None:
        """Return the blocks past the sequence's tokens (they held a rejected draft's KV) to the
        front of the free list: they hold nothing cached, so they are the first to reuse."""
        keep = seq.num_blocks(self.block_size)
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.hash is None, f"block {block_id} is shared or cached"
            block.ref_count = 0
            self.free_block_ids[block_id] = None
            self.free_block_ids.move_to_end(block_id, last=False)
        del seq.block_table[keep:]

    def cache_blocks(self, seq: Sequence) -> None:
        """Register the sequence's full, computed blocks for prefix sharing."""
        num_full = seq.num_cached_tokens // self.block_size
        for i in range(seq.num_hashed_blocks, num_full):
            parent = self.blocks[seq.block_table[i - 1]].hash if i else None
            tokens = seq.block_tokens(i, self.block_size)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = block_hash(chain_parent(parent, i, seq.cache_salt), tokens), tuple(tokens)
            self.hash_to_block_id[block.hash] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    # ----- release ---------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop the sequence's hold on its blocks; tail blocks first, so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    # ----- blocks from outside (a KV pool) ----------------------------------------------------
    def is_cached(self, hash_: int, token_ids: list[int]) -> bool:
        block_id = self.hash_to_block_id.get(hash_)
        return block_id is not None and self.blocks[block_id].token_ids == tuple(token_ids)

    def can_adopt(self) -> bool:
        return bool(self.free_block_ids)

    def adopt(self, hash_: int, token_ids: list[int]) -> int:
        """Take a free block for a full block whose KV the caller writes now (fetched from a pool);
        it stays free but cached, like a freed block, so the next allocation shares it.
        Returns its block id."""
        block_id = self._take_free()
        block = self.blocks[block_id]
        block.ref_count, block.hash, block.token_ids = 0, hash_, tuple(token_ids)
        self.hash_to_block_id[hash_] = block_id
        self.free_block_ids[block_id] = None  # most recently freed: evicted last
        return block_id

    # ----- internals -------------------------------------------------------------------------
    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        assert self.free_block_ids, "out of KV blocks: callers check can_allocate / can_append first"
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # its cached prefix is overwritten now
        block.reset()
        return block_id
