"""The simulator: exact on a single request, deterministic, fast-forward equal to step-by-step, sane
under load; predictions with the wanted rank quality; the cost model's fit and inverse."""
import json
import math

import numpy as np
import pytest

from lenserve.scheduler.cost_model import CostModel, fit, load_default
from lenserve.scheduler.simulator import (
    SimRequests,
    empirical_predictions,
    load_residuals,
    make_predictions,
    noisy_predictions,
    oracle_predictions,
    scheduler_config_for,
    sigma_for_tau,
    simulate,
    simulate_policies,
)

COST = CostModel(step_base_s=0.02, token_s=1e-4, sample_s=2e-3, prefill_attention_s=1e-8, decode_context_s=2e-6,
                 num_kv_blocks=2000, block_size=16, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=4096)


def _trace(n=300, rate=4.0, seed=0):
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.gamma(0.5, 2.0 / rate, n))
    prompt = np.clip(np.exp(rng.normal(5.0, 1.0, n)), 1, 2000).astype(int)
    output = np.clip(np.exp(rng.normal(4.0, 1.0, n)), 1, 1000).astype(int)
    return SimRequests.from_arrays(arrival, prompt, output, max_model_len=4096, max_tokens=1024)


def test_single_request_matches_the_cost_model_exactly():
    req = SimRequests.from_arrays(np.array([5.0]), np.array([100]), np.array([10]))
    res = simulate(req, scheduler_config_for(COST), COST)
    prefill = COST.step_time(100, 1, 100 * 101 / 2, 0)
    decodes = COST.decode_time(1, 101, 9)
    assert res.ttft_s[0] == pytest.approx(prefill)
    assert res.e2e_s[0] == pytest.approx(prefill + decodes)
    assert res.num_steps == 10 and res.output_tokens[0] == 10


@pytest.mark.parametrize("kv_reserve", ["none", "predicted", "max"])
@pytest.mark.parametrize("batching", ["continuous", "bucketed"])
def test_fast_forward_equals_step_by_step(kv_reserve, batching):
    req = _trace(200, rate=6.0)
    preds = noisy_predictions(req.output_tokens, 0.8, seed=1)
    config = scheduler_config_for(COST, policy="sjf", kv_reserve=kv_reserve, batching=batching, max_wait_s=20.0,
                                  fcfs_wait_bound=1.2)
    fast = simulate(req, config, COST, preds, num_kv_blocks=300)
    slow = simulate(req, config, COST, preds, num_kv_blocks=300, fast_forward=False)
    np.testing.assert_allclose(fast.e2e_s, slow.e2e_s, rtol=1e-9)
    np.testing.assert_allclose(fast.ttft_s, slow.ttft_s, rtol=1e-9)
    assert (fast.num_steps, fast.num_preemptions, fast.max_concurrent) == (slow.num_steps, slow.num_preemptions, slow.max_concurrent)
    assert fast.num_passes < slow.num_passes / 3


def test_fast_forward_follows_step_by_step_under_a_latency_objective():
    """max_latency_s reads the measured step time, which the fast path updates once a run of
    steps rather than at every step (so an arrival during a run is keyed with the step time at
    its start): the results agree within a few percent, not bit for bit."""
    req = _trace(300, rate=12.0)
    preds = noisy_predictions(req.output_tokens, 0.8, seed=1)
    config = scheduler_config_for(COST, policy="sjf", kv_reserve="predicted", aging_tok_per_step=0.0, max_latency_s=30.0)
    fast = simulate(req, config, COST, preds, num_kv_blocks=300)
    slow = simulate(req, config, COST, preds, num_kv_blocks=300, fast_forward=False)
    assert fast.e2e_s.mean() == pytest.approx(slow.e2e_s.mean(), rel=0.04)
    assert np.quantile(fast.e2e_s, 0.99) == pytest.approx(np.quantile(slow.e2e_s, 0.99), rel=0.02)
    assert fast.num_passes < slow.num_passes / 3


def test_deterministic_and_complete():
    req = _trace()
    preds = make_predictions("noisy:1.0", req.output_tokens, seed=3)
    a = simulate_policies(req, ["fcfs", "sjf", "oracle"], scheduler_config_for(COST, kv_reserve="predicted"), COST, preds)
    b = simulate_policies(req, ["fcfs", "sjf", "oracle"], scheduler_config_for(COST, kv_reserve="predicted"), COST, preds)
    strip = lambda r: {p: {k: v for k, v in s.items() if not k.startswith("sim_")} for p, s in r.items()}
    assert strip(a) == strip(b)
    for s in a.values():
        assert s["num_requests"] == len(req)
        assert s["p50_e2e_s"] <= s["p99_e2e_s"] and s["mean_ttft_s"] <= s["mean_e2e_s"]
        assert s["max_concurrent"] <= COST.max_num_seqs


def test_length_aware_policies_beat_fcfs_under_saturation():
    req = _trace(400, rate=12.0)  # well above what 16 slots serve
    res = simulate_policies(req, ["fcfs", "sjf", "oracle"], scheduler_config_for(COST), COST,
                            oracle_predictions(req.output_tokens))
    assert res["oracle"]["mean_e2e_s"] < 0.8 * res["fcfs"]["mean_e2e_s"]
    assert res["sjf"]["mean_e2e_s"] == pytest.approx(res["oracle"]["mean_e2e_s"], rel=0.05)  # exact predictions
    total = req.output_tokens.sum()
    for s in res.values():  # same work, so the same throughput within the drain-out tail
        assert s["throughput_tok_s"] == pytest.approx(total / s["makespan_s"])


def test_predicted_reservation_admits_more_than_max_tokens():
    req = _trace(300, rate=20.0)
    preds = oracle_predictions(req.output_tokens)
    config = scheduler_config_for(COST, max_num_seqs=256)
    by_p90 = simulate(req, config.__class__(**{**config.__dict__, "kv_reserve": "predicted"}), COST, preds, num_kv_blocks=400)
    by_max = simulate(req, config.__class__(**{**config.__dict__, "kv_reserve": "max"}), COST, preds, num_kv_blocks=400)
    assert by_p90.max_concurrent >= 2 * by_max.max_concurrent
    assert by_p90.num_preemptions == 0 == by_max.num_preemptions  # exact predictions never outgrow


def test_requests_are_cleaned_and_clipped():
    req = SimRequests.from_arrays(np.array([10.0, 12.0, 11.0]), np.array([50, 5000, 0]), np.array([20, 0, 9000]),
                                  time_scale=2.0, max_model_len=4096, max_tokens=100)
    # The failed row (no response) is dropped; times start at 0 and are halved; lengths fit 4096.
    assert req.arrival_s.tolist() == [0.0, 0.5]
    assert req.prompt_tokens.tolist() == [50, 1]
    assert req.output_tokens.tolist() == [20, 4095]
    assert req.max_tokens.tolist() == [100, 4095]
    assert req.num_clipped == 1
    # A long prompt with a short answer that fits keeps its prompt; one that does not fit keeps
    # as much of its prompt as leaves its answer room, the answer at most half the context.
    req = SimRequests.from_arrays(np.zeros(3), np.array([4000, 6000, 5000]), np.array([64, 3000, 1]), max_model_len=4096)
    assert req.prompt_tokens.tolist() == [4000, 2048, 4095]
    assert req.output_tokens.tolist() == [64, 2048, 1]
    assert req.num_clipped == 2


def test_noisy_predictions_reach_the_wanted_kendall_tau_and_are_calibrated():
    out = np.clip(np.exp(np.random.default_rng(0).normal(5.0, 1.0, 20000)), 1, None).astype(int)
    preds = make_predictions("noisy-tau:0.5", out, seed=0)
    assert preds.kendall_tau(out) == pytest.approx(0.5, abs=0.03)
    assert np.mean(out <= preds.p90) == pytest.approx(0.9, abs=0.02)  # p90 covers ~90%
    assert np.all(preds.p50 <= preds.mean) and np.all(preds.p50 <= preds.p90)
    assert sigma_for_tau(out, 0.5) == pytest.approx(np.log(out).std(), rel=1e-6)
    exact = oracle_predictions(out)
    assert exact.kendall_tau(out) == pytest.approx(1.0)


def test_empirical_predictions_resample_residuals_by_length(tmp_path):
    rng = np.random.default_rng(0)
    actual = np.clip(np.exp(rng.normal(5, 1, 5000)), 1, None)
    predicted = np.exp(0.5 * np.log(actual) + 2.5)  # regresses to the mean: long ones under-predicted
    path = tmp_path / "residuals.json"
    path.write_text(json.dumps({"actual": actual.tolist(), "predicted": predicted.tolist()}))
    res = load_residuals(str(path))
    out = np.array([10, 1000] * 500)
    preds = empirical_predictions(out, res, seed=0)
    assert np.median(preds.p50[out == 10]) > 10 and np.median(preds.p50[out == 1000]) < 1000
    assert np.all(preds.p90 >= preds.p50)
    lines = tmp_path / "residuals.jsonl"
    lines.write_text("\n".join(json.dumps({"actual": a, "predicted": p, "p90": 2 * p}) for a, p in zip(actual[:50], predicted[:50])))
    assert load_residuals(str(lines)).p90 is not None
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps([0.0, 0.1, -0.1]))
    assert make_predictions(f"empirical:{ratios}", out).source.startswith("empirical:")
    with pytest.raises(ValueError):
        make_predictions("guess", out)


def random_steps(rng, n: int) -> list[dict]:
    """Step features of `n` made-up steps (no step_s yet)."""
    return [{"num_tokens": int(rng.integers(1, 2048)), "num_sampled": int(rng.integers(1, 64)),
             "prefill_pairs": float(rng.integers(0, 10**6)), "decode_context": int(rng.integers(0, 10**5))} for _ in range(n)]


def test_cost_model_fit_recovers_coefficients_and_inverts():
    samples = [{**f, "step_s": COST.step_time(**f)} for f in random_steps(np.random.default_rng(0), 40)]
    fitted = fit(samples)
    for name in ("step_base_s", "token_s", "sample_s", "prefill_attention_s", "decode_context_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(COST, name), rel=1e-4, abs=1e-12)
    for k in (1, 2, 7, 100):
        t = COST.decode_time(8, 5000, k)
        assert COST.decode_steps_to(8, 5000, t) == k
        assert COST.decode_steps_to(8, 5000, t - 1e-9) == k
        assert COST.decode_steps_to(8, 5000, t + 1e-9) == k + 1
    expected = sum(COST.step_base_s + (COST.token_s + COST.sample_s) * 8 + COST.decode_context_s * (5000 + 8 * j) for j in range(7))
    assert COST.decode_time(8, 5000, 7) == pytest.approx(expected)


def test_default_cost_model_loads(tmp_path):
    cost = load_default()
    assert cost.step_base_s > 0 and cost.meta["num_samples"] > 0
    path = tmp_path / "c.json"
    COST.save(path)
    assert CostModel.load(path) == COST
    path.write_text("{}")
    with pytest.raises(ValueError, match="lacks"):
        CostModel.load(path)
    assert not math.isnan(cost.decode_time(4, 100, 3))


def test_cost_model_fit_shrugs_off_outlier_steps():
    """A few steps slowed down by something else on the machine do not move the fit: it predicts
    the other steps within a fraction of a percent (plain least squares: ~2%)."""
    rng = np.random.default_rng(1)
    steps = random_steps(rng, 60)
    slowed = set(range(0, 60, 15))  # 4 of 60 steps took 3x as long
    samples = [{**f, "step_s": COST.step_time(**f) * (3.0 if i in slowed else 1.0) * (1 + rng.normal(0, 0.01))}
               for i, f in enumerate(steps)]
    fitted = fit(samples)
    errors = [abs(fitted.step_time(**f) / COST.step_time(**f) - 1) for i, f in enumerate(steps) if i not in slowed]
    assert np.median(errors) < 0.006
