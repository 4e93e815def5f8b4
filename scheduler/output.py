"""What one scheduling step hands to the model runner, and the statistics it reports."""
from __future__ import annotations

from dataclasses import dataclass, field

from lenserve.scheduler.sequence import Sequence


@dataclass
class SchedulerOutput:
    """Sequences to run this step with their new-token counts.

    Sequences with more than one new token (prefills and prefill chunks) come first, then those
    with exactly one (decodes), matching the packed layout of AttentionMetadata.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_prefill_seqs: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.num_new_tokens[: self.num_prefill_seqs])

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        """Whether sequence i produces a token this step (its last uncomputed token is scheduled)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache (vLLM's semantics)
    prefix_cache_hits_total: int = 0  # of those, tokens found cached
    num_cached_blocks: int = 0  # blocks holding a registered prefix hash (in use or free)
    num_reserved_blocks: int = 0  # free blocks promised to running sequences (KV admission)
    num_reestimations_total: int = 0  # running sequences that outlived their predicted p90
    num_refinements_total: int = 0  # predictions replaced at the end of the prefill (length probe)
