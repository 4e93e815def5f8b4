"""Queue policies: the order in which waiting sequences are admitted.

A policy gives each sequence a key that does not change while it waits, so the waiting queue
can be a heap; lower keys go first, and the highest-keyed running sequence is the one preempted
when memory runs out. The request's `priority` (lower first) always comes first in the key.

Aging stays heap-compatible: a score `remaining - rate * (now - arrival)` orders sequences
exactly as `remaining + rate * arrival` does, since `rate * now` is common to all of them.
"""
from __future__ import annotations

from typing import Protocol

from lenserve.scheduler.sequence import Sequence


class QueuePolicy(Protocol):
    name: str

    def key(self, seq: Sequence) -> tuple: ...


class FCFSPolicy:
    """First come, first served."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival_time, seq.seq_no)


class SJFPolicy:
    """Shortest predicted remaining response first, aged by `aging_rate_tok_s` tokens per second waited."""

    name = "sjf"

    def __init__(self, aging_rate_tok_s: float = 0.0) -> None:
        self.aging_rate_tok_s = aging_rate_tok_s

    def remaining(self, seq: Sequence) -> float:
        return seq.predicted_remaining

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, self.remaining(seq) + self.aging_rate_tok_s * seq.arrival_time, seq.seq_no)


class OraclePolicy(SJFPolicy):
    """SJF on the true remaining length (known only when replaying a trace): the bound sjf aims at."""

    name = "oracle"

    def remaining(self, seq: Sequence) -> float:
        return seq.true_remaining


POLICIES: dict[str, type] = {"fcfs": FCFSPolicy, "sjf": SJFPolicy, "oracle": OraclePolicy}


def make_policy(name: str, aging_rate_tok_s: float = 0.0) -> QueuePolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}") from None
    return cls() if cls is FCFSPolicy else cls(aging_rate_tok_s)
