"""Each policy's admission order, priority, aging and the max-wait bound."""
import pytest

from lenserve.scheduler.policies import make_policy
from lenserve.scheduler.waiting_queue import WaitingQueue

from .helpers import Clock, drain, make_scheduler, make_seq, prediction, sample_tokens


def _order(policy, seqs, now=0.0, **kwargs):
    queue = WaitingQueue(make_policy(policy, **kwargs))
    for s in seqs:
        queue.push(s)
    out = []
    while queue:
        out.append(queue.pop(now).request_id)
    return out


def _three():
    # a: early, long (predicted 300, true 20); b: middle, short (predicted 10, true 500); c: late, medium.
    return [
        make_seq("a", 8, 20, max_tokens=1000, arrival=0.0, pred=prediction(300)),
        make_seq("b", 8, 500, max_tokens=1000, arrival=1.0, pred=prediction(10)),
        make_seq("c", 8, 100, max_tokens=1000, arrival=2.0, pred=prediction(50)),
    ]


def test_fcfs_orders_by_arrival():
    assert _order("fcfs", _three()) == ["a", "b", "c"]


def test_sjf_orders_by_predicted_remaining():
    assert _order("sjf", _three()) == ["b", "c", "a"]


def test_oracle_orders_by_true_length():
    assert _order("oracle", _three()) == ["a", "c", "b"]


def test_priority_comes_before_the_policy():
    seqs = _three()
    seqs[2].priority = -1
    for policy in ("fcfs", "sjf", "oracle"):
        assert _order(policy, seqs)[0] == "c"


def test_sjf_without_prediction_uses_max_tokens():
    seqs = [make_seq("long", 4, 5, max_tokens=900), make_seq("short", 4, 5, max_tokens=10, arrival=1.0)]
    assert _order("sjf", seqs) == ["short", "long"]


def test_aging_lets_a_long_request_pass_later_short_ones():
    old_long = make_seq("old", 4, 1, arrival=0.0, pred=prediction(500), max_tokens=1000)
    old_long.arrival_step = 0
    # 1 token per step: 500 steps later, a fresh 10-token request weighs more than the old one.
    fresh = [make_seq(f"new{i}", 4, 1, arrival=60.0 + i, pred=prediction(10), max_tokens=1000) for i in range(3)]
    for i, seq in enumerate(fresh):
        seq.arrival_step = 500 + i
    assert _order("sjf", [old_long] + fresh, aging_tok_per_step=1.0)[0] == "old"
    assert _order("sjf", [old_long] + fresh, aging_tok_per_step=0.0)[-1] == "old"


def test_max_wait_puts_overdue_requests_first():
    queue = WaitingQueue(make_policy("sjf"), max_wait_s=30.0)
    old = make_seq("old", 4, 1, arrival=0.0, pred=prediction(900), max_tokens=1000)
    new = make_seq("new", 4, 1, arrival=20.0, pred=prediction(5), max_tokens=1000)
    queue.push(old)
    queue.push(new)
    assert queue.peek(now=25.0) is new
    assert queue.next_overdue_time(now=25.0) == 30.0
    assert queue.peek(now=31.0) is old
    assert queue.next_overdue_time(now=31.0) == float("inf")


def test_queue_lazy_removal_and_repush():
    queue = WaitingQueue(make_policy("fcfs"), max_wait_s=5.0, by_bucket=True)
    a, b = make_seq("a", 4, 1, arrival=0.0), make_seq("b", 4, 1, arrival=1.0)
    queue.push(a)
    queue.push(b)
    queue.remove(a)
    assert len(queue) == 1 and a not in queue and queue.peek(100.0) is b
    queue.push(a)  # back after a preemption: one live entry, not two
    assert len(queue) == 2 and sorted(s.request_id for s in queue) == ["a", "b"]
    assert [queue.pop(0.0).request_id, queue.pop(0.0).request_id] == ["a", "b"]
    assert queue.pop(0.0) is None and not queue


@pytest.mark.parametrize("max_wait_s", [None, 50.0])
def test_aging_bounds_waiting_under_a_stream_of_short_requests(max_wait_s):
    """One long request among a steady stream of shorter ones: sjf with aging (or the max-wait
    bound) still starts it within a bounded time, while pure sjf would hold it back to the end."""
    clock = Clock()
    sched = make_scheduler(num_blocks=256, clock=clock, max_num_seqs=1, policy="sjf",
                           aging_tok_per_step=0.0 if max_wait_s else 5.0, max_wait_s=max_wait_s)
    long_seq = make_seq("long", 4, 3, arrival=0.0, pred=prediction(400), max_tokens=1000)
    sched.add(long_seq)
    started = {}
    arrivals = iter(range(10_000))

    def on_step(step, out):
        for seq in out.seqs:
            started.setdefault(seq.request_id, clock.now)
        if step < 600 and step % 2 == 0:  # a short request every 2 s keeps the queue busy
            i = next(arrivals)
            sched.add(make_seq(f"s{i}", 4, 2, arrival=clock.now, pred=prediction(5), max_tokens=1000))

    drain(sched, on_step=on_step)
    # Ages 5 tokens a step (1 s): passes the 5-token requests after (400 - 5) / 5 = 79 steps; max-wait: after 50 s.
    assert started["long"] <= 100.0
    assert started["long"] < max(started.values()) - 100


@pytest.mark.parametrize("bound", [None, 1.0])
def test_fcfs_wait_bound_lets_a_request_go_once_it_has_waited_its_fcfs_wait(bound):
    sched = make_scheduler(num_blocks=256, max_num_seqs=1, policy="sjf", aging_tok_per_step=0.0, fcfs_wait_bound=bound)
    sched.add(make_seq("first", 4, 3, pred=prediction(3), max_tokens=100))
    out = sched.schedule()  # "first" runs; nothing is queued when "long" arrives
    first = sched.update(out, sample_tokens(out))
    sched.add(make_seq("long", 4, 3, pred=prediction(400), max_tokens=1000))
    for i in range(3):
        sched.add(make_seq(f"short{i}", 4, 3, pred=prediction(5), max_tokens=1000))
    if bound:
        assert sched.waiting.total_work > 0
    order = [s.request_id for s in first + drain(sched)]
    # fcfs would start "long" right after "first": with the bound it goes as soon as work is done.
    assert order[1] == ("long" if bound else "short0")


def test_max_latency_starts_a_request_predicted_long_early_enough_to_finish():
    """Latest start = arrival + max_latency_s - expected decode time: of two requests that arrived
    together, the one predicted longer becomes overdue first."""
    step_s = {"value": 0.5}
    queue = WaitingQueue(make_policy("sjf"), max_latency_s=100.0,
                         service_s=lambda seq: seq.predicted_remaining * step_s["value"])
    long = make_seq("long", 4, 1, arrival=0.0, pred=prediction(120), max_tokens=1000)  # 60 s of decode
    short = make_seq("short", 4, 1, arrival=0.0, pred=prediction(10), max_tokens=1000)  # 5 s
    queue.push(long)
    queue.push(short)
    assert queue.latest_start(long) == 40.0 and queue.latest_start(short) == 95.0
    assert queue.peek(now=39.0) is short  # sjf order while nothing is overdue
    assert queue.next_overdue_time(now=39.0) == 40.0
    assert queue.peek(now=41.0) is long
    queue.remove(long)
    assert queue.peek(now=41.0) is short and queue.next_overdue_time(now=41.0) == 95.0
    # with max_wait_s too, the earlier of the two bounds counts
    both = WaitingQueue(make_policy("sjf"), max_wait_s=20.0, max_latency_s=100.0, service_s=lambda seq: 0.0)
    assert both.latest_start(short) == 20.0


def test_step_time_follows_the_reported_steps_and_rekeys_the_queue():
    sched = make_scheduler(num_blocks=256, policy="sjf", max_latency_s=1000.0)
    assert sched.step_time_s is None
    waiting = make_seq("w", 4, 1, arrival=0.0, pred=prediction(100), max_tokens=1000)
    sched.add(waiting)
    assert sched.waiting.latest_start(waiting) == 1000.0  # no step measured yet
    sched.record_step_time(0.25)
    assert sched.step_time_s == 0.25 and sched.waiting.next_overdue_time(0.0) == pytest.approx(1000.0 - 100 * 0.25)
    sched.record_step_time(10 * 0.5, num_steps=10)  # a run of 10 steps = 10 updates with its mean step
    expected = 0.25
    for _ in range(10):
        expected += 0.05 * (0.5 - expected)
    assert sched.step_time_s == pytest.approx(expected)
    assert sched.waiting.next_overdue_time(0.0) == pytest.approx(1000.0 - 100 * expected)  # moved > 20%: rekeyed
    sched.record_step_time(0.0)  # nothing measured
    assert sched.step_time_s == pytest.approx(expected)
    seq = make_seq("c", 4, 1, pred=prediction(10, p90=20), max_tokens=100)
    assert sched.predicted_service_s(seq) == pytest.approx(10 * expected)  # the expected (mean) length
    assert sched.predicted_service_s(make_seq("d", 4, 1, max_tokens=40)) == pytest.approx(40 * expected)  # no prediction: max_tokens


def test_max_latency_bounds_the_end_to_end_time_of_a_long_request():
    """One slot, a long request among a stream of short ones: pure sjf holds it back to the end;
    with the objective it starts by arrival + max_latency_s - its expected decode time, and ends
    at the objective."""
    def run(max_latency_s):
        clock = Clock()
        sched = make_scheduler(num_blocks=512, clock=clock, max_num_seqs=1, policy="sjf",
                               aging_tok_per_step=0.0, max_latency_s=max_latency_s)
        sched.record_step_time(1.0)  # the step time drain's clock advances by
        sched.add(make_seq("first", 4, 3, arrival=0.0, pred=prediction(3), max_tokens=10))  # takes the slot
        long_seq = make_seq("long", 4, 50, arrival=0.0, pred=prediction(50), max_tokens=1000)
        sched.add(long_seq)
        arrivals = iter(range(10_000))

        def on_step(step, out):
            if step < 600 and step % 3 == 0:  # a 3-token request every 3 s keeps the slot busy
                i = next(arrivals)
                sched.add(make_seq(f"s{i}", 4, 3, arrival=clock.now, pred=prediction(3), max_tokens=1000))

        finished = drain(sched, on_step=on_step)
        return long_seq.finished_time - long_seq.arrival_time, finished[-1].request_id

    e2e, last = run(None)
    assert last == "long" and e2e > 500
    e2e, last = run(200.0)
    assert last != "long" and 200.0 - 5 <= e2e <= 200.0 + 5
