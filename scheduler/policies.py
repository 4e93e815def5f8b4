"""Queue policies: the order in which waiting sequences are admitted.

A policy gives each sequence a key that does not change while it waits, so the waiting queue
can be a heap; lower keys go first, and the highest-keyed running sequence is the one preempted
when memory runs out. The request's `priority` (lower first) always comes first in the key.

Aging stays heap-compatible: a score `remaining - rate * (now - arrival)` orders sequences
exactly as `remaining + rate * arrival` does, since `rate * now` is common to all of them. The
clock is the scheduler's step count (`Sequence.arrival_step`), so aging is measured in work the
engine did while the request waited, whatever the hardware's speed.
"""
from __future__ import annotations

from typing import Protocol

from lenserve.scheduler.sequence import Sequence


def predicted_work(seq: Sequence, prompt_weight: float) -> float:
    """Predicted work left, in response tokens: those still to come, plus the prompt tokens still
    to prefill at `prompt_weight` each."""
    work = seq.predicted_remaining
    if prompt_weight and seq.num_computed_tokens < seq.num_prompt_tokens:
        work += prompt_weight * (seq.num_prompt_tokens - seq.num_computed_tokens)
    return work


class QueuePolicy(Protocol):
    name: str

    def key(self, seq: Sequence) -> tuple: ...


class FCFSPolicy:
    """First come, first served."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival_time, seq.seq_no)


class SJFPolicy:
    """Least predicted remaining work first: the response tokens still to come, plus the prompt
    tokens still to prefill at `prompt_weight` each (a prompt token's compute relative to one
    decoded token of one sequence in a full batch); aged by `aging_tok_per_step` per step waited."""

    name = "sjf"

    def __init__(self, aging_tok_per_step: float = 0.0, prompt_weight: float = 0.0) -> None:
        self.aging_tok_per_step = aging_tok_per_step
        self.prompt_weight = prompt_weight

    def remaining(self, seq: Sequence) -> float:
        return seq.predicted_remaining

    def key(self, seq: Sequence) -> tuple:
        work = self.remaining(seq)
        if self.prompt_weight and seq.num_computed_tokens < seq.num_prompt_tokens:
            work += self.prompt_weight * (seq.num_prompt_tokens - seq.num_computed_tokens)
        return (seq.priority, work + self.aging_tok_per_step * (seq.arrival_step or 0), seq.seq_no)


class OraclePolicy(SJFPolicy):
    """SJF on the true remaining length (known only when replaying a trace): the bound sjf aims at."""

    name = "oracle"

    def remaining(self, seq: Sequence) -> float:
        return seq.true_remaining


POLICIES: dict[str, type] = {"fcfs": FCFSPolicy, "sjf": SJFPolicy, "oracle": OraclePolicy}


def make_policy(name: str, aging_tok_per_step: float = 0.0, prompt_weight: float = 0.0) -> QueuePolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}") from None
    return cls() if cls is FCFSPolicy else cls(aging_tok_per_step, prompt_weight)
