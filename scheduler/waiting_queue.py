"""The waiting queue: heaps keyed by the policy, with starvation and latency bounds and per-bucket views.

Every operation is O(log n). Removal is lazy: each push gets a fresh id, and a heap entry is
live only while its sequence's current id matches, so a sequence that is popped, aborted or
pushed again (after a preemption) leaves stale entries that are dropped when they surface.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable, Iterable, Iterator

from lenserve.scheduler.policies import QueuePolicy
from lenserve.scheduler.sequence import Sequence

Entry = tuple  # (sort key, push id, Sequence)


def bucket_key(seq: Sequence) -> int | None:
    """The predicted-length bucket a waiting sequence is grouped in (None: no prediction)."""
    return seq.estimate.bucket if seq.estimate is not None else None


class WaitingQueue:
    """`max_wait_s`: a sequence waiting longer goes first. `max_latency_s` with `service_s`: a
    sequence goes first once starting it later would leave it less than `service_s(seq)` seconds
    before `arrival + max_latency_s` (its latest start is computed when it is pushed and again at
    `rekey_starts`). `work_fn`: keeps `total_work`, the predicted work queued; sequences with a
    `wait_deadline` (in work done) go first once the work done passes it. Among overdue sequences,
    the longest overdue goes first."""

    def __init__(
        self,
        policy: QueuePolicy,
        max_wait_s: float | None = None,
        by_bucket: bool = False,
        work_fn: Callable[[Sequence], float] | None = None,
        max_latency_s: float | None = None,
        service_s: Callable[[Sequence], float] | None = None,
    ) -> None:
        self.policy = policy
        self.max_wait_s = max_wait_s
        self.max_latency_s = max_latency_s
        self.service_s = service_s
        self.work_fn = work_fn
        self.total_work = 0.0
        self._work: dict[int, float] = {}  # seq_no -> its work counted in total_work
        self._heap: list[Entry] = []
        # (latest start, push id, Sequence): by max_wait_s and max_latency_s
        self._by_start: list[Entry] | None = [] if max_wait_s is not None or max_latency_s is not None else None
        self._by_deadline: list[Entry] = []
        self._buckets: dict[int | None, list[Entry]] | None = {} if by_bucket else None
        self._live: dict[int, int] = {}  # seq_no -> push id of its live entries
        self._push_ids = itertools.count()

    def push(self, seq: Sequence) -> None:
        push_id = next(self._push_ids)
        entry = (self.policy.key(seq), push_id, seq)
        heapq.heappush(self._heap, entry)
        if self._by_start is not None:
            heapq.heappush(self._by_start, (self.latest_start(seq), push_id, seq))
        if seq.wait_deadline is not None:
            heapq.heappush(self._by_deadline, (seq.wait_deadline, push_id, seq))
        if self._buckets is not None:
            heapq.heappush(self._buckets.setdefault(bucket_key(seq), []), entry)
        if self.work_fn is not None:
            work = self.work_fn(seq)
            self._work[seq.seq_no] = work
            self.total_work += work
        self._live[seq.seq_no] = push_id

    def rekey_starts(self) -> None:
        """Recomputes every waiting sequence's latest start (after `service_s` changed)."""
        if self._by_start is None:
            return
        live = self._live
        self._by_start = [(self.latest_start(seq), push_id, seq) for _, push_id, seq in self._by_start
                          if live.get(seq.seq_no) == push_id]
        heapq.heapify(self._by_start)

    def latest_start(self, seq: Sequence) -> float:
        """When `seq` becomes overdue, by max_wait_s and max_latency_s."""
        start = float("inf")
        if self.max_wait_s is not None:
            start = seq.arrival_time + self.max_wait_s
        if self.max_latency_s is not None:
            service = self.service_s(seq) if self.service_s is not None else 0.0
            start = min(start, seq.arrival_time + self.max_latency_s - service)
        return start

    def _top_entry(self, heap: list[Entry]) -> Entry | None:
        live = self._live
        while heap:
            entry = heap[0]
            if live.get(entry[2].seq_no) == entry[1]:
                return entry
            heapq.heappop(heap)
        return None

    def _top(self, heap: list[Entry]) -> Sequence | None:
        entry = self._top_entry(heap)
        return entry[2] if entry is not None else None

    def peek(self, now: float, work_done: float = 0.0) -> Sequence | None:
        """The next sequence to admit: an overdue one (by max_wait_s and max_latency_s, then by
        wait_deadline) if any, else the policy's first."""
        if self._by_start is not None:
            first = self._top_entry(self._by_start)
            if first is not None and now > first[0]:
                return first[2]
        if self._by_deadline:
            first = self._top(self._by_deadline)
            if first is not None and first.wait_deadline < work_done:
                return first
        return self._top(self._heap)

    def pop(self, now: float, work_done: float = 0.0) -> Sequence | None:
        seq = self.peek(now, work_done)
        if seq is not None:
            self.remove(seq)
        return seq

    def pop_from_buckets(self, buckets: Iterable[int | None]) -> Sequence | None:
        """The policy's first sequence among those grouped in `buckets` (needs by_bucket)."""
        best: Entry | None = None
        for b in buckets:
            heap = self._buckets.get(b)
            if heap and self._top(heap) is not None and (best is None or heap[0] < best):
                best = heap[0]
        if best is None:
            return None
        self.remove(best[2])
        return best[2]

    def next_overdue_time(self, now: float) -> float:
        """When the next sequence becomes overdue, if that is still to come (else inf)."""
        first = self._top_entry(self._by_start) if self._by_start is not None else None
        if first is None or now > first[0]:
            return float("inf")
        return first[0]

    def next_deadline(self) -> float:
        """The earliest wait_deadline among waiting sequences (inf if none)."""
        first = self._top(self._by_deadline) if self._by_deadline else None
        return first.wait_deadline if first is not None else float("inf")

    def remove(self, seq: Sequence) -> None:
        if self._live.pop(seq.seq_no, None) is not None and self.work_fn is not None:
            self.total_work = max(self.total_work - self._work.pop(seq.seq_no), 0.0)

    def __contains__(self, seq: Sequence) -> bool:
        return seq.seq_no in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __iter__(self) -> Iterator[Sequence]:
        """Live sequences, in no particular order."""
        live = self._live
        return (seq for _, push_id, seq in self._heap if live.get(seq.seq_no) == push_id)
