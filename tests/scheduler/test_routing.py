"""Prefix-aware routing: the pure policies (shared by the Ray Serve routers and the simulator),
and the simulator's per-replica prefix caches and cache-aware routers on traces with prefix blocks."""
import dataclasses

import numpy as np
import pytest

from lenserve.scheduler.cluster import ABLATION_ROUTERS, REFERENCE_ROUTERS, ROUTERS, simulate_cluster
from lenserve.scheduler.routing import (
    CacheAwarePolicy, PrefixIndex, cache_aware_costs, cache_aware_rank, imbalanced, ray_prefix_candidates, text_block_ids,
)
from lenserve.scheduler.simulator import SimRequests, make_predictions, scheduler_config_for
from lenserve.traces.sessions import MultiTurnConfig, shared_cache_hit_rate, synthesize_multiturn
from tests.scheduler.test_simulator import COST


def test_prefix_index_matches_leading_blocks_and_evicts_tails_first():
    idx = PrefixIndex(capacity_blocks=4)
    idx.insert((1, 2, 3))
    assert idx.match((1, 2, 3, 4)) == 3 and idx.match((1, 9, 3)) == 1 and idx.match((5,)) == 0
    idx.insert((1, 2, 7, 8))  # 5 blocks: the least recent goes, which is the older chain's tail
    assert len(idx) == 4 and 3 not in idx and idx.match((1, 2, 7, 8)) == 4 and idx.match((1, 2, 3)) == 2
    idx.remove((8,))
    assert idx.match((1, 2, 7, 8)) == 3
    with pytest.raises(ValueError):
        PrefixIndex(0)


def test_text_block_ids_are_prefix_chains_of_whole_chunks():
    a = text_block_ids("x" * 64 + "y" * 64 + "z" * 10, 64)
    b = text_block_ids("x" * 64 + "y" * 64 + "w" * 64, 64)
    c = text_block_ids("y" * 64 + "y" * 64, 64)
    assert len(a) == 2 and a == b[:2] and len(b) == 3
    assert c[1] != a[1]  # the same chunk after a different prefix is a different block


def test_text_block_ids_are_the_same_in_every_process():
    """A replica names the prefixes it caches by the ids its router computes: Python's string hash
    (salted per process) would not do."""
    import os
    import subprocess
    import sys

    text = "héllo wörld, 漢字 and a lone surrogate \ud800. " * 30
    code = ("from lenserve.scheduler.routing import text_block_ids\n"
            "print(list(text_block_ids('héllo wörld, 漢字 and a lone surrogate \\ud800. ' * 30)))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = [subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")]
    ids = text_block_ids(text)
    assert len(ids) == len(text) // 64 and all(0 <= i < 2**64 for i in ids)
    assert outs[0] == outs[1] == str(list(ids))


def test_cost_is_prefill_left_plus_weighted_work():
    policy = CacheAwarePolicy(prompt_weight=0.5, length_weight=2.0)
    assert cache_aware_costs(1000, [0, 800], [100.0, 300.0], policy) == [500 + 200, 100 + 600]
    # the replica holding 800 of 1000 tokens wins unless its queue outweighs the prefill saved
    assert cache_aware_rank(1000, [0, 800], [100.0, 200.0], [3, 3], policy)[0] == 1
    assert cache_aware_rank(1000, [0, 800], [100.0, 400.0], [3, 3], policy)[0] == 0
    # without the length term the cache decides alone
    assert cache_aware_rank(1000, [0, 800], [0.0, 1e6], [3, 3], CacheAwarePolicy(length_weight=0.0))[0] == 1


def test_imbalance_guard_routes_by_load_alone():
    policy = CacheAwarePolicy(balance_abs=4, balance_rel=1.5)
    assert imbalanced([10, 2], 4, 1.5) and not imbalanced([10, 7], 4, 1.5) and not imbalanced([5, 2], 4, 1.5)
    # replica 0 holds the whole prompt, but has 10 requests in flight against 2: the guard sends it to 1
    assert cache_aware_rank(1000, [999, 0], [0.0, 0.0], [10, 2], policy) == [1, 0]
    assert cache_aware_rank(1000, [999, 0], [0.0, 0.0], [5, 2], policy) == [0, 1]


def test_ties_fall_to_fewer_ongoing_then_the_tiebreak():
    policy = CacheAwarePolicy()
    assert cache_aware_rank(100, [0, 0, 0], [0.0, 0.0, 0.0], [2, 1, 2], policy)[0] == 1
    assert cache_aware_rank(100, [0, 0, 0], [0.0, 0.0, 0.0], [1, 1, 1], policy, [0.7, 0.9, 0.1])[0] == 2


def test_ray_prefix_rule():
    # longest match when it covers >= 10% of the prompt; else the smallest trees
    assert ray_prefix_candidates([0.5, 0.5, 0.2], [10, 3, 1], [0, 0, 0]) == [0, 1]
    assert ray_prefix_candidates([0.05, 0.0, 0.0], [10, 3, 3], [0, 0, 0]) == [1, 2]
    assert ray_prefix_candidates([0.9, 0.0], [1, 1], [9, 0], imbalanced_threshold=4) == [0, 1]


def _multiturn(num_sessions=150, rate=1.5, seed=0):
    cfg = MultiTurnConfig(num_sessions=num_sessions, session_rate_s=rate, mean_turns=5, think_time_s=8.0, min_gap_s=2.0,
                          system_tokens=128, max_prompt_tokens=3000, block_tokens=16, seed=seed)
    return synthesize_multiturn(cfg)


def test_replica_prefix_cache_cuts_prefill():
    """One replica: with its prefix cache, a session's later turns compute only their new tokens;
    the hit rate is that of one shared cache (they are the same cache) up to the cache's timing
    (blocks enter at the end of a prefill, not at arrival) and size (LRU eviction)."""
    trace = _multiturn(80)
    req = SimRequests.from_trace(trace, time_scale=0.2, max_tokens=2048)  # light load: turns find their history computed
    assert req.block_ids is not None and req.block_tokens == 16 and req.session_ids is not None
    config = scheduler_config_for(COST)
    cost = dataclasses.replace(COST, num_kv_blocks=50_000)  # room for every session's history
    res = simulate_cluster(req, 1, "pow2", config, cost)
    bound = shared_cache_hit_rate(trace)
    assert 0.9 * bound < res.extra["prefix_hit_rate"] <= bound + 1e-9
    # per request, what each found cached (no preemption here: the first start is the only one)
    assert res.per_replica[0]["preemptions"] == 0
    assert res.cached_tokens.sum() / req.prompt_tokens.sum() == pytest.approx(res.extra["prefix_hit_rate"])
    assert (res.cached_tokens < req.prompt_tokens).all() and res.cached_tokens[0] == 0
    small = simulate_cluster(req, 1, "pow2", config, dataclasses.replace(COST, num_kv_blocks=600))
    assert small.extra["prefix_hit_rate"] < 0.9 * res.extra["prefix_hit_rate"]  # LRU eviction
    # the same trace without prefix blocks computes every prompt in full: later first tokens
    plain = SimRequests.from_arrays(trace.columns.arrival_s, trace.columns.prompt_tokens, trace.columns.output_tokens, max_tokens=2048)
    res_plain = simulate_cluster(plain, 1, "pow2", config, cost)
    assert res.ttft_s.mean() < res_plain.ttft_s.mean()
    assert "prefix_hit_rate" not in res_plain.extra


def test_running_answers_leave_the_prefix_cache_less_room():
    """A replica's cached prefixes live in the KV blocks its running sequences leave: while a long
    answer decodes, the cache holds that many tokens fewer (LRU evicts the oldest prefixes), and
    gets the room back when it finishes."""
    from lenserve.scheduler.cluster import ReplicaSim

    B = 16
    # three 320-token prompts of distinct blocks arriving apart, then a 2000-token answer
    req = SimRequests.from_arrays(np.array([0.0, 10.0, 20.0, 30.0]), np.array([320, 320, 320, 64]), np.array([1, 1, 1, 2000]),
                                  max_tokens=2048, block_ids=[tuple(range(k * 20, k * 20 + 20)) for k in range(4)], block_tokens=B)
    cost = dataclasses.replace(COST, num_kv_blocks=128, block_size=B)  # 2048 tokens
    rep = ReplicaSim(req, scheduler_config_for(cost), cost, None, lambda seq: None)
    for i in range(3):
        rep.advance_to(float(req.arrival_s[i]))
        rep.add(i)
    rep.advance_to(29.0)
    assert rep.cached_tokens(0) == 319 and rep.cache.capacity_blocks == 128  # idle: the whole KV
    rep.advance_to(30.0)
    rep.add(3)
    rep.advance_to(30.0 + 1500 * COST.decode_time(1, 1000, 1))  # ~1,500 tokens into the answer
    assert rep.cached_tokens(2) == 319  # the most recent prompt stays
    assert rep.cache.capacity_blocks < 128 - 1400 / B and rep.cached_tokens(0) == 0  # the oldest went
    rep.drain()
    # the room comes back when the answer ends, but at its peak (2,064 tokens of a 2,048-token KV)
    # it had evicted every cached prefix
    assert rep.cached_tokens(2) == 0 and rep.cache.capacity_blocks == 128


def test_a_waiting_request_finds_its_prefix_at_admission_not_at_arrival():
    """As in an engine, the cache is looked up when a request starts: the part of a prefix cached
    when the request arrived but evicted while it waited (a long answer took the KV) is computed
    again; the router's view at arrival (cached_tokens) does not count as a hit."""
    from lenserve.scheduler.cluster import ReplicaSim

    B = 16
    shared = tuple(range(20))
    req = SimRequests.from_arrays(np.array([0.0, 10.0, 11.0]), np.array([320, 64, 400]), np.array([1, 1800, 1]), max_tokens=2048,
                                  block_ids=[shared, tuple(range(100, 104)), shared + tuple(range(200, 205))], block_tokens=B)
    cost = dataclasses.replace(COST, num_kv_blocks=128, block_size=B)  # 2048 tokens
    config = dataclasses.replace(scheduler_config_for(cost), max_num_seqs=1)  # the third waits for the second
    rep = ReplicaSim(req, config, cost, None, lambda seq: None)
    for i in range(3):
        rep.advance_to(float(req.arrival_s[i]))
        if i == 2:
            assert rep.cached_tokens(2) == 320  # the prefix is there as it arrives...
        rep.add(i)
    rep.drain()
    # ...and by its start the 1,864-token sequence had left room for 11 blocks: the prefix's first
    # 11 (tails go first), not the 20 it found on arrival
    assert rep.num_cached_tokens == 11 * B
    assert rep.num_prompt_tokens == 784


def test_every_router_finishes_every_request():
    trace = _multiturn(60)
    req = SimRequests.from_trace(trace, time_scale=2.0, max_tokens=2048)
    preds = make_predictions("oracle", req.output_tokens)
    config = scheduler_config_for(COST)
    for router in ROUTERS + ABLATION_ROUTERS + REFERENCE_ROUTERS:
        res = simulate_cluster(req, 3, router, config, COST, preds)
        assert not np.isnan(res.e2e_s).any(), router
        assert sum(r["num_requests"] for r in res.per_replica) == len(req)
        assert 0.0 <= res.extra["prefix_hit_rate"] <= 1.0


def test_cache_aware_keeps_prefix_hits_that_pow2_loses():
    """4 replicas, a multi-turn trace: pow2 scatters a session's turns (about 1 in 4 lands where its
    history is), cache-aware follows the prefix; its hit rate comes close to one shared cache's and
    well above pow2's, and the guard keeps every replica in use."""
    trace = _multiturn(200, rate=2.0, seed=1)
    req = SimRequests.from_trace(trace, time_scale=0.3, max_tokens=2048)  # replicas about half busy
    preds = make_predictions("oracle", req.output_tokens)
    config = scheduler_config_for(COST)
    pow2 = simulate_cluster(req, 4, "pow2", config, COST, preds)
    ca = simulate_cluster(req, 4, "cache-aware", config, COST, preds)
    bound = shared_cache_hit_rate(trace)
    assert ca.extra["prefix_hit_rate"] > 1.5 * pow2.extra["prefix_hit_rate"]
    assert ca.extra["prefix_hit_rate"] > 0.75 * bound
    counts = np.bincount(ca.replica, minlength=4)
    assert counts.min() > len(req) / 12, counts
    assert ca.ttft_s.mean() < pow2.ttft_s.mean()


def test_prefix_affinity_alone_collapses_on_a_shared_first_block():
    """Every prompt starts with the same block (Mooncake's conversation trace does): the longest
    prefix alone piles requests onto few replicas; cache-aware's cost and guard do not."""
    rng = np.random.default_rng(0)
    n = 300
    ids = [(0,) + tuple(range(1000 * (i + 1), 1000 * (i + 1) + 7)) for i in range(n)]
    arrival = np.sort(rng.uniform(0, 60, n))
    req = SimRequests.from_arrays(arrival, np.full(n, 128), rng.integers(20, 200, n), max_tokens=512, block_ids=ids, block_tokens=16)
    config = scheduler_config_for(COST)
    naive = np.bincount(simulate_cluster(req, 4, "prefix-affinity", config, COST).replica, minlength=4)
    ca = np.bincount(simulate_cluster(req, 4, "cache-aware", config, COST, make_predictions("oracle", req.output_tokens)).replica, minlength=4)
    assert naive.max() > 0.6 * n, naive
    assert ca.max() < 0.4 * n, ca
