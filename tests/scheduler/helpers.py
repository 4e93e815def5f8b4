"""Model-free drivers for scheduler tests: sequences with known lengths, a step loop, invariants."""
from __future__ import annotations

from lenserve.predictor.types import LengthPrediction, bucket_of
from lenserve.scheduler import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus

EOS = 2
TOKEN = 7


def prediction(mean: float, p90: float | None = None) -> LengthPrediction:
    return LengthPrediction(mean=mean, p50=mean, p90=p90 if p90 is not None else 1.5 * mean, bucket=bucket_of(mean))


def make_seq(
    rid: str,
    prompt_len: int,
    output_len: int,
    *,
    max_tokens: int | None = None,
    arrival: float = 0.0,
    pred: LengthPrediction | None = None,
    priority: int = 0,
    prompt: list[int] | None = None,
    group_id: str | None = None,
) -> Sequence:
    return Sequence(
        rid,
        prompt if prompt is not None else [3 + (i % 50) for i in range(prompt_len)],
        max_tokens=max_tokens or max(output_len, 1),
        arrival_time=arrival,
        eos_token_id=EOS,
        priority=priority,
        prediction=pred,
        true_output_len=output_len,
        group_id=group_id,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(num_blocks: int = 64, block_size: int = 4, caching: bool = False, clock=None, **config) -> Scheduler:
    config.setdefault("max_model_len", 4096)
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size, caching), clock=clock or Clock())


def sample_tokens(out) -> dict[str, int]:
    """Every sampling sequence emits EOS when it reaches its true length, else a plain token."""
    sampled = {}
    for i, seq in enumerate(out.seqs):
        if out.samples(i):
            sampled[seq.request_id] = EOS if seq.num_output_tokens + 1 >= seq.true_output_len else TOKEN
    return sampled


def check_invariants(sched: Scheduler, out=None) -> None:
    bm = sched.block_manager
    owners: dict[int, int] = {}
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_ids) == len(set(seq.block_ids)), f"{seq} holds a block twice"
        for b in seq.block_ids:
            owners[b] = owners.get(b, 0) + 1
            assert b not in bm.free_blocks, f"block {b} is both owned and free"
        assert len(seq.block_ids) * bm.block_size >= seq.num_computed_tokens
    for seq in sched.waiting:
        assert not seq.block_ids and seq.num_reserved_blocks == 0 and seq.status is SequenceStatus.WAITING
    if not bm.enable_prefix_caching:
        assert all(c == 1 for c in owners.values()), "a block is allocated twice"
    for b, count in owners.items():
        assert bm.ref_counts[b] == count
    assert len(owners) + bm.num_free_blocks == bm.num_blocks, "a block leaked"
    assert sched.num_reserved_blocks == sum(s.num_reserved_blocks for s in sched.running)
    assert all(s.num_reserved_blocks >= 0 for s in sched.running)
    assert bm.num_free_blocks >= sched.num_reserved_blocks, "more blocks promised than free"
    assert len(sched.running) <= sched.config.max_num_seqs
    if out is not None:
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert all(n >= 1 for n in out.num_new_tokens)
        assert all(n > 1 for n in out.num_new_tokens[: out.num_prefill_seqs])
        assert all(n == 1 for n in out.num_new_tokens[out.num_prefill_seqs :])
        assert len({s.request_id for s in out.seqs}) == len(out.seqs)
        for seq, n in zip(out.seqs, out.num_new_tokens):
            assert seq.status is SequenceStatus.RUNNING
            assert seq.num_computed_tokens + n <= len(seq.block_ids) * bm.block_size
            assert seq.num_computed_tokens + n <= seq.num_tokens


def drain(sched: Scheduler, max_steps: int = 100_000, dt: float = 1.0, on_step=None) -> list[Sequence]:
    """Steps until nothing is left; returns the sequences in finishing order."""
    finished: list[Sequence] = []
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        check_invariants(sched, out)
        if isinstance(sched.clock, Clock):
            sched.clock.now += dt
        finished += sched.update(out, sample_tokens(out))
        check_invariants(sched)
        if on_step is not None:
            on_step(steps, out)
        steps += 1
        assert steps < max_steps, "the scheduler made no progress"
    return finished
