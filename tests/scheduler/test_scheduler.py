"""Scheduler behaviour and invariants, model-free: admission, reservations, preemption, buckets,
re-estimation, and property tests over random workloads (including aborts at any point)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lenserve.scheduler import SequenceStatus

from .helpers import Clock, check_invariants, drain, make_scheduler, make_seq, prediction, sample_tokens

# ---- admission and reservations ----------------------------------------------------------------------


def _admitted_at_once(kv_reserve, num_blocks=100, **seq_kwargs):
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, kv_reserve=kv_reserve, max_num_seqs=100, watermark=0.0,
                           admission_window=100)
    for i in range(50):
        sched.add(make_seq(f"r{i}", 8, 10, **seq_kwargs))
    sched.schedule()
    check_invariants(sched)
    return sched


def test_reservation_modes_bound_admission():
    pred = prediction(10, p90=12)
    # prompt 8 + max_tokens 92 = 100 tokens = 25 blocks each: 4 fit in 100 blocks.
    assert _admitted_at_once("max", max_tokens=92, pred=pred).num_running == 4
    # prompt 8 + p90 12 = 20 tokens = 5 blocks each: 20 fit.
    sched = _admitted_at_once("predicted", max_tokens=92, pred=pred)
    assert sched.num_running == 20
    assert all(s.num_reserved_blocks == 3 for s in sched.running)  # 2 blocks allocated for the prompt
    assert sched.num_reserved_blocks == 60
    # none: the prompt only (2 blocks each), the slot limit is 50.
    assert _admitted_at_once("none", max_tokens=92, pred=pred).num_running == 50


def test_predicted_reservation_without_prediction_falls_back_to_max_tokens():
    assert _admitted_at_once("predicted", max_tokens=92).num_running == 4


def test_growth_draws_on_the_reservation_first():
    sched = make_scheduler(num_blocks=20, block_size=4, kv_reserve="predicted", watermark=0.0)
    seq = make_seq("a", 4, 12, max_tokens=50, pred=prediction(10, p90=12))
    sched.add(seq)
    out = sched.schedule()
    assert len(seq.block_ids) == 1 and seq.num_reserved_blocks == 3  # 4 + 12 tokens = 4 blocks
    sched.update(out, sample_tokens(out))
    for _ in range(5):  # tokens 5..9 need a second and third block, taken from the reservation
        out = sched.schedule()
        sched.update(out, sample_tokens(out))
        check_invariants(sched)
    assert len(seq.block_ids) + seq.num_reserved_blocks == 4
    assert sched.block_manager.num_free_blocks - sched.num_reserved_blocks == 16


def test_outgrowing_the_reservation_preempts_the_lowest_ranked_when_memory_is_short():
    # 12 blocks of 4 tokens. Three sequences each reserve prompt 4 + p90 4 = 2 blocks, but really
    # generate 30, 20 and 20 tokens (9 + 6 + 6 blocks): they outgrow their reservations.
    clock = Clock()
    sched = make_scheduler(num_blocks=12, block_size=4, clock=clock, kv_reserve="predicted", watermark=0.0, policy="fcfs")
    seqs = [make_seq(f"r{i}", 4, 30 if i == 0 else 20, arrival=float(i), max_tokens=100, pred=prediction(3, p90=4)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    finished = drain(sched)
    assert {s.request_id for s in finished} == {"r0", "r1", "r2"}
    assert sched.num_preemptions_total >= 1
    assert seqs[0].num_preemptions == 0  # the victims are the later arrivals (lowest fcfs rank)
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions_total
    assert sched.num_reestimations_total >= 1
    assert all(s.num_output_tokens == s.true_output_len for s in seqs)


def test_max_reservation_never_preempts():
    sched = make_scheduler(num_blocks=40, block_size=4, kv_reserve="max", watermark=0.0)
    for i in range(20):
        sched.add(make_seq(f"r{i}", 5, 3 + 7 * (i % 4), max_tokens=30, arrival=float(i), pred=prediction(4, p90=5)))
    drain(sched)
    assert sched.num_preemptions_total == 0


def test_reestimation_extends_a_sequence_that_outlives_its_p90():
    sched = make_scheduler(num_blocks=100, block_size=4, kv_reserve="predicted", watermark=0.0)
    seq = make_seq("a", 4, 40, max_tokens=200, pred=prediction(8, p90=10))
    sched.add(seq)
    estimates = []
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, sample_tokens(out))
        check_invariants(sched)
        if seq.estimate is not estimates[-1:] and seq.estimate not in estimates:
            estimates.append(seq.estimate)
    assert seq.prediction.p90 == 10  # the request's prediction is kept for metrics
    assert len(estimates) >= 2 and sched.num_reestimations_total == len(estimates) - 1
    for earlier, later in zip(estimates, estimates[1:]):
        assert later.p90 > earlier.p90 and later.mean > earlier.p90


def test_refine_resizes_the_reservation_to_the_new_prediction():
    sched = make_scheduler(num_blocks=40, block_size=4, kv_reserve="predicted", watermark=0.0)
    seq = make_seq("a", 8, 30, max_tokens=200, pred=prediction(30, p90=40))
    other = make_seq("b", 8, 30, max_tokens=200, pred=prediction(30, p90=40))
    sched.add(seq)
    out = sched.schedule()  # the prefill: 2 blocks held, 8 + 40 tokens = 12 blocks wanted
    assert len(seq.block_ids) == 2 and seq.num_reserved_blocks == 10
    sched.refine(seq, prediction(10, p90=12))  # 8 + 12 tokens = 5 blocks: 7 go back
    assert seq.num_reserved_blocks == 3 and sched.num_reserved_blocks == 3
    assert seq.estimate.p90 == 12 and seq.prediction.p90 == 12 and sched.num_refinements_total == 1
    check_invariants(sched)
    sched.update(out, sample_tokens(out))
    sched.add(other)
    sched.schedule()  # b's prefill (2 blocks held, 10 reserved); a decodes into its reservation
    before, unreserved = seq.num_reserved_blocks, sched.num_unreserved_blocks
    assert unreserved == 40 - 5 - 12
    sched.refine(seq, prediction(150, p90=190))  # wants 50 blocks: granted what is unreserved
    assert seq.num_reserved_blocks == before + unreserved and sched.num_unreserved_blocks == 0
    check_invariants(sched)
    drain(sched)
    assert sched.block_manager.num_free_blocks == 40 and sched.num_reserved_blocks == 0


def test_refine_after_the_p90_reestimates_at_once():
    sched = make_scheduler(num_blocks=100, block_size=4, kv_reserve="predicted", watermark=0.0)
    seq = make_seq("a", 4, 40, max_tokens=200, pred=prediction(30, p90=40))
    sched.add(seq)
    for _ in range(6):
        out = sched.schedule()
        sched.update(out, sample_tokens(out))
    sched.refine(seq, prediction(3, p90=4))  # 6 tokens out already: past this p90
    assert sched.num_reestimations_total == 1 and seq.estimate.mean > 6
    check_invariants(sched)
    drain(sched)
    assert seq.num_output_tokens == 40


def test_sjf_admits_the_shortest_predicted_first():
    sched = make_scheduler(num_blocks=100, policy="sjf", max_num_seqs=1)
    for i, p in enumerate([50, 5, 20]):
        sched.add(make_seq(f"r{i}", 4, 3, arrival=float(i), max_tokens=100, pred=prediction(p)))
    order = [s.request_id for s in drain(sched)]
    assert order == ["r1", "r2", "r0"]


def test_prompts_are_prepacked_and_chunked_within_the_budget():
    sched = make_scheduler(num_blocks=400, block_size=4, max_num_batched_tokens=64, max_num_seqs=10)
    for i, n in enumerate([30, 100, 20, 12]):
        sched.add(make_seq(f"r{i}", n, 2, arrival=float(i)))
    out = sched.schedule()
    # Head 30, then first-fit decreasing: 20 and 12 fit (62), the 100-token prompt gets the last 2.
    assert dict(zip((s.request_id for s in out.seqs), out.num_new_tokens)) == {"r0": 30, "r2": 20, "r3": 12, "r1": 2}
    assert out.num_batched_tokens == 64


def test_bucketed_batching_is_static_and_groups_by_bucket():
    sched = make_scheduler(num_blocks=400, block_size=4, batching="bucketed", max_num_seqs=3)
    lengths = {"a": 20, "b": 600, "c": 30, "d": 700, "e": 25, "f": 40}  # buckets 0, 4, 0, 4, 0, 0
    for i, (rid, n) in enumerate(lengths.items()):
        sched.add(make_seq(rid, 4, n // 10, arrival=float(i), max_tokens=1000, pred=prediction(n)))
    batches = []

    def on_step(step, out):
        ids = {s.request_id for s in sched.running}
        if ids and (not batches or not ids <= batches[-1]):
            batches.append(ids)

    sched.schedule = _recording(sched.schedule, on_step)
    drain(sched)
    assert batches[0] == {"a", "c", "e"}  # the head's bucket, in fcfs order, up to the batch size
    for batch in batches:  # never mixed with a non-adjacent bucket
        buckets = {lengths[r] > 512 for r in batch}
        assert len(buckets) == 1


def _recording(schedule, on_step):
    def wrapped():
        out = schedule()
        on_step(None, out)
        return out

    return wrapped


def test_bucket_affinity_fills_from_the_heads_bucket():
    sched = make_scheduler(num_blocks=400, block_size=4, bucket_affinity=True, max_num_seqs=3, policy="fcfs")
    for i, n in enumerate([20, 900, 30, 800, 25]):
        sched.add(make_seq(f"r{i}", 4, 3, arrival=float(i), max_tokens=1000, pred=prediction(n)))
    out = sched.schedule()
    assert {s.request_id for s in out.seqs} == {"r0", "r2", "r4"}


def test_abort_frees_blocks_and_reservation():
    sched = make_scheduler(num_blocks=50, block_size=4, kv_reserve="predicted")
    for i in range(4):
        sched.add(make_seq(f"r{i}", 10, 20, max_tokens=40, pred=prediction(10)))
    out = sched.schedule()
    sched.update(out, sample_tokens(out))
    for i in range(4):
        assert sched.abort(f"r{i}").status is SequenceStatus.FINISHED_ABORTED
    assert sched.abort("r0") is None
    assert sched.block_manager.num_free_blocks == 50 and sched.num_reserved_blocks == 0
    assert not sched.has_unfinished()


def test_preempted_victim_is_dropped_from_the_step():
    """A victim chosen after it was scheduled earlier in the same step must not be run."""
    clock = Clock()
    sched = make_scheduler(num_blocks=12, block_size=4, clock=clock, watermark=0.0, policy="sjf")
    early_long = make_seq("long", 4, 30, arrival=0.0, max_tokens=100, pred=prediction(90))
    late_short = make_seq("short", 4, 30, arrival=1.0, max_tokens=100, pred=prediction(1))
    sched.add(early_long)
    out = sched.schedule()
    sched.update(out, sample_tokens(out))
    sched.add(late_short)  # runs after "long" in admission order, ranks before it
    preempted = []
    drain(sched, on_step=lambda step, out: preempted.extend(out.preempted))
    assert preempted and preempted[0] is early_long
    assert early_long.num_output_tokens == late_short.num_output_tokens == 30


def test_max_tokens_is_clamped_to_the_cache():
    sched = make_scheduler(num_blocks=4, block_size=4)
    seq = make_seq("a", 6, 50, max_tokens=100)
    sched.add(seq)
    drain(sched)
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.num_tokens == 16


# ---- property tests --------------------------------------------------------------------------------------

workloads = st.lists(
    st.tuples(
        st.integers(1, 40),  # prompt tokens
        st.integers(1, 30),  # true output tokens
        st.floats(0.3, 3.0),  # prediction error factor
        st.integers(0, 8),  # arrival step
        st.integers(-1, 1),  # priority
    ),
    min_size=1,
    max_size=14,
)
configs = st.fixed_dictionaries({
    "policy": st.sampled_from(["fcfs", "sjf", "oracle"]),
    "batching": st.sampled_from(["continuous", "bucketed"]),
    "kv_reserve": st.sampled_from(["none", "predicted", "max"]),
    "bucket_affinity": st.booleans(),
    "max_num_seqs": st.integers(1, 6),
    "max_num_batched_tokens": st.integers(8, 64),
    "max_wait_s": st.sampled_from([None, 3.0]),
    "fcfs_wait_bound": st.sampled_from([None, 1.0, 1.5]),
    "enable_chunked_prefill": st.just(True),
})


def _run(work, config, num_blocks, caching, aborts=()):
    clock = Clock()
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, caching=caching, clock=clock, **config)
    pending = sorted(enumerate(work), key=lambda x: x[1][3])
    seqs = {}
    abort_at = dict(aborts)
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][3] <= step:
            i, (p, o, err, _, prio) = pending.pop(0)
            prompt = [5 + (j % 3) for j in range(p)] if caching else None  # shared prefixes
            # requests with one prompt length form a group (the samples of one prompt, n > 1)
            seq = make_seq(f"r{i}", p, o, max_tokens=40, arrival=clock.now, priority=prio,
                           pred=prediction(max(o * err, 1.0)), prompt=prompt, group_id=f"g{p}")
            sched.add(seq)
            seqs[seq.request_id] = seq
        for rid, at in list(abort_at.items()):
            if at == step and rid in seqs:
                sched.abort(rid)
                del abort_at[rid]
        out = sched.schedule()
        check_invariants(sched, out)
        clock.now += 1.0
        sched.update(out, sample_tokens(out))
        check_invariants(sched)
        step += 1
        assert step < 5000, "no progress"
    return sched, seqs


@settings(max_examples=150, deadline=None)
@given(workloads, configs, st.integers(18, 60), st.booleans())
def test_every_request_finishes_and_all_blocks_come_back(work, config, num_blocks, caching):
    sched, seqs = _run(work, config, num_blocks, caching)
    assert all(s.status is SequenceStatus.FINISHED_STOPPED for s in seqs.values())
    assert all(s.num_output_tokens == s.true_output_len for s in seqs.values())
    assert sched.block_manager.num_free_blocks == num_blocks
    assert sched.num_reserved_blocks == 0 and not sched.running and not sched.waiting


@settings(max_examples=150, deadline=None)
@given(workloads, configs, st.integers(18, 60), st.booleans(), st.data())
def test_aborts_at_any_point_leak_nothing(work, config, num_blocks, caching, data):
    aborts = data.draw(st.lists(st.tuples(st.sampled_from([f"r{i}" for i in range(len(work))]), st.integers(0, 60)), max_size=6))
    sched, seqs = _run(work, config, num_blocks, caching, aborts)
    assert all(s.is_finished for s in seqs.values())
    assert sched.block_manager.num_free_blocks == num_blocks
    assert sched.num_reserved_blocks == 0 and not sched.requests


def test_all_policies_and_modes_drain_a_larger_workload():
    for policy in ("fcfs", "sjf", "oracle"):
        for batching in ("continuous", "bucketed"):
            for kv_reserve in ("none", "predicted", "max"):
                sched = make_scheduler(num_blocks=80, block_size=4, policy=policy, batching=batching,
                                       kv_reserve=kv_reserve, max_num_seqs=8, max_num_batched_tokens=48)
                for i in range(60):
                    o = 1 + (i * 37) % 50
                    sched.add(make_seq(f"r{i}", 1 + (i * 13) % 70, o, max_tokens=60, arrival=float(i),
                                       pred=prediction(o * (0.5 + (i % 5) / 3))))
                finished = drain(sched)
                assert len(finished) == 60
                assert sched.block_manager.num_free_blocks == 80
                assert math.isclose(sum(s.num_output_tokens for s in finished), sum(1 + (i * 37) % 50 for i in range(60)))


@pytest.mark.parametrize("caching", [True, False])
def test_samples_of_one_prompt_compute_it_once(caching):
    sched = make_scheduler(num_blocks=64, block_size=4, caching=caching, max_num_batched_tokens=256, max_num_seqs=8)
    prompt = [5 + j % 7 for j in range(41)]
    group = [make_seq(f"q#{i}", 41, 5, prompt=prompt, group_id="q") for i in range(4)]
    other = make_seq("other", 41, 5, prompt=[9] * 41)
    for seq in group + [other]:
        sched.add(seq)
    first = sched.schedule()
    if not caching:  # nothing to share: every sample computes the prompt at once
        assert sorted(first.num_new_tokens) == [41] * 5
        return
    # one sample computes the prompt; its siblings wait a step, the unrelated prompt does not
    assert sorted((s.request_id, n) for s, n in zip(first.seqs, first.num_new_tokens)) == [("other", 41), ("q#0", 41)]
    sched.update(first, sample_tokens(first))
    second = sched.schedule()
    new = {s.request_id: n for s, n in zip(second.seqs, second.num_new_tokens)}
    # the siblings take the prompt's 10 full blocks from the cache and compute only the last token
    assert {rid: n for rid, n in new.items() if rid.startswith("q#") and rid != "q#0"} == {"q#1": 1, "q#2": 1, "q#3": 1}
    assert all(s.num_cached_tokens == 40 for s in group[1:])
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, sample_tokens(out))
    assert all(s.num_output_tokens == 5 for s in group) and sched.block_manager.num_free_blocks == 64


def test_a_head_waiting_for_its_sibling_holds_admission_a_step():
    # a long prompt chunked over steps: the sibling at the head waits while it is computed
    sched = make_scheduler(num_blocks=64, block_size=4, caching=True, max_num_batched_tokens=16, max_num_seqs=8)
    prompt = [5 + j % 7 for j in range(40)]
    a, b = make_seq("p#0", 40, 3, prompt=prompt, group_id="p"), make_seq("p#1", 40, 3, prompt=prompt, group_id="p")
    sched.add(a)
    sched.add(b)
    steps = []
    while a.num_computed_tokens < 40:
        out = sched.schedule()
        steps.append({s.request_id: n for s, n in zip(out.seqs, out.num_new_tokens)})
        sched.update(out, sample_tokens(out))
    assert steps == [{"p#0": 16}, {"p#0": 16}, {"p#0": 8}]
    out = sched.schedule()
    assert {s.request_id: n for s, n in zip(out.seqs, out.num_new_tokens)} == {"p#0": 1, "p#1": 4}
