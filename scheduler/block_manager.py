"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, with prefix sharing.

Pure Python: the engine owns the cache tensors, this owns the block ids. Full blocks are
content-hashed (a chain over the block's tokens and its predecessor) so a later sequence with
the same prefix reuses them; a freed block keeps its hash until it is handed out again, so the
free count always includes cached-but-unused blocks.
"""
from __future__ import annotations

from collections import OrderedDict

from lenserve.scheduler.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in eviction order (least recently freed first); values unused.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0

    # ---- accounting ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs for `num_tokens` slots."""
        return max(self.num_blocks_for(num_tokens) - len(seq.block_ids), 0)

    def can_allocate(self, num_blocks: int, watermark_blocks: int = 0) -> bool:
        return num_blocks + watermark_blocks <= self.num_free_blocks

    # ---- prefix cache ----------------------------------------------------------------------------
    @staticmethod
    def _chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`; the last token is never matched (it must be computed)."""
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        parent = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain_hash(parent, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            matched.append(block)
            parent = h
        return matched

    def num_free_after_prefix(self, matched: list[int]) -> int:
        """Free blocks left once `matched` cached blocks are taken (free cached blocks leave the free pool)."""
        return self.num_free_blocks - sum(1 for b in matched if self.ref_counts[b] == 0)

    def take_prefix(self, seq: Sequence, matched: list[int]) -> int:
        """Gives `seq` the matched cached blocks; returns the number of tokens they hold."""
        assert not seq.block_ids, "take_prefix on a sequence that owns blocks"
        for b in matched:
            if self.ref_counts[b] == 0:
                del self.free_blocks[b]
            self.ref_counts[b] += 1
        seq.block_ids = list(matched)
        return len(matched) * self.block_size

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """One prefix-cache lookup of a sequence being admitted, hit or not (vLLM counts the same)."""
        if self.enable_prefix_caching:
            self.num_prefix_query_tokens += num_query_tokens
            self.num_prefix_hit_tokens += num_hit_tokens

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Registers the hashes of `seq`'s blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_ids))
        parent = None
        for i in range(num_full):
            block = seq.block_ids[i]
            h = self.block_hashes[block]
            if h is None:
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                h = self._chain_hash(parent, tokens)
                self.block_hashes[block] = h
                self.block_tokens[block] = tokens
                self.hash_to_block.setdefault(h, block)
            parent = h

    # ---- allocation ------------------------------------------------------------------------------
    def _pop_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        h = self.block_hashes[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hashes[block] = None
            self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows `seq`'s block list to hold `num_tokens` slots. Raises if blocks run out."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_ids)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free_blocks} free")
        if self.enable_prefix_caching:
            for _ in range(needed):
                seq.block_ids.append(self._pop_free_block())
            return
        # No hashes to clear: take blocks straight off the free list (the simulator's hot path).
        popitem, ref_counts, block_ids = self.free_blocks.popitem, self.ref_counts, seq.block_ids
        for _ in range(needed):
            block = popitem(last=False)[0]
            ref_counts[block] = 1
            block_ids.append(block)

    def free(self, seq: Sequence) -> None:
        """Releases `seq`'s blocks; the tail is freed first so shared prefixes are evicted last."""
        for block in reversed(seq.block_ids):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_ids = []

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def reset_prefix_cache(self) -> None:
        for block in self.free_blocks:
            self.block_hashes[block] = None
            self.block_tokens[block] = None
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_counts[b] > 0}
