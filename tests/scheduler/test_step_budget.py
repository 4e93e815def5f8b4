"""Stall-free batching: the token budget from an inter-token latency target, the online cost model
it is computed with, and the scheduler and simulator that use them."""
import numpy as np
import pytest

from lenserve.scheduler import BlockManager, Scheduler, SchedulerConfig
from lenserve.scheduler.cost_model import CostModel, OnlineCostModel, step_features
from lenserve.scheduler.simulator import SimRequests, scheduler_config_for, simulate, weighted_percentile
from lenserve.scheduler.step_budget import (
    MAX_GROWTH,
    growth_factor,
    max_prefill_tokens,
    prefill_token_budget,
    stall_weight,
)

from .helpers import Clock, make_seq, prediction, sample_tokens

# A CPU-like machine: 30 ms a step, 2 ms a token, attention noticeable at long context.
COST = CostModel(step_base_s=0.03, token_s=2e-3, sample_s=1e-3, prefill_attention_s=2e-7, decode_context_s=1e-6,
                 num_kv_blocks=4000, block_size=16, max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=8192)


def _decoding(n: int, context: int = 100, remaining: float | None = None):
    seqs = []
    for i in range(n):
        seq = make_seq(f"d{i}", context, 500, max_tokens=1000, pred=prediction(remaining + 1) if remaining is not None else None)
        seq.num_computed_tokens = context
        seq.append_token(7)  # one output token sampled, its KV not yet computed: a decode
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("num_decodes,context,chunk_context", [(1, 100, 0), (8, 700, 0), (4, 50, 3000), (20, 2000, 500)])
def test_max_prefill_tokens_is_the_largest_chunk_within_the_target(num_decodes, context, chunk_context):
    target = 0.25
    n = max_prefill_tokens(COST, num_decodes, num_decodes * context, target, chunk_context)

    def step(k):
        pairs = k * (chunk_context + (k + 1) / 2)
        return COST.step_time(num_decodes + k, num_decodes + 1, pairs, num_decodes * context)

    assert n > 0
    assert step(n) <= target + 1e-12 < step(n + 1)


def test_no_prefill_room_when_the_decodes_alone_reach_the_target():
    assert max_prefill_tokens(COST, 200, 200 * 1000, 0.1) == 0


def test_budget_is_the_cap_without_decodes_and_bounded_with_them():
    cap, min_chunk = 2048, 16
    assert prefill_token_budget(COST, [], 0.25, cap, min_chunk) == cap
    for n, target in ((1, 0.25), (8, 0.25), (30, 0.05), (8, 100.0)):
        decodes = _decoding(n)
        budget = prefill_token_budget(COST, decodes, target, cap, min_chunk)
        assert n + min_chunk <= budget <= cap
    # a tight target leaves only the minimum chunk; a loose one the cap
    assert prefill_token_budget(COST, _decoding(30), 0.05, cap, min_chunk) == 30 + min_chunk
    assert prefill_token_budget(COST, _decoding(8), 100.0, cap, min_chunk) == cap


def test_budget_grows_for_a_few_decodes_about_to_end():
    long_running = _decoding(1, remaining=500)
    ending = _decoding(1, remaining=4)
    assert stall_weight(long_running) == 1.0 and stall_weight(ending) == pytest.approx(4 / 32)
    assert growth_factor(1.0) == 1.0 and growth_factor(0.8) == pytest.approx(1.25) and growth_factor(0.01) == MAX_GROWTH
    grown = prefill_token_budget(COST, ending, 0.25, 2048, 16)
    plain = prefill_token_budget(COST, long_running, 0.25, 2048, 16)
    assert grown > plain
    assert grown - 1 == max_prefill_tokens(COST, 1, 101, 0.25 * MAX_GROWTH)
    # without a prediction a decode counts whole (its max_tokens left)
    assert stall_weight(_decoding(1)) == 1.0


def test_online_cost_model_recovers_the_machine_from_a_wrong_prior():
    rng = np.random.default_rng(0)
    truth = CostModel(0.05, 4e-3, 2e-3, 4e-7, 2e-6)  # 2x slower than the prior
    online = OnlineCostModel(prior=COST)
    assert online.model is COST
    for i in range(300):
        if i % 3 == 0:
            n, c = int(rng.integers(16, 1024)), int(rng.integers(0, 2000))
            f = {"num_tokens": n + 4, "num_sampled": 5, "prefill_pairs": n * (c + (n + 1) / 2), "decode_context": 4 * 300}
        else:
            b = int(rng.integers(1, 32))
            f = {"num_tokens": b, "num_sampled": b, "prefill_pairs": 0.0, "decode_context": b * int(rng.integers(50, 3000))}
        slow = 8.0 if i in (50, 51, 200) else 1.0  # the OS stalled these steps
        online.observe(f, truth.step_time(**f) * slow * (1 + rng.normal(0, 0.02)))
    assert online.num_refits > 10
    for f in ({"num_tokens": 512, "num_sampled": 1, "prefill_pairs": 512 * 256.5, "decode_context": 0},
              {"num_tokens": 16, "num_sampled": 16, "prefill_pairs": 0, "decode_context": 16 * 1000},
              {"num_tokens": 300, "num_sampled": 9, "prefill_pairs": 292 * 1000, "decode_context": 8 * 500}):
        assert online.model.step_time(**f) == pytest.approx(truth.step_time(**f), rel=0.1)


def test_online_cost_model_needs_steps_without_a_prior():
    online = OnlineCostModel(prior=None, refit_every=4)
    f = {"num_tokens": 4, "num_sampled": 4, "prefill_pairs": 0.0, "decode_context": 400}
    for _ in range(OnlineCostModel.MIN_SAMPLES - 1):
        online.observe(f, 0.05)
    assert online.model is None
    online.observe(f, 0.05)
    assert online.model is not None and online.model.step_time(**f) == pytest.approx(0.05, rel=1e-3)


class FakeRunner:
    """Runs a scheduler with a fixed set of long decodes and a queue of long prompts, timing each
    step by a true cost model times a slowdown that the test changes."""

    def __init__(self, target_s=0.25, min_chunk=16, cap=2048, num_decodes=6, cost_model=None):
        self.clock = Clock()
        self.online = OnlineCostModel(prior=COST, refit_every=4)
        config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=cap, max_model_len=8192, target_itl_s=target_s, min_prefill_chunk=min_chunk)
        self.sched = Scheduler(config, BlockManager(20000, 16), clock=self.clock, cost_model=cost_model or self.online)
        self.slowdown = 1.0
        self.n = 0
        for i in range(num_decodes):
            self.sched.add(make_seq(f"d{i}", 20, 100000, max_tokens=7000))
        self.budgets = []
        self.step_times = []

    def add_prompt(self, length=4000):
        self.n += 1
        distinct = [3 + (self.n * 7919 + i) % 40000 for i in range(length)]  # no prefix-cache hits between prompts
        self.sched.add(make_seq(f"p{self.n}", length, 100000, max_tokens=7000, prompt=distinct))

    def step(self):
        out = self.sched.schedule()
        f = step_features(zip(out.seqs, out.num_new_tokens))
        dt = COST.step_time(**f) * self.slowdown
        self.clock.now += dt
        self.sched.record_step_time(dt)
        self.sched.update(out, sample_tokens(out))
        self.budgets.append(self.sched.last_token_budget)
        self.step_times.append(dt)
        return out


def test_budget_shrinks_when_steps_slow_down_and_grows_back():
    run = FakeRunner()
    for _ in range(3):
        run.step()  # the decodes' prompts
    for _ in range(12):
        run.add_prompt()
    for _ in range(100):
        run.step()
    fast = run.budgets[-1]
    assert run.step_times[-1] == pytest.approx(0.25, rel=0.1)
    run.slowdown = 2.0
    for _ in range(100):
        run.step()
    slow = run.budgets[-1]
    assert slow < 0.7 * fast
    assert run.step_times[-1] == pytest.approx(0.25, rel=0.1)  # the fit found the slower machine
    run.slowdown = 1.0
    for _ in range(100):
        run.step()
    assert run.budgets[-1] > 1.3 * slow
    assert run.step_times[-1] == pytest.approx(0.25, rel=0.1)
    num_decodes = 6
    assert all(num_decodes + 16 <= b <= 2048 for b in run.budgets[3:])


def test_noisy_steps_stay_within_the_target_most_of_the_time():
    """Step times scattered +-30% around the model: the budget aims below the target by the
    overrun the fit sees, so about 90% of steps keep within it, not half."""
    rng = np.random.default_rng(3)
    run = FakeRunner()
    for _ in range(3):
        run.step()
    for _ in range(12):
        run.add_prompt()
    for _ in range(200):
        run.slowdown = float(rng.uniform(0.7, 1.3))
        run.step()
    late = np.array(run.step_times[100:])
    assert 1.1 < run.online.overrun < 1.5
    assert np.mean(late <= 0.25) >= 0.8
    assert np.percentile(late, 99) <= 1.5 * 0.25


# A model where plain decode steps of 6 streams fit a 25 ms target with 3 ms to spare: 2 prompt tokens.
TIGHT = CostModel(step_base_s=0.01, token_s=0.001, sample_s=0.001, prefill_attention_s=0.0, decode_context_s=0.0)


def test_budget_never_below_the_minimum_chunk_nor_above_the_cap():
    run = FakeRunner(target_s=0.025, min_chunk=24, cap=100, cost_model=TIGHT)
    for _ in range(3):
        run.step()
    assert len(run.sched.running) == 6
    run.add_prompt(500)
    for _ in range(20):
        out = run.step()
        assert run.budgets[-1] == 6 + 24
        assert sum(out.num_new_tokens) <= 6 + 24
    assert run.sched.requests["p1"].num_computed_tokens == 20 * 24
    loose = FakeRunner(target_s=50.0, cap=100)
    loose.add_prompt(500)
    for _ in range(5):
        loose.step()
        assert loose.budgets[-1] <= 100


def test_admission_holds_the_decode_set_to_the_target():
    """Plain decode steps of 10 streams take 30 ms: with a 25 ms target at most 7 run at once
    (7 x 2 ms + 10 ms = 24 ms), the rest wait in order, and every request still finishes."""
    clock = Clock()
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=4096, target_itl_s=0.025)
    sched = Scheduler(config, BlockManager(4000, 16), clock=clock, cost_model=TIGHT)
    for i in range(10):
        sched.add(make_seq(f"r{i}", 1, 20 + i))
    most = 0
    for _ in range(400):
        out = sched.schedule()
        most = max(most, len(sched.running))
        sched.update(out, sample_tokens(out))
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert most == 7
    # the first stream is always admitted, however tight the target
    alone = Scheduler(SchedulerConfig(max_model_len=4096, target_itl_s=1e-6), BlockManager(100, 16), clock=clock, cost_model=TIGHT)
    alone.add(make_seq("a", 5, 3))
    alone.add(make_seq("b", 5, 3))
    out = alone.schedule()
    assert [s.request_id for s in out.seqs] == ["a"]


def test_no_prompt_waits_forever_under_a_steady_stream_of_decodes():
    """Short requests keep arriving and decoding, and the decodes leave no room under the target
    for a prompt chunk: a long prompt still completes its prefill, the minimum chunk a step, and a
    prompt that finds the decode set full is admitted as soon as streams end (nothing passes it)."""
    run = FakeRunner(target_s=0.025, min_chunk=16, num_decodes=0, cost_model=TIGHT)
    run.add_prompt(1000)
    long_prompt = run.sched.requests["p1"]
    admitted_at, prefilled_at = {}, None
    for step in range(300):
        if step % 6 == 0:
            run.sched.add(make_seq(f"s{step}", 8, 30))
        run.step()
        for seq in run.sched.running:
            admitted_at.setdefault(seq.request_id, step)
        if prefilled_at is None and long_prompt.num_computed_tokens >= long_prompt.num_prompt_tokens:
            prefilled_at = step
    assert prefilled_at is not None and prefilled_at <= 1000 // 16 + 5
    shorts = [f"s{i}" for i in range(0, 250, 6)]
    starts = [admitted_at[r] for r in shorts]  # every one admitted, in arrival order, each within a stream's life
    assert starts == sorted(starts)
    assert all(start - 6 * i <= 40 for i, start in enumerate(starts))


def test_decodes_get_their_token_before_a_prompt_chunk():
    clock = Clock()
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096)
    sched = Scheduler(config, BlockManager(1000, 16), clock=clock)
    sched.add(make_seq("short", 10, 50))
    sched.add(make_seq("long", 1000, 10))
    out = sched.schedule()
    assert dict(zip([s.request_id for s in out.seqs], out.num_new_tokens)) == {"short": 10, "long": 54}
    sched.update(out, sample_tokens(out))
    sched.running.reverse()  # the decode behind the prompt in admission order (as after a preemption)
    out = sched.schedule()
    assert dict(zip([s.request_id for s in out.seqs], out.num_new_tokens)) == {"short": 1, "long": 63}


def test_weighted_percentile_equals_numpy_on_the_repeated_values():
    rng = np.random.default_rng(1)
    values = rng.random(50)
    counts = rng.integers(1, 20, 50)
    flat = np.repeat(values, counts)
    for q in (1, 50, 90, 99, 100):
        assert weighted_percentile(values, counts, q) == np.percentile(flat, q, method="inverted_cdf")
    assert np.isnan(weighted_percentile(np.zeros(0), np.zeros(0, np.int64), 50))


def _long_prompt_mix(n=120, rate=0.3, seed=0):
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / rate, n))
    prompt = rng.integers(150, 7000, n)
    output = rng.integers(20, 200, n)
    return SimRequests.from_arrays(arrival, prompt, output, max_model_len=8192, max_tokens=256)


def test_simulated_itl_follows_the_target_and_fast_forward_agrees():
    req = _long_prompt_mix()
    fixed = simulate(req, scheduler_config_for(COST), COST).summary()
    target = 0.25
    config = scheduler_config_for(COST, target_itl_s=target)
    stall_free = simulate(req, config, COST).summary()
    stepwise = simulate(req, config, COST, fast_forward=False).summary()
    assert fixed["p99_itl_s"] > 4 * target  # 2,048-token chunks stall the streams
    assert stall_free["p99_itl_s"] <= MAX_GROWTH * target + 1e-9
    assert stall_free["p99_itl_s"] < 0.3 * fixed["p99_itl_s"]
    assert stall_free["num_requests"] == fixed["num_requests"] == len(req)
    for key in ("mean_itl_s", "p99_itl_s", "mean_ttft_s", "mean_e2e_s"):
        assert stepwise[key] == pytest.approx(stall_free[key], rel=0.02)


def test_online_fit_does_not_price_prompt_chunks_by_the_speed_of_decode_steps():
    """Live, a stream costs more than offline (its token is sent while the next step runs) and a
    prompt token does not: a refit over many decode steps and a few 2,000-token steps must not carry
    the decode steps' slowness into the price of prompt tokens (the prior's speed is read per kind)."""
    prior = CostModel(0.025, 1.85e-3, 0.4e-3, 3e-7, 1.7e-6, meta={"samples": [
        {"num_tokens": n, "num_sampled": 1, "prefill_pairs": n * (n + 1) / 2, "decode_context": 0} for n in (128, 512, 1024)] + [
        {"num_tokens": b, "num_sampled": b, "prefill_pairs": 0.0, "decode_context": b * 400} for b in (1, 8, 32)]})
    live = CostModel(0.040, 1.85e-3, 2.6e-3, 3e-7, 1.7e-6)  # the same prompt tokens, streams 2.2 ms dearer
    rng = np.random.default_rng(0)
    online = OnlineCostModel(prior=prior)
    for i in range(600):
        b = int(rng.integers(10, 40))
        n = 2048 - b if i % 40 == 0 else 0
        f = {"num_tokens": n + b, "num_sampled": b + (n > 0), "prefill_pairs": n * (n + 1) / 2, "decode_context": b * 600}
        online.observe(f, live.step_time(**f) * (1 + rng.normal(0, 0.05)))
    big_chunk = {"num_tokens": 2048, "num_sampled": 31, "prefill_pairs": 2018 * 1009.5, "decode_context": 30 * 600}
    decode = {"num_tokens": 30, "num_sampled": 30, "prefill_pairs": 0.0, "decode_context": 30 * 600}
    assert online.model.step_time(**big_chunk) == pytest.approx(live.step_time(**big_chunk), rel=0.06)
    assert online.model.step_time(**decode) == pytest.approx(live.step_time(**decode), rel=0.03)


def test_cost_model_residuals_are_measured_over_predicted_of_its_samples():
    samples = [{"num_tokens": 10, "num_sampled": 10, "prefill_pairs": 0.0, "decode_context": 0, "step_s": 0.06},
               {"num_tokens": 100, "num_sampled": 1, "prefill_pairs": 5050.0, "decode_context": 0, "step_s": 0.2}]
    cost = CostModel(0.01, 4e-3, 1e-3, 0.0, 0.0, meta={"samples": samples})
    assert cost.residuals().tolist() == pytest.approx([0.06 / 0.06, 0.2 / 0.411])
    assert len(COST.residuals()) == 0


def test_step_noise_scatters_simulated_steps_and_the_budget_aims_below_the_target():
    """With step noise the simulator's steps scatter (seeded: the same seed, the same run), the
    budget discounts the target by the noise's 90th percentile as the engine does with its online
    model's overrun, and ITL p99 rises above the noiseless run's, which sits at the target."""
    req = _long_prompt_mix(n=60)
    config = scheduler_config_for(COST, target_itl_s=0.25)
    plain = simulate(req, config, COST).summary()
    noise = np.random.default_rng(5).lognormal(0.0, 0.15, 200)
    noisy = simulate(req, config, COST, step_noise=noise, seed=1).summary()
    again = simulate(req, config, COST, step_noise=noise, seed=1).summary()
    other = simulate(req, config, COST, step_noise=noise, seed=2).summary()
    assert noisy["p99_itl_s"] == again["p99_itl_s"] and noisy["mean_ttft_s"] == again["mean_ttft_s"]
    assert noisy["p99_itl_s"] != other["p99_itl_s"]
    assert noisy["p99_itl_s"] > plain["p99_itl_s"]
    assert noisy["p99_itl_s"] <= MAX_GROWTH * 0.25 * noise.max()
    # the budget aims at target / q90(noise): median simulated gap below the noiseless one
    assert noisy["p50_itl_s"] < plain["p50_itl_s"]
    assert noisy["num_requests"] == len(req)


def test_observe_returns_measured_over_predicted_under_the_model_in_force():
    """The ratio is taken against the model that priced the step, before the step refits it."""
    f = {"num_tokens": 10, "num_sampled": 4, "prefill_pairs": 0.0, "decode_context": 400}
    assert OnlineCostModel(prior=None).observe(f, 0.05) is None  # no model yet
    online = OnlineCostModel(prior=COST, refit_every=1)
    assert online.observe({**f, "num_tokens": 0}, 0.05) is None  # an empty step says nothing
    ratios = []
    for _ in range(12):
        predicted = online.model.step_time(**f)
        ratios.append(online.observe(f, 0.05))
        assert ratios[-1] == pytest.approx(0.05 / predicted)
    assert abs(ratios[-1] - 1) < abs(ratios[0] - 1)  # the refits follow the measured steps


def test_refits_wait_for_the_measured_time_as_well_as_the_steps():
    """refit_min_s: a refit every refit_every steps only once that much measured step time has
    passed since the last (the engine's 0.25 s spares a batch-1 decode most of its refits)."""
    f = {"num_tokens": 1, "num_sampled": 1, "prefill_pairs": 0.0, "decode_context": 300}
    counts = {}
    for min_s in (0.0, 0.1):
        online = OnlineCostModel(prior=COST, refit_every=4, refit_min_s=min_s)
        refits_at = []
        for i in range(1, 41):
            online.observe(f, 2.0**-6)  # 15.625 ms, exact in binary: the sums below are exact
            if online.num_refits > len(refits_at):
                refits_at.append(i)
        counts[min_s] = refits_at
    # the first refit waits for MIN_SAMPLES (8) steps; then every 4 steps, or every 7 (0.109 s)
    assert counts[0.0] == list(range(8, 41, 4))
    assert counts[0.1] == [8, 15, 22, 29, 36]


def test_samples_from_histogram_stand_for_the_observations():
    from lenserve.scheduler.cost_model import samples_from_histogram

    bounds = [2 ** (k / 8) for k in range(-16, 17)] + [float("inf")]
    values = np.concatenate([np.random.default_rng(2).lognormal(0.1, 0.2, 1000), [0.1, 9.0]])  # one under, one over
    cumulative = [(values <= b).sum() for b in bounds]
    out = samples_from_histogram(bounds, cumulative)
    assert len(out) == len(values)
    assert out.min() == pytest.approx(0.25) and out.max() == pytest.approx(4.0)  # the edge buckets at their finite bound
    for q in (5, 50, 95):
        assert np.percentile(out, q) == pytest.approx(np.percentile(values, q), rel=0.09)
    assert len(samples_from_histogram([], [])) == 0
    with pytest.raises(ValueError):
        samples_from_histogram([1.0, float("inf")], [5, 3])  # cumulative counts cannot fall


def test_online_nnls_matches_scipy():
    """The refit's numpy-only solver against scipy's, on problems where constraints bind and where
    they do not, well and badly scaled."""
    from scipy.optimize import nnls

    from lenserve.scheduler.cost_model import _nnls

    rng = np.random.default_rng(5)
    for trial in range(60):
        m, n = int(rng.integers(6, 80)), 5
        a = rng.normal(size=(m, n)) * (10.0 ** rng.integers(-3, 3, n))
        truth = rng.normal(size=n)  # some negative: those constraints bind
        b = a @ truth + rng.normal(0, 0.1, m)
        ours, ref = _nnls(a, b), nnls(a, b, maxiter=1000)[0]
        assert (ours >= 0).all()
        assert np.linalg.norm(a @ ours - b) <= np.linalg.norm(a @ ref - b) * (1 + 1e-9) + 1e-12
        assert ours == pytest.approx(ref, rel=1e-6, abs=1e-9)
    # two equal columns (a decode-only step samples every token): the optimum is not unique, so
    # only its residual is compared
    for trial in range(20):
        m = int(rng.integers(6, 80))
        a = np.abs(rng.normal(size=(m, 5)))
        a[:, 2] = a[:, 1]
        b = a @ rng.normal(size=5) + rng.normal(0, 0.1, m)
        ours, ref = _nnls(a, b), nnls(a, b, maxiter=1000)[0]
        assert (ours >= 0).all()
        assert np.linalg.norm(a @ ours - b) <= np.linalg.norm(a @ ref - b) * (1 + 1e-9) + 1e-12


def test_max_throughput_bounds_the_simulated_schedules():
    """The reference bounds what the simulator's schedules reach on the same requests, all queued
    at once: the fixed budget comes close to the unconstrained bound, the ITL-target schedule stays
    under the target-holding bound, and that bound is the lower of the two."""
    from lenserve.scheduler.step_budget import max_throughput

    rng = np.random.default_rng(7)
    n = 300
    prompt = rng.integers(50, 1500, n)
    output = rng.integers(20, 300, n)
    req = SimRequests.from_arrays(np.zeros(n), prompt, output, max_model_len=4096, max_tokens=4096)
    out = {}
    for target in (None, 0.25):
        cfg = scheduler_config_for(COST, max_num_batched_tokens=2048, max_model_len=4096, target_itl_s=target)
        s = simulate(req, cfg, COST).summary()
        out[target] = (s["throughput_tok_s"], max_throughput(COST, prompt, output, target, cfg.max_num_seqs))
    (fixed, fixed_bound), (held, held_bound) = out[None], out[0.25]
    # the schedules come within a few percent of their bounds: the target's price in capacity is
    # the constraint's, not the scheduler's
    assert 0.9 * fixed_bound <= fixed <= fixed_bound * 1.01
    assert 0.9 * held_bound <= held <= held_bound * 1.01
    assert held_bound < fixed_bound
    assert max_throughput(COST, prompt, output, COST.step_base_s / 2) == 0.0  # a target below one step's base


def test_lifetime_model_is_the_fit_over_every_step_but_stalls():
    """The lifetime fit equals one weighted NNLS over all the steps observed (relative error), from
    normal equations kept in constant memory; a step 3x slower than the model in force is left out."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(11)
    online = OnlineCostModel(prior=COST, window=64)  # a window far shorter than the run
    rows, times = [], []
    for i in range(400):
        d = int(rng.integers(1, 40))
        n = int(rng.integers(0, 300)) if i % 3 == 0 else 0
        f = {"num_tokens": d + n, "num_sampled": d, "prefill_pairs": float(n * (n + 1) / 2), "decode_context": d * int(rng.integers(50, 900))}
        t = COST.step_time(**f) * 1.3 * (1 + rng.normal(0, 0.03))
        if i == 200:
            t *= 10  # an OS stall
        else:
            rows.append([1.0, f["num_tokens"], f["num_sampled"], f["prefill_pairs"], f["decode_context"]])
            times.append(t)
        online.observe(f, t)
    a, y = np.array(rows), np.array(times)
    scale = np.abs(a).max(axis=0)
    ref = nnls(a / scale / y[:, None], np.ones(len(y)), maxiter=1000)[0] / scale
    got = online.lifetime_model()
    assert got.meta["num_samples"] == 399
    assert [getattr(got, k) for k in ("step_base_s", "token_s", "sample_s", "prefill_attention_s", "decode_context_s")] == \
        pytest.approx(ref, rel=1e-5, abs=1e-12)
    assert got.step_time(20, 20, 0.0, 8000) == pytest.approx(1.3 * COST.step_time(20, 20, 0.0, 8000), rel=0.05)
    assert OnlineCostModel(prior=COST).lifetime_model() is None


@pytest.mark.parametrize("srpt", [True, False])
def test_a_short_prompt_starts_ahead_of_a_long_prompt_in_progress(srpt):
    """Under a target with sjf, a short request arriving while a long prompt is being chunked
    starts at once (shortest remaining prefill first), and the long prompt keeps the minimum chunk
    every step; with prefill_srpt off, the short one waits out the long prompt's chunking."""
    clock = Clock()
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=8192, target_itl_s=0.25,
                             min_prefill_chunk=16, policy="sjf", prefill_srpt=srpt)
    sched = Scheduler(config, BlockManager(20000, 16), clock=clock, cost_model=COST)
    sched.add(make_seq("d0", 20, 1000, max_tokens=1000, pred=prediction(1000)))
    for _ in range(2):  # d0 decoding
        out = sched.schedule()
        sched.update(out, sample_tokens(out))
    distinct = [3 + (i * 7919) % 40000 for i in range(3000)]
    sched.add(make_seq("long", 3000, 10, pred=prediction(10), prompt=distinct))
    out = sched.schedule()
    sched.update(out, sample_tokens(out))
    chunk = dict(zip([s.request_id for s in out.seqs], out.num_new_tokens))["long"]
    assert 16 < chunk < 3000  # chunked under the target
    sched.add(make_seq("short", 40, 10, pred=prediction(10), prompt=[40000 + i for i in range(40)]))
    long = sched.requests["long"]
    first_token_step = None
    for step in range(60):
        out = sched.schedule()
        took = dict(zip([s.request_id for s in out.seqs], out.num_new_tokens))
        if srpt and step == 0:
            assert took["short"] == 40 and took["long"] >= 16 and took["d0"] == 1
        sched.update(out, sample_tokens(out))
        if first_token_step is None and sched.requests["short"].num_output_tokens:
            first_token_step = step
    if srpt:
        assert first_token_step == 0
    else:
        # the long prompt's chunks all come first: ~3000 / chunk steps
        assert first_token_step >= (3000 - chunk) // chunk - 1
    assert long.num_computed_tokens >= 3000  # and the long prompt still finished its prefill


def test_lifetime_scatter_is_the_lifetime_fits_own():
    """Steps drawn from a true model times known noise: the lifetime fit's residual quantiles
    (over its reservoir of steps) are the noise's, and the reservoir stays bounded."""
    from lenserve.scheduler.cost_model import LIFETIME_QUANTILES, LIFETIME_RESERVOIR

    rng = np.random.default_rng(3)
    online = OnlineCostModel(prior=COST, refit_every=64)
    assert online.lifetime_residual_quantiles() == {}
    noise = rng.lognormal(0.0, 0.1, 3 * LIFETIME_RESERVOIR)
    for i, eps in enumerate(noise):
        n = int(rng.integers(1, 400))
        f = {"num_tokens": n, "num_sampled": int(rng.integers(1, 16)), "prefill_pairs": float(n * rng.integers(0, 2000)),
             "decode_context": int(rng.integers(0, 20000))}
        online.observe(f, COST.step_time(**f) * eps)
    q = online.lifetime_residual_quantiles()
    assert list(q) == list(LIFETIME_QUANTILES) and len(online._reservoir) == LIFETIME_RESERVOIR
    want = np.quantile(noise, LIFETIME_QUANTILES) / np.median(noise)  # the fit absorbs the noise's scale
    got = np.array(list(q.values())) / q[0.49]
    assert np.abs(got - want).max() < 0.03


def test_nnls_guessed_support_gives_the_exact_optimum():
    """A refit first tries the last fit's support: kept only where it is the optimum's, so the
    result equals the full search's whether the guess is right, wrong, too large, or collinear."""
    from lenserve.scheduler.cost_model import _nnls, _support_optimum

    rng = np.random.default_rng(7)
    trials = kept = 0
    for trial in range(60):
        m, n = int(rng.integers(8, 80)), 5
        a = np.abs(rng.normal(size=(m, n))) * (10.0 ** rng.integers(-2, 2, n))
        b = a @ rng.normal(size=n) + rng.normal(0, 0.1, m)
        exact = _nnls(a, b)
        right = tuple(int(i) for i in np.flatnonzero(exact > 0))
        for guess in (right, tuple(range(n)), (0,), tuple(int(i) for i in rng.permutation(n)[:2])):
            assert _nnls(a, b, guess) == pytest.approx(exact, rel=1e-6, abs=1e-9)
        if right:  # the right guess is taken as it is: one solve, no search
            norm = np.linalg.norm(a, axis=0)
            an = a / norm
            trials += 1
            kept += _support_optimum(an.T @ an, an.T @ b, right) is not None
    assert trials > 20 and kept == trials
    a = np.abs(rng.normal(size=(30, 5)))
    a[:, 2] = a[:, 1]  # collinear: the guess cannot be solved, the full search runs
    b = a @ np.array([1.0, 0.5, 0.5, 0.2, 0.1])
    assert np.linalg.norm(a @ _nnls(a, b, (0, 1, 2, 3, 4)) - b) <= np.linalg.norm(a @ _nnls(a, b) - b) * (1 + 1e-9) + 1e-12
