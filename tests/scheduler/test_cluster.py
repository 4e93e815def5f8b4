"""Replicas behind a router in the simulator: one replica is the plain simulation, routers spread
and balance as they should, capacity planning finds the fewest replicas, and the CLI."""
import json

import numpy as np
import pytest

from lenserve.cli import main
from lenserve.scheduler.cluster import (
    SLO, JSQRouter, LeastWorkRouter, MinDelayRouter, ReplicaSim, plan_capacity, simulate_cluster, simulate_routers,
)
from lenserve.scheduler.simulator import SimRequests, make_predictions, scheduler_config_for, simulate
from tests.scheduler.test_simulator import COST, _trace


def test_one_replica_is_the_plain_simulation():
    req = _trace(400, rate=6.0)
    preds = make_predictions("noisy-tau:0.5", req.output_tokens)
    config = scheduler_config_for(COST, policy="sjf", kv_reserve="predicted")
    single = simulate(req, config, COST, preds)
    for router in ("least-work", "pow2", "round-robin", "jsq", "min-delay"):
        res = simulate_cluster(req, 1, router, config, COST, preds)
        np.testing.assert_allclose(res.e2e_s, single.e2e_s, rtol=1e-9)
        np.testing.assert_allclose(res.ttft_s, single.ttft_s, rtol=1e-9)


def test_every_request_finishes_once_on_some_replica():
    req = _trace(500, rate=12.0)
    config = scheduler_config_for(COST)
    for router in ("least-work", "pow2", "round-robin", "jsq", "min-delay"):
        res = simulate_cluster(req, 3, router, config, COST, make_predictions("oracle", req.output_tokens))
        assert not np.isnan(res.e2e_s).any() and (res.e2e_s >= res.ttft_s).all()
        assert (res.output_tokens == req.output_tokens).all()
        assert sum(r["num_requests"] for r in res.per_replica) == len(req)
        counts = np.bincount(res.replica, minlength=3)
        assert counts.min() > len(req) / 6, (router, counts)


def test_round_robin_takes_turns():
    req = _trace(30)
    res = simulate_cluster(req, 3, "round-robin", scheduler_config_for(COST), COST)
    assert res.replica.tolist() == [i % 3 for i in range(30)]


def test_least_work_avoids_the_replica_holding_a_long_request():
    # One very long request, then short ones: round-robin puts every other short one behind it
    # (max_num_seqs 1: FCFS replicas); least-work sends them all to the other replica.
    arrival = np.array([0.0] + [1.0 + i for i in range(10)])
    prompt = np.full(11, 10)
    output = np.array([1000] + [5] * 10)
    req = SimRequests.from_arrays(arrival, prompt, output, max_model_len=4096, max_tokens=1024)
    config = scheduler_config_for(COST, max_num_seqs=1)
    preds = make_predictions("oracle", req.output_tokens)
    lw = simulate_cluster(req, 2, "least-work", config, COST, preds, report_interval_s=0.5)
    rr = simulate_cluster(req, 2, "round-robin", config, COST, preds)
    assert set(lw.replica[1:].tolist()) == {1 - lw.replica[0]}
    assert lw.e2e_s[1:].mean() < rr.e2e_s[1:].mean() / 3


def _two_replicas_holding(outputs_a: list[int], outputs_b: list[int], new_output: int):
    """Two replicas at time 0: A holds requests with `outputs_a` tokens to come, B `outputs_b`;
    the last request (`new_output` tokens) is the one to route. Prompts are 1 token (prompt_weight
    makes them count for nearly nothing). Returns the replicas, every request's work (predicted and
    true alike) and the index to route."""
    outputs = outputs_a + outputs_b + [new_output]
    n = len(outputs)
    req = SimRequests.from_arrays(np.zeros(n), np.ones(n, np.int64), np.array(outputs), max_model_len=4096, max_tokens=2048)
    preds = make_predictions("oracle", req.output_tokens)
    config = scheduler_config_for(COST, max_num_seqs=64)
    replicas = [ReplicaSim(req, config, COST, preds, lambda seq: None) for _ in range(2)]
    work = [float(o) + config.prompt_weight for o in outputs]  # exact: oracle predictions
    for i in range(n - 1):
        replicas[0 if i < len(outputs_a) else 1].add(i, work[i])
    return replicas, work, n - 1


def test_reference_routers_choose_by_their_rules():
    # A: one request with 1000 tokens to come; B: four with 50 each. A 10-token request slows A's
    # one request for 10 steps, B's four for 10 steps each: min-delay and jsq pick A, least-work
    # (1000 > 200 tokens queued) picks B.
    replicas, work, i = _two_replicas_holding([1000], [50] * 4, 10)
    assert MinDelayRouter(replicas, true_work=work).choose(i, 0.0) == 0
    assert JSQRouter(replicas).choose(i, 0.0) == 0
    assert LeastWorkRouter(replicas, hints=work).choose(i, 0.0) == 1
    # A: two long requests; B: three nearly done. min-delay sees 2 x 10 on A against 3 x 3 on B.
    replicas, work, i = _two_replicas_holding([1000, 1000], [3] * 3, 10)
    assert MinDelayRouter(replicas, true_work=work).choose(i, 0.0) == 1
    assert JSQRouter(replicas).choose(i, 0.0) == 0


def test_min_delay_reads_true_work_left_as_replicas_run():
    replicas, _, _ = _two_replicas_holding([40, 7], [], 1)
    a = replicas[0]
    before = sorted(a.true_remaining_work())
    assert before == pytest.approx([7 + a.config.prompt_weight, 40 + a.config.prompt_weight])
    a.advance_to(COST.step_base_s * 20)  # some decode steps: the 7-token request is done, the other is shorter
    after = a.true_remaining_work()
    assert len(after) == 1 and 0 < after[0] < 40


def test_more_replicas_lower_latency():
    req = _trace(600, rate=20.0)
    config = scheduler_config_for(COST)
    e2e = [simulate_cluster(req, n, "pow2", config, COST).summary()["mean_e2e_s"] for n in (1, 2, 4)]
    assert e2e[0] > e2e[1] > e2e[2]


def test_plan_capacity_finds_the_fewest_replicas():
    req = _trace(400, rate=20.0)
    config = scheduler_config_for(COST)
    loose = simulate_cluster(req, 8, "round-robin", config, COST)
    slo = SLO(ttft_s=float(np.quantile(loose.ttft_s, 0.9)) * 1.5, tpot_s=float(np.quantile(loose.tpot_s, 0.9)) * 1.5, quantile=0.9)
    plan = plan_capacity(req, ["round-robin"], slo, config, COST, max_replicas=16)
    best = plan["min_replicas"]["round-robin"]
    assert best is not None and 1 <= best <= 8
    rows = {r["num_replicas"]: r["meets_slo"] for r in plan["rows"]}
    assert rows[best] and (best == 1 or rows.get(best - 1) is False)
    assert all(ok == (n >= best) for n, ok in rows.items())


def test_plan_capacity_gives_up_past_max_replicas():
    req = _trace(200, rate=20.0)
    plan = plan_capacity(req, ["pow2"], SLO(ttft_s=1e-9, tpot_s=1e-9), scheduler_config_for(COST), COST, max_replicas=3)
    assert plan["min_replicas"]["pow2"] is None


def test_simulate_routers_keys():
    req = _trace(100)
    out = simulate_routers(req, 2, ["pow2", "least-work"], scheduler_config_for(COST), COST)
    assert set(out) == {"pow2", "least-work"} and out["pow2"]["num_replicas"] == 2


def test_bad_router_and_replica_count():
    req = _trace(10)
    with pytest.raises(ValueError, match="router must be one of .*min-delay"):
        simulate_cluster(req, 2, "random", scheduler_config_for(COST), COST)
    with pytest.raises(ValueError, match="num_replicas"):
        simulate_cluster(req, 0, "pow2", scheduler_config_for(COST), COST)


def test_cli_replicas_and_capacity_plan(tmp_path, capsys):
    trace = "tests/data/traces/burstgpt_v1.csv"
    assert main(["simulate", "--trace", trace, "--replicas", "2", "--router", "least-work,pow2,min-delay", "--policies", "fcfs",
                 "--time-scale", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"least-work", "pow2", "min-delay"}
    png, table = tmp_path / "cap.png", tmp_path / "cap.json"
    assert main(["simulate", "--trace", trace, "--policies", "fcfs", "--plan-capacity", "--router", "round-robin",
                 "--slo-ttft-s", "1000", "--slo-tpot-s", "100", "--max-replicas", "4", "--plot", str(png), "--out", str(table)]) == 0
    assert "fewest replicas, round-robin: 1" in capsys.readouterr().out
    assert png.stat().st_size > 0 and json.loads(table.read_text())["min_replicas"] == {"round-robin": 1}
    assert main(["simulate", "--trace", trace, "--plan-capacity", "--policies", "fcfs"]) == 2
    assert "--slo-ttft-s" in capsys.readouterr().err
