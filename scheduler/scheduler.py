"""Length-aware continuous batching: policy-ordered admission, prepacking, buckets, KV reservation.

Each step first gives every running sequence its new tokens (one for a decode, a chunk of the
prompt for a prefill in progress); a sequence that needs a KV block beyond its reservation when
none is free preempts (by recompute) the lowest-ranked running sequence. Then, if nothing was
preempted, waiting sequences are admitted in policy order:

- continuous batching admits every step: the head of the queue and the sequences after it (in
  the head's length bucket first, with `bucket_affinity`) while sequence slots and KV blocks
  allow; their prompts are prepacked into the step's token budget, long ones chunked;
- bucketed batching (the static baseline) admits a whole batch from one bucket when the
  previous batch has finished.

KV admission counts, for each sequence, the blocks it holds plus those reserved for it
(`Sequence.num_reserved_blocks`, promised but not yet allocated): prompt only, prompt + the
predicted p90, or prompt + max_tokens. Reserved blocks stay in the free pool; the scheduler
keeps `num_free_blocks >= num_reserved_blocks`, so growth inside a reservation never fails.

The simulator drives this same class with a virtual clock; `decode_horizon` and `fast_forward`
let it take runs of identical decode steps at once.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping

from lenserve.predictor.types import LengthPrediction
from lenserve.scheduler.block_manager import BlockManager
from lenserve.scheduler.config import SchedulerConfig
from lenserve.scheduler.cost_model import CostModel, OnlineCostModel, step_features
from lenserve.scheduler.estimates import reestimate
from lenserve.scheduler.output import SchedulerOutput, SchedulerStats
from lenserve.scheduler.packing import prepack
from lenserve.scheduler.policies import QueuePolicy, make_policy, predicted_work
from lenserve.scheduler.sequence import Sequence, SequenceStatus
from lenserve.scheduler.step_budget import prefill_token_budget
from lenserve.scheduler.waiting_queue import WaitingQueue, bucket_key

RUNNING = SequenceStatus.RUNNING
STEP_TIME_EWMA = 0.05  # weight of the newest busy step in step_time_s
REKEY_DRIFT = 0.2  # max_latency_s: latest starts are recomputed when step_time_s moves this much


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        policy: QueuePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        cost_model: CostModel | OnlineCostModel | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.policy = policy if policy is not None else make_policy(config.policy, config.aging_tok_per_step, config.prompt_weight)
        self.clock = clock
        self._wait_bound = config.fcfs_wait_bound
        self._prompt_weight = config.prompt_weight
        self.waiting = WaitingQueue(
            self.policy,
            config.max_wait_s,
            by_bucket=config.batching == "bucketed" or config.bucket_affinity,
            work_fn=(lambda seq: predicted_work(seq, self._prompt_weight)) if self._wait_bound else None,
            max_latency_s=config.max_latency_s,
            service_s=self.predicted_service_s,
        )
        # Seconds per engine step (an exponential average over the steps the driver reports with
        # record_step_time; None until one is).
        self.step_time_s: float | None = None
        self._keyed_step_time_s: float | None = None  # the step_time_s the latest starts were computed with
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions_total = 0
        self.num_reestimations_total = 0
        self.num_refinements_total = 0  # predictions replaced by the served model's own (refine)
        self.num_reserved_blocks = 0  # sum of the running sequences' num_reserved_blocks
        self.num_steps = 0  # schedule() calls (and fast-forwarded steps): the aging clock
        # Work done (the fcfs_wait_bound clock), kept as integer counts so it is exact.
        self.num_sampled_total = 0
        self.num_prompt_computed_total = 0
        self._watermark_blocks = int(config.watermark * block_manager.num_blocks)
        self._bucketed = config.batching == "bucketed"
        # What a step costs (target_itl_s budgets with it): a fixed model (the simulator's) or one
        # refitted from the steps the driver reports (the engine's); None: the budget is the cap.
        self.cost_model = cost_model
        self.last_token_budget = config.max_num_batched_tokens  # the budget of the latest schedule()
        self._last_features: dict | None = None  # step_features of the latest schedule(), for the online fit
        # Called with each sequence about to start (admission), before its prompt is packed: the
        # simulator's replicas look their prefix caches up here, when an engine's block manager
        # does, rather than at arrival (None: nothing).
        self.prefix_lookup: Callable[[Sequence], None] | None = None

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
        if not self.config.enable_chunked_prefill and seq.num_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens, more than max_num_batched_tokens "
                f"({self.config.max_num_batched_tokens}) with chunked prefill disabled"
            )
        # A response never outgrows the whole cache (it could never be scheduled again).
        cache_tokens = self.block_manager.num_blocks * self.block_manager.block_size
        seq.max_tokens = min(seq.max_tokens, cache_tokens - seq.num_prompt_tokens)
        if seq.arrival_step is None:
            seq.arrival_step = self.num_steps
        if self._wait_bound and seq.wait_deadline is None:
            seq.wait_deadline = self.wait_deadline(self.work_done)
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
        elif seq.status is RUNNING:
            self.running.remove(seq)
        self._release(seq)
        seq.status = status
        seq.finished_time = self.clock()
        self.requests.pop(seq.request_id, None)

    def _release(self, seq: Sequence) -> None:
        """Frees the sequence's blocks and its reservation."""
        self.block_manager.free(seq)
        self.num_reserved_blocks -= seq.num_reserved_blocks
        seq.num_reserved_blocks = 0

    @property
    def work_done(self) -> float:
        """Work done so far, in response tokens (prompt tokens at prompt_weight)."""
        return self.num_sampled_total + self._prompt_weight * self.num_prompt_computed_total

    def wait_deadline(self, work_done: float) -> float:
        """The wait_deadline of a sequence arriving when `work_done` work is done: fcfs would
        start it once the work queued now is done; it may wait fcfs_wait_bound times that."""
        return work_done + self._wait_bound * self.waiting.total_work

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- KV accounting -----------------------------------------------------------------------------
    @property
    def num_unreserved_blocks(self) -> int:
        """Free blocks nobody has been promised."""
        return self.block_manager.num_free_blocks - self.num_reserved_blocks

    def target_tokens(self, seq: Sequence) -> int:
        """Tokens of KV the sequence is expected to need, by the kv_reserve mode."""
        mode = self.config.kv_reserve
        if mode == "none":
            return seq.num_tokens
        if mode == "max" or seq.estimate is None:
            num_output = seq.max_tokens
        else:
            num_output = min(max(math.ceil(seq.estimate.p90), seq.num_output_tokens + 1), seq.max_tokens)
        return max(min(seq.num_prompt_tokens + num_output, self.config.max_model_len), seq.num_tokens)

    def _admission_blocks(self, seq: Sequence, matched: list[int]) -> int:
        """Blocks admitting `seq` takes out of the unreserved pool: new ones plus cached free ones it reuses."""
        bm = self.block_manager
        num_new = max(bm.num_blocks_for(self.target_tokens(seq)) - len(matched), 0)
        return num_new + sum(1 for b in matched if bm.ref_counts[b] == 0)

    def _grow(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Gives `seq` blocks for `num_tokens` slots, from its reservation first, preempting the
        lowest-ranked sequences while the unreserved pool is short. False if `seq` itself went."""
        bm = self.block_manager
        needed = bm.num_blocks_for(num_tokens) - len(seq.block_ids)
        from_reserve = min(needed, seq.num_reserved_blocks)
        while needed - from_reserve > bm.num_free_blocks - self.num_reserved_blocks:
            victim = self._victim()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        bm.allocate(seq, num_tokens)
        seq.num_reserved_blocks -= from_reserve
        self.num_reserved_blocks -= from_reserve
        return True

    def _victim(self) -> Sequence:
        return max(self.running, key=self.policy.key)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions_total += 1
        self.waiting.push(seq)

    # ---- scheduling ----------------------------------------------------------------------------------
    def predicted_service_s(self, seq: Sequence) -> float:
        """Seconds `seq` is expected to take from its start: its predicted remaining tokens, one a
        step, at step_time_s (0 without a measured step)."""
        if self.step_time_s is None:
            return 0.0
        return seq.predicted_remaining * self.step_time_s

    def record_step_time(self, seconds: float, num_steps: int = 1) -> float | None:
        """The driver reports that `num_steps` steps took `seconds` (the engine after each step,
        the simulator after each step or run of steps): step_time_s follows them. Returns the
        step's measured over predicted time when the cost model measured it (else None)."""
        if num_steps <= 0 or not seconds > 0:
            return None
        ratio = None
        if num_steps == 1 and self._last_features is not None:
            ratio = self.cost_model.observe(self._last_features, seconds)  # an OnlineCostModel set them
            self._last_features = None
        sample = seconds / num_steps
        # as `num_steps` updates with the mean step would (the simulator takes runs of steps at once)
        weight = 1.0 - (1.0 - STEP_TIME_EWMA) ** num_steps
        self.step_time_s = sample if self.step_time_s is None else self.step_time_s + weight * (sample - self.step_time_s)
        keyed = self._keyed_step_time_s
        if self.config.max_latency_s is not None and (keyed is None or abs(self.step_time_s - keyed) > REKEY_DRIFT * keyed):
            self._keyed_step_time_s = self.step_time_s
            self.waiting.rekey_starts()
        return ratio

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        self.num_steps += 1
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        # Decodes first, then prompts in progress in policy order: a decode is never left without
        # budget behind a long prompt's chunk (stall-free batching).
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = sorted((s for s in self.running if s.num_tokens - s.num_computed_tokens > 1), key=self.policy.key)
        budget = self.token_budget(decodes, prefills)
        self.last_token_budget = budget
        if self.running and self._waiting_goes_first(now, prefills):
            # Decodes, then the shorter waiting prompts, then the prompts in progress (which keep
            # min_prefill_chunk of the step, so none waits forever).
            budget = self._schedule_running(decodes, budget, scheduled, preempted)
            keep = min(self.config.min_prefill_chunk, prefills[0].num_tokens - prefills[0].num_computed_tokens)
            if not preempted and budget > keep and len(self.running) < self.config.max_num_seqs:
                before = sum(n for _, n in scheduled)
                self._admit(now, budget - keep, scheduled)
                budget -= sum(n for _, n in scheduled) - before
            budget = self._schedule_running(prefills, budget, scheduled, preempted)
        elif self.running:
            budget = self._schedule_running(decodes + prefills, budget, scheduled, preempted)
        if not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs and self.waiting:
            if self._bucketed:
                if not self.running:
                    self._admit_batch(now, budget, scheduled)
            else:
                self._admit(now, budget, scheduled)

        prefill_work = [(s, n) for s, n in scheduled if n > 1]
        ordered = prefill_work + [(s, n) for s, n in scheduled if n == 1]
        if isinstance(self.cost_model, OnlineCostModel):
            self._last_features = step_features(ordered)
        return SchedulerOutput(
            seqs=[s for s, _ in ordered],
            num_new_tokens=[n for _, n in ordered],
            num_prefill_seqs=len(prefill_work),
            preempted=preempted,
        )

    def _waiting_goes_first(self, now: float, prefills: list[Sequence]) -> bool:
        """Whether the waiting queue's head starts ahead of the prompts in progress this step
        (SchedulerConfig.prefill_srpt): under a target, with a length-aware policy, when its
        policy key is the smaller."""
        cfg = self.config
        if not (cfg.prefill_srpt and cfg.target_itl_s is not None and prefills and self.waiting and cfg.policy != "fcfs"
                and not self._bucketed):
            return False
        head = self.waiting.peek(now, self.work_done)
        return head is not None and self.policy.key(head) < self.policy.key(prefills[0])

    def token_budget(self, decodes: list[Sequence], prefills: list[Sequence]) -> int:
        """This step's token budget: max_num_batched_tokens, or under target_itl_s what keeps the
        running decodes within it by the cost model (step_budget.prefill_token_budget), the target
        discounted by the online model's overrun; the chunk that comes first is the first prompt
        in progress (its cached context counts)."""
        cfg = self.config
        if cfg.target_itl_s is None:
            return cfg.max_num_batched_tokens
        cost, target = self._step_cost_model()
        chunk_context = prefills[0].num_computed_tokens if prefills else 0
        return prefill_token_budget(cost, decodes, target, cfg.max_num_batched_tokens, cfg.min_prefill_chunk, chunk_context)

    def _schedule_running(self, order: list[Sequence], budget: int, scheduled: list, preempted: list) -> int:
        """New tokens for the running sequences in `order`; returns the budget left."""
        bs = self.block_manager.block_size
        chunked = self.config.enable_chunked_prefill
        for seq in order:
            if budget == 0:
                break
            if seq.status is not RUNNING:
                continue  # preempted earlier in this loop
            num_new = seq.num_tokens - seq.num_computed_tokens
            if num_new > budget:
                if not chunked:
                    continue
                num_new = budget
            num_tokens = seq.num_computed_tokens + num_new
            if num_tokens > len(seq.block_ids) * bs and not self._grow(seq, num_tokens, preempted):
                continue
            scheduled.append((seq, num_new))
            budget -= num_new
        if preempted:  # a victim may have been scheduled earlier in the loop
            kept = [(s, n) for s, n in scheduled if s.status is RUNNING]
            budget += sum(n for _, n in scheduled) - sum(n for _, n in kept)
            scheduled[:] = kept
        return budget

    def _match(self, seq: Sequence) -> list[int]:
        bm = self.block_manager
        return bm.match_prefix(seq) if bm.enable_prefix_caching and not seq.block_ids else []

    def _admit(self, now: float, budget: int, scheduled: list) -> None:
        """Continuous batching: picks sequences from the front of the queue, then prepacks them.

        A sequence whose group (the other samples of its prompt) has a prompt still being computed
        waits until that is done and then takes the prompt from the prefix cache: a request with
        n = 10 computes its prompt once, not ten times. When the head itself waits so, nothing is
        admitted this step (the sibling's prefill is running and ends within a few steps)."""
        cfg = self.config
        available = self.num_unreserved_blocks - self._watermark_blocks
        head = self.waiting.peek(now, self.work_done)
        prefilling = self._prefilling_groups()
        if self._waits_for_sibling(head, prefilling):
            return
        matched = self._match(head)
        need = self._admission_blocks(head, matched)
        if need > available and (self.running or not self._fits_alone(head, matched)):
            return  # the head waits for memory, and nothing passes it (it could wait forever)
        room = self._stream_room()
        if self.running and self._stream_cost(head) > room:
            return  # another stream would carry every step past target_itl_s: the head waits for one to end
        self.waiting.remove(head)
        selected = [(head, matched)]
        available -= need
        room -= self._stream_cost(head)
        self._note_prefill(head, matched, prefilling)
        free_slots = cfg.max_num_seqs - len(self.running)
        head_bucket = bucket_key(head) if cfg.bucket_affinity else None
        far: list[Sequence] = []  # outside the head's bucket neighbourhood: considered last
        skipped: list[Sequence] = []
        examined = 1
        # Look past the budget (up to the window) so first-fit decreasing has prompts to fit in.
        while len(selected) < free_slots and examined < cfg.admission_window:
            seq = self.waiting.pop(now, self.work_done)
            if seq is None:
                break
            examined += 1
            if head_bucket is not None and not _near(bucket_key(seq), head_bucket):
                far.append(seq)
                continue
            available, room = self._select(seq, available, room, selected, skipped, prefilling)
        for seq in far:
            if len(selected) < free_slots:
                available, room = self._select(seq, available, room, selected, skipped, prefilling)
            else:
                skipped.append(seq)
        for seq in skipped:
            self.waiting.push(seq)
        self._start(now, selected, budget, scheduled, static=False)

    def _select(self, seq: Sequence, available: int, room: float, selected: list, skipped: list,
                prefilling: set[str]) -> tuple[int, float]:
        """Selects `seq` if its blocks and its stream fit and no sibling is computing its prompt;
        returns the blocks and the stream room (seconds of a decode step) still available."""
        cost = self._stream_cost(seq)
        if self._waits_for_sibling(seq, prefilling) or cost > room:
            skipped.append(seq)
            return available, room
        matched = self._match(seq)
        need = self._admission_blocks(seq, matched)
        if need > available:
            skipped.append(seq)
            return available, room
        selected.append((seq, matched))
        self._note_prefill(seq, matched, prefilling)
        return available - need, room - cost

    def _step_cost_model(self) -> tuple[CostModel | None, float]:
        """The cost model the budget is chosen with, and the target_itl_s to hold it to (the
        online model's overrun taken off); (None, inf) without a target."""
        target = self.config.target_itl_s
        if target is None:
            return None, math.inf
        cost = self.cost_model
        if isinstance(cost, OnlineCostModel):
            return cost.model, target / cost.overrun
        return cost, target

    def _stream_room(self) -> float:
        """Seconds left under target_itl_s in a plain decode step of every running sequence
        (inf without a target or a cost model): what admitting more streams may spend."""
        cost, target = self._step_cost_model()
        if cost is None:
            return math.inf
        return target - cost.decode_time(len(self.running), sum(s.num_tokens for s in self.running), 1)

    def _stream_cost(self, seq: Sequence) -> float:
        """What one more stream adds to every decode step (its row and its context)."""
        cost, _ = self._step_cost_model()
        if cost is None:
            return 0.0
        return cost.decode_time(1, seq.num_tokens, 1) - cost.step_base_s

    def _prefilling_groups(self) -> set[str]:
        """Groups with a running sequence that has more than a block of its prompt still to compute
        (less than that is the partial last block, which no sibling could take from the cache)."""
        bs = self.block_manager.block_size
        return {s.group_id for s in self.running if s.group_id is not None and s.num_prompt_tokens - s.num_computed_tokens > bs}

    def _note_prefill(self, seq: Sequence, matched: list[int], prefilling: set[str]) -> None:
        """Marks `seq`'s group as prefilling when, admitted now, it computes more than a block of its prompt."""
        bs = self.block_manager.block_size
        if seq.group_id is not None and seq.num_prompt_tokens - len(matched) * bs > bs:
            prefilling.add(seq.group_id)

    def _waits_for_sibling(self, seq: Sequence, prefilling: set[str]) -> bool:
        """Whether `seq` should wait for a sibling's prompt to land in the prefix cache: its
        group is computing the prompt, the cache is on, and the prompt fills at least one block."""
        return (seq.group_id in prefilling and self.block_manager.enable_prefix_caching and not seq.block_ids
                and seq.num_prompt_tokens > self.block_manager.block_size)

    def _fits_alone(self, seq: Sequence, matched: list[int]) -> bool:
        """Whether `seq`'s prompt (without its output reservation) fits the unreserved pool."""
        bm = self.block_manager
        num_new = max(bm.num_blocks_for(seq.num_tokens) - len(matched), 0)
        return num_new + sum(1 for b in matched if bm.ref_counts[b] == 0) <= self.num_unreserved_blocks

    def _admit_batch(self, now: float, budget: int, scheduled: list) -> None:
        """Bucketed (static) batching: the head, its bucket, then the neighbouring buckets fill one batch."""
        cfg = self.config
        available = self.num_unreserved_blocks - self._watermark_blocks
        head = self.waiting.peek(now, self.work_done)
        matched = self._match(head)
        need = self._admission_blocks(head, matched)
        if need > available and not self._fits_alone(head, matched):
            return
        self.waiting.remove(head)
        selected = [(head, matched)]
        available -= need
        b = bucket_key(head)
        for buckets in ([b], [b - 1, b + 1] if b is not None else []):
            while len(selected) < cfg.max_num_seqs:
                seq = self.waiting.pop_from_buckets(buckets)
                if seq is None:
                    break
                matched = self._match(seq)
                need = self._admission_blocks(seq, matched)
                if need > available:
                    self.waiting.push(seq)
                    break
                selected.append((seq, matched))
                available -= need
        self._start(now, selected, budget, scheduled, static=True)

    def _start(self, now: float, selected: list, budget: int, scheduled: list, static: bool) -> None:
        """Prepacks the selected prompts into the budget and starts those that got tokens (all of
        them for a static batch; the rest of a continuous selection goes back to the queue)."""
        bm = self.block_manager
        if self.prefix_lookup is not None:
            for seq, _ in selected:
                self.prefix_lookup(seq)
        takes = prepack(
            # (a sequence may arrive with a computed prefix: the simulator's cached tokens)
            [seq.num_tokens - max(len(matched) * bm.block_size, seq.num_computed_tokens) for seq, matched in selected],
            budget,
            self.config.enable_chunked_prefill,
        )
        for (seq, matched), num_new in zip(selected, takes):
            # An admission earlier in this loop may have reused a cached free block this one matched.
            if (num_new == 0 and not static) or (matched and self._match(seq) != matched):
                self.waiting.push(seq)
                continue
            if matched:
                seq.num_computed_tokens = bm.take_prefix(seq, matched)
                seq.num_cached_tokens = seq.num_computed_tokens
            bm.record_lookup(seq.num_tokens, len(matched) * bm.block_size)
            num_new = min(num_new, seq.num_tokens - seq.num_computed_tokens)
            if num_new:
                bm.allocate(seq, seq.num_computed_tokens + num_new)
            reserve = min(bm.num_blocks_for(self.target_tokens(seq)) - len(seq.block_ids), self.num_unreserved_blocks)
            if reserve > 0:
                seq.num_reserved_blocks = reserve
                self.num_reserved_blocks += reserve
            seq.status = RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            if num_new:
                scheduled.append((seq, num_new))

    # ---- results -------------------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[Sequence]:
        """Advances the computed counts, appends sampled tokens and returns the sequences that finished."""
        finished: list[Sequence] = []
        now = self.clock()
        bm = self.block_manager
        caching = bm.enable_prefix_caching
        max_len = self.config.max_model_len
        num_sampled = num_prompt = 0
        for seq, num_new in zip(output.seqs, output.num_new_tokens):
            if seq.status is not RUNNING:
                continue  # aborted while the step ran
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                num_prompt += min(seq.num_computed_tokens + num_new, seq.num_prompt_tokens) - seq.num_computed_tokens
            seq.num_computed_tokens += num_new
            if caching:
                bm.commit_full_blocks(seq)
            token = sampled.get(seq.request_id)
            if token is None:
                continue
            num_sampled += 1
            seq.append_token(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            status = seq.check_stop(max_len)
            if status is not None:
                self._finish(seq, status)
                finished.append(seq)
            elif seq.estimate is not None and seq.num_output_tokens > seq.estimate.p90:
                self._reestimate(seq)
        self.num_sampled_total += num_sampled
        self.num_prompt_computed_total += num_prompt
        return finished

    def _reestimate(self, seq: Sequence) -> None:
        """The sequence outlived its p90: a longer estimate, and a reservation topped up to match
        as far as unreserved blocks allow."""
        seq.estimate = reestimate(seq.prediction or seq.estimate, seq.num_output_tokens, seq.max_tokens)
        self.num_reestimations_total += 1
        if self.config.kv_reserve == "predicted":
            self._resize_reservation(seq, release_surplus=False)

    def _resize_reservation(self, seq: Sequence, release_surplus: bool) -> None:
        """Moves `seq`'s reservation toward what its estimate wants (`target_tokens`): a shortfall
        is granted as far as unreserved blocks allow; with `release_surplus`, blocks beyond it go
        back to the pool."""
        wanted = max(self.block_manager.num_blocks_for(self.target_tokens(seq)) - len(seq.block_ids), 0)
        change = wanted - seq.num_reserved_blocks
        if change > 0:
            change = min(change, self.num_unreserved_blocks - self._watermark_blocks)
            if change <= 0:
                return
        elif not release_surplus:
            return
        seq.num_reserved_blocks += change
        self.num_reserved_blocks += change

    def refine(self, seq: Sequence, prediction: LengthPrediction) -> None:
        """A better prediction for a running sequence (the served model's own, read when its prompt's
        prefill completed): it becomes the sequence's prediction and estimate (re-estimated at once
        if the sequence already outlived its p90), and with predicted reservations the reservation
        is resized to it: surplus blocks go back to the pool, a shortfall is granted as far as
        unreserved blocks allow."""
        seq.prediction = prediction
        seq.estimate = prediction
        self.num_refinements_total += 1
        if seq.num_output_tokens > prediction.p90:
            self._reestimate(seq)
            return
        if self.config.kv_reserve == "predicted" and seq.status == SequenceStatus.RUNNING:
            self._resize_reservation(seq, release_surplus=True)

    # ---- bulk decode (the simulator) -------------------------------------------------------------------
    def can_admit(self) -> bool:
        """Whether the next schedule() would admit a waiting sequence (running ones decoding)."""
        cfg = self.config
        if not self.waiting or len(self.running) >= cfg.max_num_seqs or len(self.running) >= cfg.max_num_batched_tokens:
            return False
        if self._bucketed and self.running:
            return False
        head = self.waiting.peek(self.clock(), self.work_done)
        if self.running and self._stream_cost(head) > self._stream_room():
            return False
        matched = self._match(head)
        need = self._admission_blocks(head, matched)
        if need <= self.num_unreserved_blocks - self._watermark_blocks:
            return True
        return not self.running and self._fits_alone(head, matched)

    def next_wakeup_time(self) -> float:
        """When a waiting sequence becomes overdue (max_wait_s, max_latency_s), changing the head of the queue."""
        return self.waiting.next_overdue_time(self.clock())

    def decode_horizon(self) -> int:
        """How many steps from now are plain decode steps of the running set that `fast_forward` may
        take at once: 0 unless every running sequence is decoding, all fit the token budget and
        nothing can be admitted. Bounded so that no sequence reaches a length limit or its p90
        (re-estimation) before the last of them, and no step would need to preempt."""
        running = self.running
        cfg = self.config
        if not running or len(running) > cfg.max_num_batched_tokens or self.can_admit():
            return 0
        max_len = cfg.max_model_len
        horizon = max_len
        for seq in running:
            n = seq.num_tokens
            if seq.num_computed_tokens != n - 1:
                return 0
            n_out = n - seq.num_prompt_tokens
            h = seq.max_tokens - n_out
            if max_len - n < h:
                h = max_len - n
            est = seq.estimate
            if est is not None and est.p90 - n_out + 1 < h:
                h = max(int(est.p90) - n_out + 1, 1)
            if seq.first_token_time is None:  # a prompt's last token: its first sample is timed
                h = 1
            if h < horizon:
                horizon = h
        horizon = min(horizon, self.steps_to_next_deadline())
        unreserved = self.num_unreserved_blocks
        bs = self.block_manager.block_size
        if len(running) * (horizon // bs + 1) <= unreserved or self._extra_blocks(horizon) <= unreserved:
            return horizon
        lo, hi = 0, horizon  # extra blocks grow with the steps: the last k that needs no preemption
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._extra_blocks(mid) <= unreserved:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def steps_to_next_deadline(self) -> int:
        """Decode steps of the running set after which a waiting sequence becomes overdue by its
        wait_deadline (changing the head of the queue); a large number if none will."""
        deadline = self.waiting.next_deadline()
        if deadline == float("inf") or deadline < self.work_done or not self.running:
            return 1 << 62
        return int((deadline - self.work_done) // len(self.running)) + 1

    def _extra_blocks(self, num_steps: int) -> int:
        """Unreserved blocks the running set draws on over `num_steps` decode steps."""
        bs = self.block_manager.block_size
        total = 0
        for seq in self.running:
            extra = -(-(seq.num_computed_tokens + num_steps) // bs) - len(seq.block_ids) - seq.num_reserved_blocks
            if extra > 0:
                total += extra
        return total

    def fast_forward(self, num_steps: int, sampled: Mapping[str, int], filler_token_id: int = 0) -> list[Sequence]:
        """Takes `num_steps` decode steps at once: what that many schedule()/update() pairs would do
        if every running sequence sampled `filler_token_id` except at the last step, where it samples
        `sampled[request_id]` (default the filler). Needs 1 <= num_steps <= decode_horizon(), and a
        filler token that stops no sequence (no EOS, no stop token)."""
        bm = self.block_manager
        bs = bm.block_size
        caching = bm.enable_prefix_caching
        max_len = self.config.max_model_len
        now = self.clock()
        finished: list[Sequence] = []
        self.num_steps += num_steps
        running = list(self.running)
        self.num_sampled_total += num_steps * len(running)
        for seq in running:  # every step's blocks first, as schedule() allocates before update() samples
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.num_prompt_computed_total += min(seq.num_computed_tokens + num_steps, seq.num_prompt_tokens) - seq.num_computed_tokens
            num_tokens = seq.num_computed_tokens + num_steps
            if num_tokens > len(seq.block_ids) * bs:
                needed = -(-num_tokens // bs) - len(seq.block_ids)
                from_reserve = min(needed, seq.num_reserved_blocks)
                bm.allocate(seq, num_tokens)
                seq.num_reserved_blocks -= from_reserve
                self.num_reserved_blocks -= from_reserve
        for seq in running:
            seq.num_computed_tokens += num_steps
            if caching:
                bm.commit_full_blocks(seq)
            token = sampled.get(seq.request_id, filler_token_id)
            if token == filler_token_id:
                seq.append_tokens(token, num_steps)
            else:
                if num_steps > 1:
                    seq.append_tokens(filler_token_id, num_steps - 1)
                seq.append_token(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            n_out = seq.num_tokens - seq.num_prompt_tokens
            status = None
            if token != filler_token_id or n_out >= seq.max_tokens or seq.num_tokens >= max_len:
                status = seq.check_stop(max_len)
            if status is not None:
                self._finish(seq, status)
                finished.append(seq)
            elif seq.estimate is not None and n_out > seq.estimate.p90:
                self._reestimate(seq)
        assert bm.num_free_blocks >= self.num_reserved_blocks, "fast_forward past its horizon"
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
            prefix_cache_queries_total=bm.num_prefix_query_tokens,
            prefix_cache_hits_total=bm.num_prefix_hit_tokens,
            num_cached_blocks=bm.num_cached_blocks,
            num_reserved_blocks=self.num_reserved_blocks,
            num_reestimations_total=self.num_reestimations_total,
            num_refinements_total=self.num_refinements_total,
        )


def _near(bucket: int | None, head_bucket: int) -> bool:
    return bucket is not None and abs(bucket - head_bucket) <= 1
