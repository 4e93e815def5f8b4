"""Routing policies as pure functions over what a router knows of each replica: one implementation,
called by the live Ray Serve routers (lenserve.server.ray_router) and by the cluster simulator
(lenserve.scheduler.cluster), so the two cannot drift.

- `PrefixIndex`: the prefix blocks one cache holds, or that a router believes it holds from its own
  routing history (SGLang's approximate tree), LRU over a capacity in blocks. Blocks are named by
  ids that stand for their whole prefix (Mooncake's `hash_ids`, the engine's chain hashes, or
  `text_block_ids` of a prompt), so a prefix match is the run of leading ids held. Text ids are the
  same in every process, so an engine replica can report which of them its prefix cache holds
  (lenserve.server.prefix_digest) in the router's own terms.
- `cache_aware_rank`: each replica's cost = prompt tokens it would have to prefill (the prompt less
  its longest cached prefix) at the scheduler's prompt weight + `length_weight` x its predicted
  outstanding work (response tokens), both in response-token units as
  `lenserve.scheduler.policies.predicted_work` counts work. SGLang's imbalance guard overrides it:
  when the replicas' ongoing requests differ by more than `balance_abs` and the busiest holds more
  than `balance_rel` x the idlest's, the fewest ongoing wins (so a block every prompt shares, such
  as a system prompt, cannot pull all traffic onto one replica).
- `ray_prefix_candidates`: the documented rule of Ray Serve's PrefixCacheAffinityRouter (ray.llm),
  for the simulator's labelled baseline: under balanced load, the replicas with the longest prefix
  match when it covers at least `match_rate_threshold` of the prompt, else those whose trees hold
  the fewest characters (here: blocks); power of two choices among them.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

TEXT_CHUNK_CHARS = 64  # characters per text block of `text_block_ids`


class PrefixIndex:
    """Prefix blocks held by one cache (LRU, `capacity_blocks` at most; inf: unbounded)."""

    def __init__(self, capacity_blocks: float = math.inf) -> None:
        if not capacity_blocks >= 1:
            raise ValueError(f"capacity must be >= 1 block, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self.blocks)

    def __contains__(self, block: int) -> bool:
        return block in self.blocks

    def match(self, ids: Sequence[int]) -> int:
        """How many leading ids of `ids` are held."""
        blocks = self.blocks
        n = 0
        for b in ids:
            if b not in blocks:
                break
            n += 1
        return n

    def insert(self, ids: Sequence[int]) -> None:
        """Holds `ids` (and refreshes them). The tail is touched first, so a prefix many chains
        share is the most recently used of them and is evicted after its tails."""
        blocks = self.blocks
        for b in reversed(ids):
            if b in blocks:
                blocks.move_to_end(b)
            else:
                blocks[b] = None
        self.shrink_to(self.capacity_blocks)

    def shrink_to(self, capacity_blocks: float) -> None:
        """Sets the capacity, evicting the least recently used blocks past it."""
        self.capacity_blocks = max(capacity_blocks, 1)
        blocks = self.blocks
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def remove(self, ids: Iterable[int]) -> None:
        for b in ids:
            self.blocks.pop(b, None)


def text_block_ids(text: str, chunk_chars: int = TEXT_CHUNK_CHARS) -> tuple[int, ...]:
    """Ids of a prompt's whole `chunk_chars`-character chunks, each standing for its whole prefix:
    what a router that sees text, not tokens, indexes prefixes by. Id j is a 64-bit BLAKE2b of the
    first j + 1 chunks' UTF-8 (one running hash), so it is the same in every process: a replica
    names the prefixes it caches with the ids its router computes."""
    out = []
    h = hashlib.blake2b(digest_size=8)
    for i in range(chunk_chars, len(text) + 1, chunk_chars):
        h.update(text[i - chunk_chars : i].encode("utf-8", "surrogatepass"))
        out.append(int.from_bytes(h.digest(), "little"))
    return tuple(out)


@dataclass(frozen=True)
class CacheAwarePolicy:
    prompt_weight: float = 0.3  # response tokens per prompt token prefilled (SchedulerConfig.prompt_weight)
    # Weight of the replica's predicted outstanding work. Well below 1: a continuously batched
    # replica shares its steps, so a newcomer is slowed by how many sequences run beside it (the
    # guard's business), far less than by their total work left, as it would be in a FIFO queue;
    # 0.1 from a sweep of {0, 0.1, 0.3, 1} (benchmarks/bench_prefix_routing.py), 0: prefix only.
    length_weight: float = 0.1
    balance_abs: float = 16.0  # guard: ongoing requests max - min above this ...
    balance_rel: float = 1.5  # ... and max above this x min: route by load alone

    def __post_init__(self) -> None:
        if self.prompt_weight < 0 or self.length_weight < 0 or self.balance_abs < 0 or self.balance_rel < 1:
            raise ValueError("need prompt_weight, length_weight, balance_abs >= 0 and balance_rel >= 1")


def imbalanced(ongoing: Sequence[float], balance_abs: float, balance_rel: float) -> bool:
    """SGLang's guard: the load is imbalanced when max - min > abs and max > rel x min."""
    lo, hi = min(ongoing), max(ongoing)
    return hi - lo > balance_abs and hi > balance_rel * lo


def cache_aware_costs(num_prompt_tokens: int, cached_tokens: Sequence[int], work: Sequence[float],
                      policy: CacheAwarePolicy) -> list[float]:
    """Per replica: prompt_weight x tokens to prefill there + length_weight x its outstanding work."""
    return [policy.prompt_weight * max(num_prompt_tokens - c, 0) + policy.length_weight * w for c, w in zip(cached_tokens, work)]


def cache_aware_rank(num_prompt_tokens: int, cached_tokens: Sequence[int], work: Sequence[float], ongoing: Sequence[float],
                     policy: CacheAwarePolicy, tiebreak: Sequence[float] | None = None) -> list[int]:
    """Replica indices, best first (see the module docstring). Ties fall to fewer ongoing requests,
    then to `tiebreak` (random draws, so that idle replicas share the first requests)."""
    n = len(ongoing)
    tb = tiebreak if tiebreak is not None else range(n)
    if n > 1 and imbalanced(ongoing, policy.balance_abs, policy.balance_rel):
        return sorted(range(n), key=lambda k: (ongoing[k], tb[k]))
    cost = cache_aware_costs(num_prompt_tokens, cached_tokens, work, policy)
    return sorted(range(n), key=lambda k: (cost[k], ongoing[k], tb[k]))


def ray_prefix_candidates(match_frac: Sequence[float], tree_blocks: Sequence[int], ongoing: Sequence[float], *,
                          imbalanced_threshold: float = math.inf, match_rate_threshold: float = 0.1) -> list[int]:
    """Ray Serve's PrefixCacheAffinityRouter rule (its defaults): the replicas it would then pick
    two of at random, the fewer ongoing winning."""
    n = len(ongoing)
    if max(ongoing) - min(ongoing) > imbalanced_threshold:
        return list(range(n))
    best = max(match_frac)
    if best >= match_rate_threshold and best > 0:
        return [k for k in range(n) if match_frac[k] == best]
    fewest = min(tree_blocks)
    return [k for k in range(n) if tree_blocks[k] == fewest]
