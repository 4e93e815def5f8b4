"""What an engine replica tells the cache-aware router (lenserve.server.ray_router) about its prefix
cache, in the router's own terms: which text block ids (lenserve.scheduler.routing.text_block_ids)
of the prompts it served are still cached.

For each completion prompt it serves, the replica takes the token ids the engine gets and notes,
for each whole chunk, the chain hash of the KV block that holds the token containing the chunk's
last character (the tokenizer's character offsets say which token that is); the engine's block
manager names its cached blocks by the same hashes. A chunk is held while that hash is in the
block manager's prefix cache: `report()` lists those ids, so the router sees what the engine
evicted, and what other ingresses sent it.

Exact for the prompt that was served; a later prompt sharing its first chunks may tokenize the last
shared word differently, so its own cache hit can end up to a block short of what the digest says.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Sequence

from lenserve.scheduler.routing import TEXT_CHUNK_CHARS, text_block_ids

CHARS_DECAY = 0.99  # per prompt: the characters-per-token ratio follows the last few hundred prompts
DIGEST_IDS_PER_BLOCK = 2  # text ids remembered per KV block (a block of 16 tokens is ~1 chunk of 64 characters)


def chunk_end_tokens(offsets: Sequence[tuple[int, int]], num_chunks: int, chunk_chars: int) -> list[int]:
    """For chunk j (characters up to chunk_chars x (j + 1)), the index of the token that holds its
    last character, for as many leading chunks as the tokens reach. `offsets` are the tokens'
    (start, end) characters, in order; whitespace a token's offsets leave out (byte-level BPE trims
    a leading space) belongs to the token after it, and a character split over several tokens
    (byte fallback) ends in the last of them."""
    out: list[int] = []
    n = len(offsets)
    t = 0
    for j in range(num_chunks):
        end = chunk_chars * (j + 1)
        while t < n and offsets[t][1] < end:
            t += 1
        if t == n:
            break
        while t + 1 < n and offsets[t + 1][0] < end:
            t += 1
        out.append(t)
    return out


class PrefixDigest:
    """Text id -> chain hash of the KV block its chunk ends in, LRU over `max_ids` (default
    DIGEST_IDS_PER_BLOCK x the cache's blocks). `record` runs on the replica's event loop, `report`
    where Ray Serve asks for routing stats; the engine core changes the block manager meanwhile,
    which is only read by single dict lookups."""

    def __init__(self, block_manager, chunk_chars: int = TEXT_CHUNK_CHARS, max_ids: int | None = None) -> None:
        self.block_manager = block_manager
        self.chunk_chars = chunk_chars
        self.max_ids = max_ids if max_ids is not None else DIGEST_IDS_PER_BLOCK * block_manager.num_blocks
        self._block_of: OrderedDict[int, int] = OrderedDict()  # least recently served first
        self._lock = threading.Lock()
        # characters and tokens of the prompts served, decayed per prompt (CHARS_DECAY): the ratio
        # the router estimates a prompt's tokens with from its text
        self._chars = 0.0
        self._tokens = 0.0

    def record(self, text: str, token_ids: list[int], offsets: Sequence[tuple[int, int]]) -> None:
        """Notes a completion prompt about to be served: its text, the engine's token ids for it and
        each token's (start, end) characters (OpenAIServingBase.encode_prompt hands them over)."""
        if token_ids:
            with self._lock:
                self._chars = CHARS_DECAY * self._chars + len(text)
                self._tokens = CHARS_DECAY * self._tokens + len(token_ids)
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return
        ids = text_block_ids(text, self.chunk_chars)
        if not ids:
            return
        ends = chunk_end_tokens(offsets, len(ids), self.chunk_chars)
        bs = bm.block_size
        num_blocks = min(len(token_ids) // bs, ends[-1] // bs + 1) if ends else 0  # only full blocks are cached
        hashes = []
        parent = None
        for i in range(num_blocks):
            parent = bm._chain_hash(parent, tuple(token_ids[i * bs : (i + 1) * bs]))
            hashes.append(parent)
        pairs = [(text_id, hashes[t // bs]) for text_id, t in zip(ids, ends) if t // bs < num_blocks]
        with self._lock:
            block_of = self._block_of
            for text_id, h in reversed(pairs):  # the tail first: a shared prefix is the most recent
                block_of[text_id] = h
                block_of.move_to_end(text_id)
            while len(block_of) > self.max_ids:
                block_of.popitem(last=False)

    def report(self) -> dict:
        """{"prefix_digest": the frozenset of text ids whose block is cached now, "prefix_digest_time":
        unix time, taken before the cache is read, "chars_per_token": of the prompts served, once
        there are some}. A frozenset, so that the router's intake of it
        (DigestIndex.update: frozenset() of a frozenset is that object) costs nothing in a routing
        decision: Ray Serve unpickles the stats outside it."""
        at = time.time()
        with self._lock:
            items = list(self._block_of.items())
            ratio = self._chars / self._tokens if self._tokens else None
        cached = self.block_manager.hash_to_block
        out = {"prefix_digest": frozenset(text_id for text_id, h in items if h in cached), "prefix_digest_time": at}
        if ratio is not None:
            out["chars_per_token"] = ratio
        return out
