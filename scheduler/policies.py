"""Queue policies: the order in which waiting sequences are admitted.

A policy gives each sequence a key that does not change while it waits, so the waiting queue
can be a heap. Lower keys go first.
"""
from __future__ import annotations

from typing import Protocol

from lenserve.scheduler.sequence import Sequence


class QueuePolicy(Protocol):
    name: str

    def key(self, seq: Sequence) -> tuple: ...


class FCFSPolicy:
    """First come, first served; the request's `priority` (lower first) comes before arrival."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival_time, seq.seq_no)


POLICIES: dict[str, type] = {"fcfs": FCFSPolicy}


def make_policy(name: str, **kwargs) -> QueuePolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}") from None
    return cls(**kwargs)
