"""The waiting queue: heaps keyed by the policy, with starvation bounds and per-bucket views.

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
    """`max_wait_s`: a sequence waiting longer goes first. `work_fn`: keeps `total_work`, the
    predicted work queued; sequences with a `wait_deadline` (in work done) go first once the
    work done passes it. Among overdue sequences, the longest overdue goes first."""

    def __init__(
        self,
        policy: QueuePolicy,
        max_wait_s: float | None = None,
        by_bucket: bool = False,
        work_fn: Callable[[Sequence], float] | None = None,
    ) -> None:
        self.policy = policy
        self.max_wait_s = max_wait_s
        self.work_fn = work_fn
        self.total_work = 0.0
        self._work: dict[int, float] = {}  # seq_no -> its work counted in total_work
        self._heap: list[Entry] = []
        self._by_arrival: list[Entry] | None = [] if max_wait_s is not None else None
        self._by_deadline: list[Entry] = []
        self._buckets: dict[int | None, list[Entry]] | None = {} if by_bucket else None
        self._live: dict[int, int] = {}  # seq_no -> push id of its live entries
        self._push_ids = itertools.count()

    def push(self, seq: Sequence) -> None:
        push_id = next(self._push_ids)
        entry = (self.policy.key(seq), push_id, seq)
        heapq.heappush(self._heap, entry)
        if self._by_arrival is not None:
            heapq.heappush(self._by_arrival, (seq.arrival_time, push_id, seq))
        if seq.wait_deadline is not None:
            heapq.heappush(self._by_deadline, (seq.wait_deadline, push_id, seq))
        if self._buckets is not None:
            heapq.heappush(self._buckets.setdefault(bucket_key(seq), []), entry)
        if self.work_fn is not None:
            work = self.work_fn(seq)
            self._work[seq.seq_no] = work
            self.total_work += work
        self._live[seq.seq_no] = push_id

    def _top(self, heap: list[Entry]) -> Sequence | None:
        live = self._live
        while heap:
            _, push_id, seq = heap[0]
            if live.get(seq.seq_no) == push_id:
                return seq
            heapq.heappop(heap)
        return None

    def peek(self, now: float, work_done: float = 0.0) -> Sequence | None:
        """The next sequence to admit: an overdue one (by max_wait_s, then by wait_deadline) if
        any, else the policy's first."""
        if self._by_arrival is not None:
            oldest = self._top(self._by_arrival)
            if oldest is not None and now - oldest.arrival_time > self.max_wait_s:
                return oldest
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
        """When the longest-waiting sequence becomes overdue, if that is still to come (else inf)."""
        if self._by_arrival is None:
            return float("inf")
        oldest = self._top(self._by_arrival)
        if oldest is None or now - oldest.arrival_time > self.max_wait_s:
            return float("inf")
        return oldest.arrival_time + self.max_wait_s

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
