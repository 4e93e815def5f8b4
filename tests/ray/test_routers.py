"""The Ray Serve routers' choices, on stand-in replicas (no cluster): least predicted work with
the requests sent since each report, round-robin turns, session affinity, cache-aware matching on
the replicas' history or prefix digests."""
import asyncio
import time
from types import SimpleNamespace

from lenserve.server.ray_router import LeastWorkRouter, RoundRobinRouter, session_key


def _replica(name: str, work: float = 0.0, at: float = 0.0, mean: float | None = None):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), routing_stats={"work": work, "time": at, "mean_request_work": mean})


def _request(body: dict | None = None, rid: str = "r"):
    return SimpleNamespace(args=["completions", body or {}], kwargs={}, metadata=SimpleNamespace(internal_request_id=rid))


def _router(cls, **kwargs):
    router = object.__new__(cls)
    router.initialize_state(**kwargs)
    return router


def _choose(router, replicas, request=None):
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    return [r.replica_id.unique_id for rank in ranks for r in rank]


def test_least_work_ranks_by_reported_work_plus_unreported_sends():
    now = time.time()
    a, b = _replica("a", work=1000, at=now - 5, mean=100), _replica("b", work=700, at=now - 5, mean=100)
    router = _router(LeastWorkRouter)
    assert _choose(router, [a, b]) == ["b", "a"]
    for i in range(4):  # 4 x 100 sent to b after its report: 1100 > 1000
        router.on_request_routed(_request(rid=f"x{i}"), b.replica_id, None)
    assert _choose(router, [a, b]) == ["a", "b"]
    for i in range(4):
        router.on_request_completed(b.replica_id, f"x{i}")
    assert _choose(router, [a, b]) == ["b", "a"]


def test_sends_before_a_report_are_in_it():
    a, b = _replica("a", work=500), _replica("b", work=600)
    router = _router(LeastWorkRouter)
    router.on_request_routed(_request(rid="old"), a.replica_id, None)
    a.routing_stats["time"] = time.time() + 1  # a reported after that send
    assert _choose(router, [a, b])[0] == "a"


def test_a_report_shrinks_as_its_requests_complete():
    now = time.time()
    a, b = _replica("a", work=1000, at=now - 1), _replica("b", work=600, at=now - 1)
    a.routing_stats["unfinished"] = 4  # the report covers 4 requests this router sent before it
    b.routing_stats["unfinished"] = 3  # sent by another ingress: never discounted here
    router = _router(LeastWorkRouter)
    for i in range(4):
        router.on_request_routed(_request(rid=f"a{i}"), a.replica_id, None)
        router._inflight[f"a{i}"] = (a.replica_id, now - 2)
    assert _choose(router, [a, b])[0] == "b"
    for i in range(3):  # 3 of a's 4 done since its report: about 250 left
        router.on_request_completed(a.replica_id, f"a{i}")
    assert _choose(router, [a, b])[0] == "a"


def test_round_robin_turns():
    reps = [_replica(n) for n in "abc"]
    router = _router(RoundRobinRouter)
    assert [_choose(router, reps)[0] for _ in range(6)] == list("abcabc")


def test_session_affinity_sticks_to_the_first_replica():
    reps = [_replica(n) for n in "abc"]
    router = _router(RoundRobinRouter, session_affinity=True)
    first = _request({"user": "alice"})
    chosen = _choose(router, reps, first)[0]
    router.on_request_routed(first, next(r.replica_id for r in reps if r.replica_id.unique_id == chosen), None)
    for _ in range(4):
        assert _choose(router, reps, _request({"user": "alice"}))[0] == chosen
    # a session whose replica is gone is routed afresh
    left = [r for r in reps if r.replica_id.unique_id != chosen]
    assert _choose(router, left, _request({"user": "alice"}))[0] in {r.replica_id.unique_id for r in left}
    assert session_key({"session_id": "s1", "user": "u"}) == "s1" and session_key({}) is None


def test_least_work_breaks_ties_at_random():
    router = _router(LeastWorkRouter)
    reps = [_replica(n) for n in "abc"]
    firsts = {_choose(router, reps)[0] for _ in range(60)}
    assert firsts == set("abc")


def test_concurrent_choices_do_not_herd():
    """Requests chosen for but not yet routed count on their replica: four choices made before any
    routing alternate between two equal replicas; routing a request keeps it counted once."""
    router = _router(LeastWorkRouter)
    reps = [_replica("a", mean=100), _replica("b", mean=100)]
    firsts = [_choose(router, reps, _request(rid=f"r{i}"))[0] for i in range(4)]
    assert sorted(firsts) == ["a", "a", "b", "b"]
    by_id = {r.replica_id.unique_id: r.replica_id for r in reps}
    router.on_request_routed(_request(rid="r0"), by_id[firsts[0]], None)
    assert len(router._provisional) == 3 and len(router._inflight) == 1
    assert router.work_of(reps[0]) == router.work_of(reps[1]) == 200


def test_cache_aware_follows_the_prefix_it_sent_and_yields_to_load():
    """The replica a prompt's prefix was sent to gets its continuation; a replica whose predicted
    work outweighs the prefill saved does not; chat messages are indexed like prompts."""
    from lenserve.server.ray_router import CacheAwareRouter, prompt_text

    now = time.time()
    reps = [_replica("a", work=0, at=now, mean=50), _replica("b", work=0, at=now, mean=50)]
    for r in reps:
        r.routing_stats["kv_tokens"] = 100_000
    router = _router(CacheAwareRouter, prompt_weight=0.3)
    history = "a long shared conversation so far. " * 60  # ~2,100 characters, ~520 tokens
    first = _request({"prompt": history}, rid="t1")
    chosen = _choose(router, reps, first)[0]
    by_id = {r.replica_id.unique_id: r for r in reps}
    router.on_request_routed(first, by_id[chosen].replica_id, None)
    router.on_request_completed(by_id[chosen].replica_id, "t1")
    other = "b" if chosen == "a" else "a"
    for i in range(5):
        assert _choose(router, reps, _request({"prompt": history + f" turn {i}"}, rid=f"c{i}"))[0] == chosen
        router._provisional.clear()
    by_id[chosen].routing_stats["work"] = 10_000  # far more than 0.3 x 520 tokens of prefill
    assert _choose(router, reps, _request({"prompt": history + " later"}, rid="late"))[0] == other
    assert prompt_text({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}) == "hiyo"


def test_cache_aware_matches_the_replicas_digests_and_its_sends_since():
    """Once replicas report prefix digests, a replica holds what its last digest lists plus what
    this router sent it after the digest was taken: a prompt sent to a is matched there until a's
    next digest (which no longer lists it: evicted), then the replica whose digest holds the prefix
    wins although this router's history says a. A chat prompt (no digest covers it) still follows
    the history."""
    from lenserve.scheduler.routing import text_block_ids
    from lenserve.server.ray_router import CHUNK_CHARS, CacheAwareRouter

    now = time.time()
    a, b = _replica("a", at=now, mean=50), _replica("b", at=now, mean=50)
    for r in (a, b):
        r.routing_stats.update(kv_tokens=100_000, prefix_digest=[], prefix_digest_time=now - 10)
    router = _router(CacheAwareRouter, prompt_weight=0.3)
    history = "a long shared conversation so far. " * 60  # ~2,100 characters, ~520 tokens
    ids = text_block_ids(history, CHUNK_CHARS)

    first = _request({"prompt": history}, rid="t1")
    _choose(router, [a, b], first)
    router.on_request_routed(first, a.replica_id, None)
    router.on_request_completed(a.replica_id, "t1")
    router._provisional.clear()
    assert router.index_of(a).match(ids) == len(ids) and router.index_of(b).match(ids) == 0
    assert _choose(router, [a, b], _request({"prompt": history + " turn 1"}, rid="c1"))[0] == "a"
    router._provisional.clear()

    # a's next digest, taken after the send, no longer holds it; b's holds it (another ingress sent it there)
    a.routing_stats.update(prefix_digest=[], prefix_digest_time=time.time())
    b.routing_stats.update(prefix_digest=list(ids), prefix_digest_time=time.time())
    assert router.history_of(a).match(ids) == len(ids)
    assert router.index_of(a).match(ids) == 0 and router.index_of(b).match(ids) == len(ids)
    for i in range(3):
        assert _choose(router, [a, b], _request({"prompt": history + f" turn {i}"}, rid=f"d{i}"))[0] == "b"
        router._provisional.clear()
    chat = {"messages": [{"role": "user", "content": history}, {"role": "user", "content": " more"}]}
    assert _choose(router, [a, b], _request(chat, rid="chat"))[0] == "a"
    router._provisional.clear()

    # a send counts only until a digest taken after it: sent to a now, matched there, then dropped
    later = _request({"prompt": "another long prompt. " * 40}, rid="t2")
    later_ids = text_block_ids("another long prompt. " * 40, CHUNK_CHARS)
    _choose(router, [a, b], later)
    router.on_request_routed(later, a.replica_id, None)
    assert router.index_of(a).match(later_ids) == len(later_ids)
    a.routing_stats.update(prefix_digest=list(later_ids[:3]), prefix_digest_time=time.time())
    assert router.index_of(a).match(later_ids) == 3 and not router._digests["a"].sent


def test_ongoing_comes_from_reports_so_an_unheard_completion_does_not_linger():
    """A replica's ongoing requests: its last report's count, less those this router saw complete
    since, plus those sent after it. A request whose completion the router never hears of counts
    until the replica's next report, not forever (it used to tip every tie and the guard)."""
    from lenserve.server.ray_router import CacheAwareRouter

    now = time.time()
    a, b = _replica("a", at=now - 1, mean=50), _replica("b", at=now - 1, mean=50)
    router = _router(CacheAwareRouter)
    router.on_request_routed(_request(rid="lost"), a.replica_id, None)  # its completion never comes
    router.on_request_routed(_request(rid="done"), b.replica_id, None)
    router.on_request_completed(b.replica_id, "done")
    assert router.ongoing(a) == 1 and router.ongoing(b) == 0
    assert router.work_of(a) == 50 and router.work_of(b) == 0
    a.routing_stats.update(time=time.time(), unfinished=0, work=0.0)  # a's next report: idle
    assert router.ongoing(a) == 0 and router.work_of(a) == 0
    b.routing_stats.update(time=time.time(), unfinished=3, work=300.0)  # 3 from other ingresses
    router.on_request_routed(_request(rid="new"), b.replica_id, None)
    assert router.ongoing(b) == 4


def test_cache_aware_estimates_tokens_at_the_replicas_measured_ratio():
    """Tokens are estimated from characters at the ratio the replicas report (their mean), 4
    before any report: the same cached characters weigh half as many tokens at 8 a token, so a
    replica's load outweighs the prefix sooner."""
    from lenserve.server.ray_router import CacheAwareRouter

    now = time.time()
    a, b = _replica("a", at=now, mean=50), _replica("b", at=now, mean=50)
    router = _router(CacheAwareRouter, prompt_weight=0.3, length_weight=0.1)
    assert router.chars_per_token([a, b]) == 4.0
    system = "you are a helpful assistant with a long system prompt. " * 20  # 1,120 characters
    first = _request({"prompt": system + "first"}, rid="s")
    _choose(router, [a, b], first)
    router.on_request_routed(first, a.replica_id, None)
    router.on_request_completed(a.replica_id, "s")
    router._provisional.clear()
    for r in (a, b):
        r.routing_stats.update(prefix_digest=[], prefix_digest_time=now - 10)
    # a holds the system prompt (~1,088 characters in whole chunks) and has 600 more work than b:
    # at 4 characters a token the prefix saves 0.3 x 272 = 82 > 0.1 x 600; at 8, 41 < 60
    a.routing_stats["work"] = 600.0
    assert _choose(router, [a, b], _request({"prompt": system + "second"}, rid="x"))[0] == "a"
    router._provisional.clear()
    a.routing_stats["chars_per_token"] = 8.5
    b.routing_stats["chars_per_token"] = 7.5
    assert router.chars_per_token([a, b]) == 8.0
    assert _choose(router, [a, b], _request({"prompt": system + "third"}, rid="y"))[0] == "b"


def test_ray_prefix_router_class_imports_without_vllm():
    import sys

    from lenserve.server import ray_router

    cls = ray_router.PrefixAwareRouter
    assert cls.__name__ == "PrefixAwareRouter" and "vllm" not in sys.modules
    assert set(ray_router.ROUTER_CLASSES) >= {"cache-aware", "ray-prefix", "pow2", "least-work", "round-robin"}


def test_ray_serve_can_ship_every_router_class():
    """Ray Serve pickles a router class by value with its module's globals: none may hold a lock."""
    from ray.serve.config import RequestRouterConfig

    from lenserve.server.ray_router import ROUTER_CLASSES

    for name, path in ROUTER_CLASSES.items():
        assert RequestRouterConfig(request_router_class=path).get_request_router_class() is not None, name


def test_cache_aware_times_its_decisions():
    from lenserve.server import router_metrics
    from lenserve.server.ray_router import CacheAwareRouter

    def count(name: str) -> float:  # wall time, and the routing thread's CPU time
        return sum(s.value for m in router_metrics.REGISTRY.collect() for s in m.samples
                   if s.name == f"lenserve:{name}_count" and s.labels.get("router") == "cache-aware")

    names = ("router_decision_seconds", "router_decision_cpu_seconds")
    before = [count(n) for n in names]
    router = _router(CacheAwareRouter)
    _choose(router, [_replica("a"), _replica("b")], _request({"prompt": "hello " * 50}, rid="d1"))
    assert [count(n) for n in names] == [b + 1 for b in before]


def test_an_idle_replica_reports_nothing_left_as_of_its_last_arrival():
    """A replica reports its last step's work while it holds requests; once every request it took
    has been answered (handle() exited, closed early included), it reports none, stamped with the
    last arrival, so a request sent before that is not counted as unseen on it until its next step."""
    from lenserve.server.ray_serve import EngineReplica

    rep = object.__new__(EngineReplica)
    rep._work, rep._mean_request_work, rep._prefix, rep.prefix_digest = (500.0, 100.0, 3), 90.0, {"kv_tokens": 4096}, None
    rep._last_arrival, rep._num_handling = 0.0, 0

    async def fake_handle(route, body):
        yield {"status": 200}
        yield b"chunk"

    rep._handle = fake_handle

    async def take_one():
        gen = rep.handle("completions", {})
        assert await gen.__anext__() == {"status": 200}
        assert rep._num_handling == 1
        stats = rep.record_routing_stats()
        assert (stats["work"], stats["time"], stats["unfinished"]) == (500.0, 100.0, 3)  # busy: the step's report
        await gen.aclose()  # the ingress stopped reading
        return rep._last_arrival

    arrived = asyncio.run(take_one())
    assert rep._num_handling == 0 and arrived > 100.0
    stats = rep.record_routing_stats()
    assert (stats["work"], stats["time"], stats["unfinished"]) == (0.0, arrived, 0)
    assert stats["mean_request_work"] == 90.0 and stats["kv_tokens"] == 4096
