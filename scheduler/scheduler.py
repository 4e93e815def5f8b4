"""Continuous-batching scheduler: chunked prefill, prefix reuse, preemption by recompute.

Each step first gives every running sequence its new tokens (one for a decode, a chunk of the
prompt for a prefill in progress), preempting the lowest-ranked running sequence when KV blocks
run out, then admits waiting sequences in policy order while the token budget, the sequence
limit and the free blocks allow.
"""
from __future__ import annotations

import heapq
import time
from typing import Mapping

from lenserve.scheduler.block_manager import BlockManager
from lenserve.scheduler.config import SchedulerConfig
from lenserve.scheduler.output import SchedulerOutput, SchedulerStats
from lenserve.scheduler.policies import QueuePolicy, make_policy
from lenserve.scheduler.sequence import Sequence, SequenceStatus


class WaitingQueue:
    """A heap ordered by the policy's key, with lazy removal of aborted sequences."""

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self._heap: list[tuple[tuple, int, Sequence]] = []
        self._members: set[int] = set()

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (self.policy.key(seq), seq.seq_no, seq))
        self._members.add(seq.seq_no)

    def _clean(self) -> None:
        while self._heap and self._heap[0][1] not in self._members:
            heapq.heappop(self._heap)

    def peek(self) -> Sequence | None:
        self._clean()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Sequence:
        self._clean()
        _, seq_no, seq = heapq.heappop(self._heap)
        self._members.discard(seq_no)
        return seq

    def remove(self, seq: Sequence) -> None:
        self._members.discard(seq.seq_no)

    def __contains__(self, seq: Sequence) -> bool:
        return seq.seq_no in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self):
        return (entry[2] for entry in self._heap if entry[1] in self._members)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: QueuePolicy | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.policy = policy if policy is not None else make_policy(config.policy)
        self.waiting = WaitingQueue(self.policy)
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions_total = 0
        self._watermark_blocks = int(config.watermark * block_manager.num_blocks)

    # ---- requests ----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"duplicate request_id {seq.request_id!r}")
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens; the model's context is {self.config.max_model_len} "
                "and at least one must be left for the response"
            )
        blocks = self.block_manager.num_blocks_for(seq.num_prompt_tokens + 1)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt needs {blocks} KV blocks but the cache has {self.block_manager.num_blocks}; "
                "raise the KV cache size or shorten the prompt"
            )
        seq.status = SequenceStatus.WAITING
        self.requests[seq.request_id] = seq
        self.waiting.push(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Stops a request wherever it is and frees its blocks; returns it, or None if unknown."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, SequenceStatus.FINISHED_ABORTED)
        return seq

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Ends a sequence for a reason found outside the scheduler (a stop string)."""
        self._finish(seq, status)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_reserved_blocks = 0
        seq.status = status
        seq.finished_time = time.monotonic()
        self.requests.pop(seq.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- scheduling ----------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_reserved_blocks = 0
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions_total += 1
        self.waiting.push(seq)

    def _victim(self) -> Sequence:
        return max(self.running, key=self.policy.key)

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_uncomputed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        now = time.monotonic()

        # Running sequences, in admission order; the lowest-ranked are preempted when blocks run out.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = self._num_new_tokens(seq, budget)
            if num_new == 0:
                continue
            needed = bm.num_new_blocks_needed(seq, seq.num_computed_tokens + num_new)
            while not bm.can_allocate(needed):
                victim = self._victim()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.allocate(seq, seq.num_computed_tokens + num_new)
            scheduled.append((seq, num_new))
            budget -= num_new

        # Waiting sequences, in policy order, while nothing had to be preempted.
        while not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.peek()
            if seq is None:
                break
            matched = bm.match_prefix(seq) if not seq.block_ids else []
            num_cached = len(matched) * bm.block_size
            remaining = seq.num_tokens - num_cached
            num_new = remaining if remaining <= budget else (budget if self.config.enable_chunked_prefill else 0)
            if num_new == 0:
                break
            total_blocks = bm.num_blocks_for(num_cached + num_new)
            free_after = bm.num_free_after_prefix(matched)
            if total_blocks - len(matched) + self._watermark_blocks > free_after:
                break
            self.waiting.pop()
            if matched:
                seq.num_computed_tokens = bm.take_prefix(seq, matched)
                seq.num_cached_tokens = seq.num_computed_tokens
            bm.allocate(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new

        prefills = [(s, n) for s, n in scheduled if n > 1]
        decodes = [(s, n) for s, n in scheduled if n == 1]
        ordered = prefills + decodes
        return SchedulerOutput(
            seqs=[s for s, _ in ordered],
            num_new_tokens=[n for _, n in ordered],
            num_prefill_seqs=len(prefills),
            preempted=preempted,
        )

    def update(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[Sequence]:
        """Advances the computed counts, appends sampled tokens and returns the sequences that finished."""
        finished: list[Sequence] = []
        now = time.monotonic()
        for seq, num_new in zip(output.seqs, output.num_new_tokens):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += num_new
            self.block_manager.commit_full_blocks(seq)
            token = sampled.get(seq.request_id)
            if token is None:
                continue
            seq.append_token(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            status = seq.check_stop(self.config.max_model_len)
            if status is not None:
                self._finish(seq, status)
                finished.append(seq)
        return finished

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        hit = bm.num_prefix_hit_tokens / bm.num_prefix_query_tokens if bm.num_prefix_query_tokens else 0.0
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage,
            num_preemptions_total=self.num_preemptions_total,
            prefix_cache_hit_rate=hit,
        )
