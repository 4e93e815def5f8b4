"""The waiting queue: heaps keyed by the policy, with a starvation bound and per-bucket views.

Every operation is O(log n). Removal is lazy: each push gets a fresh id, and a heap entry is
live only while its sequence's current id matches, so a sequence that is popped, aborted or
pushed again (after a preemption) leaves stale entries that are dropped when they surface.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Iterable, Iterator

from lenserve.scheduler.policies import QueuePolicy
from lenserve.scheduler.sequence import Sequence

Entry = tuple  # (sort key, push id, Sequence)


def bucket_key(seq: Sequence) -> int | None:
    """The predicted-length bucket a waiting sequence is grouped in (None: no prediction)."""
    return seq.estimate.bucket if seq.estimate is not None else None


class WaitingQueue:
    def __init__(self, policy: QueuePolicy, max_wait_s: float | None = None, by_bucket: bool = False) -> None:
        self.policy = policy
        self.max_wait_s = max_wait_s
        self._heap: list[Entry] = []
        # By arrival, to find requests that have waited past max_wait_s.
        self._by_arrival: list[Entry] | None = [] if max_wait_s is not None else None
        self._buckets: dict[int | None, list[Entry]] | None = {} if by_bucket else None
        self._live: dict[int, int] = {}  # seq_no -> push id of its live entries
        self._push_ids = itertools.count()

    def push(self, seq: Sequence) -> None:
        push_id = next(self._push_ids)
        entry = (self.policy.key(seq), push_id, seq)
        heapq.heappush(self._heap, entry)
        if self._by_arrival is not None:
            heapq.heappush(self._by_arrival, (seq.arrival_time, push_id, seq))
        if self._buckets is not None:
            heapq.heappush(self._buckets.setdefault(bucket_key(seq), []), entry)
        self._live[seq.seq_no] = push_id

    def _top(self, heap: list[Entry]) -> Sequence | None:
        live = self._live
        while heap:
            _, push_id, seq = heap[0]
            if live.get(seq.seq_no) == push_id:
                return seq
            heapq.heappop(heap)
        return None

    def peek(self, now: float) -> Sequence | None:
        """The next sequence to admit: the longest-waiting one if it is overdue, else the policy's first."""
        if self._by_arrival is not None:
            oldest = self._top(self._by_arrival)
            if oldest is not None and now - oldest.arrival_time > self.max_wait_s:
                return oldest
        return self._top(self._heap)

    def pop(self, now: float) -> Sequence | None:
        seq = self.peek(now)
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

    def remove(self, seq: Sequence) -> None:
        self._live.pop(seq.seq_no, None)

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
