"""Replicas behind a router, simulated: N copies of the scheduler simulation and the routing policies
that `lenserve serve --replicas N` offers, plus capacity planning (the fewest replicas that meet
TTFT/TPOT objectives on a trace).

Routers (the same names as the server's `--router`):

- `least-work`: the replica with the least predicted outstanding work, in response tokens (each
  unfinished request's predicted remaining output plus its prompt tokens still to prefill at the
  scheduler's `prompt_weight`, as `lenserve.scheduler.policies.predicted_work` counts it). Replicas
  report that sum every `report_interval_s`; between reports the router adds the predicted work of
  what it has sent each replica since its last report, as the Ray Serve router does.
- `pow2`: Ray Serve's default, power of two choices: two replicas at random, the one with fewer
  ongoing requests.
- `round-robin`: in turn.

Two more, `jsq` and `min-delay`, exist only here, as references: they read what no real router can
(every replica's live state at each arrival; `min-delay` also every request's true length), to show
what routing could gain with better information. `jsq` is the fewest ongoing requests over all replicas (pow2
with perfect, free information); `min-delay` is clairvoyant, see `MinDelayRouter`.

Each replica is a `ReplicaSim`: the scheduler simulation of `lenserve.scheduler.simulator.simulate`
(the real Scheduler, the cost model, fast-forwarded decode runs), advanced to an arrival's time
only when the router needs to look at it or sends it the request, so round-robin and pow2 cost
about what one replica's simulation costs per request.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from lenserve.scheduler.block_manager import BlockManager
from lenserve.scheduler.config import SchedulerConfig
from lenserve.scheduler.cost_model import CostModel
from lenserve.scheduler.policies import predicted_work
from lenserve.scheduler.routing import CacheAwarePolicy, PrefixIndex, cache_aware_rank, ray_prefix_candidates
from lenserve.scheduler.scheduler import Scheduler
from lenserve.scheduler.sequence import Sequence
from lenserve.scheduler.simulator import (
    EOS_TOKEN_ID, FILLER_TOKEN_ID, Predictions, SimRequests, SimSequence, decode_run, oracle_predictions, run_stops,
    step_work,
)

ROUTERS = ("least-work", "pow2", "round-robin", "cache-aware", "ray-prefix")
# Ablations of cache-aware, simulation only: `affinity` keeps a session on its first replica (pow2
# for a session's first request, or for requests without a session), `prefix-affinity` takes the
# longest prefix in the router's history alone (pow2 on ties), `cache-aware-nolength` drops the
# outstanding-work term (prefix + imbalance guard)
ABLATION_ROUTERS = ("affinity", "prefix-affinity", "cache-aware-nolength")
# simulation only: they see what a real router cannot. `cache-oracle`: cache-aware on every
# replica's true cache and true work left, read live
REFERENCE_ROUTERS = ("jsq", "min-delay", "cache-oracle")


class ReplicaSim:
    """One engine replica in simulated time. `add` queues a request at the replica's clock (call
    `advance_to(arrival)` first); `advance_to(t)` takes steps until the first step boundary at or
    after t, or until the replica is idle."""

    def __init__(
        self,
        requests: SimRequests,
        config: SchedulerConfig,
        cost: CostModel,
        predictions: Predictions | None,
        on_finish: Callable[[Sequence], None],
        *,
        num_kv_blocks: int | None = None,
        block_size: int | None = None,
    ) -> None:
        self.requests = requests
        self.config = config
        self.cost = cost
        self.predictions = predictions
        self.on_finish = on_finish
        self.now = 0.0
        bm = BlockManager(num_kv_blocks or cost.num_kv_blocks, block_size or cost.block_size, enable_prefix_caching=False)
        self.sched = Scheduler(config, bm, clock=lambda: self.now, cost_model=cost)
        self.num_steps = 0
        self.num_passes = 0
        self.max_concurrent = 0
        self.busy_s = 0.0  # time with at least one request running
        self.num_assigned = 0
        self.unfinished: dict[int, SimSequence] = {}  # by request index
        self.unfinished_hint = 0.0
        self.stalled = False  # waiting requests that nothing can schedule (a fault, reported at the end)
        # The replica's prefix cache over the trace's blocks (LRU): a request's prompt blocks
        # enter it when its prefill ends, and a later request computes only the prompt past its
        # longest cached prefix. It holds what the KV cache holds besides the running sequences'
        # other tokens (their answers so far, prompts still being prefilled), as an engine's
        # cached blocks are the ones its running sequences leave: under load it shrinks.
        self.cache: PrefixIndex | None = None
        self.kv_tokens = bm.num_blocks * bm.block_size
        if requests.block_ids is not None:
            self.cache = PrefixIndex(max(self.kv_tokens / requests.block_tokens, 1))
            self.sched.prefix_lookup = self._lookup
        self._looked_up: set[int] = set()
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0

    # ---- what a router sees ------------------------------------------------------------------------
    @property
    def num_ongoing(self) -> int:
        return len(self.unfinished)

    def outstanding_work(self) -> float:
        """Predicted work left, in response tokens, over every unfinished request (the report).
        Running sequences are counted one by one; a waiting one has done nothing yet, so its work is
        the hint it arrived with (kept as a running sum: queues reach thousands under overload)."""
        weight = self.config.prompt_weight
        running = self.sched.running
        return (self.unfinished_hint - sum(seq.work_hint for seq in running)
                + sum(predicted_work(seq, weight) for seq in running))

    def true_remaining_work(self) -> list[float]:
        """Every unfinished request's true work left, in response tokens (what `outstanding_work`
        predicts, known exactly): for the clairvoyant reference router only."""
        weight = self.config.prompt_weight
        return [seq.true_output_len - seq.num_output_tokens
                + weight * max(seq.num_prompt_tokens - seq.num_computed_tokens, 0)
                for seq in self.unfinished.values()]

    def cached_tokens(self, i: int) -> int:
        """Prompt tokens of request i this replica's cache holds now (the last one is always computed)."""
        ids = self.requests.block_ids[i] if self.cache is not None else None
        if not ids:
            return 0
        self._fit_cache()
        return min(self.cache.match(ids) * self.requests.block_tokens, int(self.requests.prompt_tokens[i]) - 1)

    def _fit_cache(self, extra_tokens: int = 0) -> None:
        """The prefix cache's capacity: the KV tokens that the running sequences' answers and
        unfinished prompts leave (a finished prompt's blocks are cache entries themselves), less
        `extra_tokens` they are about to take."""
        held = extra_tokens
        for seq in self.sched.running:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                held += seq.num_computed_tokens - seq.num_prompt_tokens
            else:
                held += seq.num_computed_tokens - seq.num_cached_tokens
        self.cache.shrink_to((self.kv_tokens - held) / self.requests.block_tokens)

    # ---- requests -------------------------------------------------------------------------------------
    def add(self, i: int, work_hint: float = 0.0) -> None:
        """`work_hint`: the request's predicted work when it arrives (see `outstanding_work`),
        prompt counted whole: the cached part comes off here."""
        r = self.requests
        t = float(r.arrival_s[i])
        if self.now < t:  # idle until now
            self.now = t
        seq = SimSequence(
            str(i), int(r.prompt_tokens[i]), i,
            max_tokens=int(r.max_tokens[i]), arrival_time=t, eos_token_id=EOS_TOKEN_ID,
            prediction=self.predictions.at(i) if self.predictions is not None else None,
            true_output_len=int(r.output_tokens[i]),
        )
        # The router's view: what the cache holds as the request arrives. The hit itself is
        # taken at admission (_lookup), after any wait, from what the cache holds then.
        work_hint = max(work_hint - self.config.prompt_weight * self.cached_tokens(i), 0.0)
        self.num_prompt_tokens += seq.num_prompt_tokens
        seq.work_hint = work_hint
        self.unfinished_hint += work_hint
        self.sched.add(seq)
        self.unfinished[i] = seq
        self.num_assigned += 1
        self.stalled = False

    def _lookup(self, seq: Sequence) -> None:
        """Scheduler.prefix_lookup: a sequence about to start (first time or after a preemption)
        computes only the prompt past its longest prefix cached now; the hit rate counts each
        request's first start."""
        i = seq.index
        cached = self.cached_tokens(i)
        if cached:
            self.cache.insert(self.requests.block_ids[i][: cached // self.requests.block_tokens])  # a hit refreshes its blocks
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        if i not in self._looked_up:
            self._looked_up.add(i)
            self.num_cached_tokens += cached

    def _cache_prompts(self, out) -> None:
        """Prompts whose prefill ends in this step enter the prefix cache (as an engine registers
        a block once it is computed; the chunks before the last are left out)."""
        block_ids = self.requests.block_ids
        fitted = False
        for seq, num_new in zip(out.seqs[: out.num_prefill_seqs], out.num_new_tokens):
            if seq.num_computed_tokens + num_new >= seq.num_prompt_tokens and block_ids[seq.index]:
                if not fitted:
                    self._fit_cache()
                    fitted = True
                self.cache.insert(block_ids[seq.index])

    def _record(self, finished: Iterable[Sequence]) -> None:
        for seq in finished:
            del self.unfinished[seq.index]
            self.unfinished_hint -= seq.work_hint
            self.on_finish(seq)

    def advance_to(self, t: float) -> None:
        sched = self.sched
        running = sched.running
        cost = self.cost
        while self.now < t and not self.stalled:
            if not running and not sched.waiting:
                return
            now = self.now
            self.num_passes += 1
            horizon = sched.decode_horizon() if running else 0
            if horizon:
                num_seqs, context, k, ending = decode_run(running, horizon)
                end = now + cost.decode_time(num_seqs, context, k)
                bound = min(end, t, sched.next_wakeup_time())
                shorter = k
                if bound < end:
                    shorter = cost.decode_steps_to(num_seqs, context, bound - now)
                if sched.config.fcfs_wait_bound:
                    shorter = min(shorter, sched.steps_to_next_deadline())
                if shorter < k:
                    k = shorter
                    ending = []
                    end = now + cost.decode_time(num_seqs, context, k)
                stops = run_stops(ending, k)
                if self.cache is not None:  # the answers' KV at the run's end (every sequence runs all k steps) evicts
                    self._fit_cache(k * num_seqs)
                self.max_concurrent = max(self.max_concurrent, num_seqs)
                self.busy_s += end - now
                self.num_steps += k
                self.now = end
                sched.record_step_time(end - now, k)
                self._record(sched.fast_forward(k, stops, FILLER_TOKEN_ID))
                continue

            out = sched.schedule()
            if out.is_empty:
                self.stalled = True  # until another arrival changes the picture
                return
            num_tokens, num_sampled, prefill_pairs, decode_context, sampled = step_work(out)
            dt = cost.step_time(num_tokens, num_sampled, prefill_pairs, decode_context)
            self.max_concurrent = max(self.max_concurrent, len(running))
            self.busy_s += dt
            self.num_steps += 1
            self.now = now + dt
            sched.record_step_time(dt)
            if self.cache is not None:
                self._fit_cache(num_tokens)  # the step's new KV evicts (before update frees what finishes)
                self._cache_prompts(out)
            self._record(sched.update(out, sampled))

    def drain(self) -> None:
        self.advance_to(math.inf)
        if self.unfinished:
            raise RuntimeError(f"simulation stalled: {len(self.unfinished)} requests wait but nothing can be scheduled")


# ---- routers ----------------------------------------------------------------------------------------
class Router:
    name = ""

    def __init__(self, replicas: list[ReplicaSim], seed: int = 0) -> None:
        self.replicas = replicas
        self.rng = np.random.default_rng([seed, 3])

    def choose(self, i: int, t: float) -> int:
        raise NotImplementedError


class RoundRobinRouter(Router):
    name = "round-robin"

    def __init__(self, replicas, seed: int = 0) -> None:
        super().__init__(replicas, seed)
        self.next = 0

    def choose(self, i: int, t: float) -> int:
        r = self.next
        self.next = (r + 1) % len(self.replicas)
        return r


class PowerOfTwoRouter(Router):
    """Ray Serve's PowerOfTwoChoicesRequestRouter: two distinct replicas at random, fewer ongoing
    requests wins (ties: the first drawn)."""

    name = "pow2"

    def __init__(self, replicas, seed: int = 0) -> None:
        super().__init__(replicas, seed)
        self._draws = iter(())

    def _pair(self) -> tuple[int, int]:
        try:
            return next(self._draws)
        except StopIteration:
            n = len(self.replicas)
            a = self.rng.integers(0, n, 4096)
            b = self.rng.integers(0, n - 1, 4096)
            b = np.where(b >= a, b + 1, b)
            self._draws = iter(zip(a.tolist(), b.tolist()))
            return next(self._draws)

    def choose(self, i: int, t: float) -> int:
        if len(self.replicas) == 1:
            return 0
        a, b = self._pair()
        ra, rb = self.replicas[a], self.replicas[b]
        ra.advance_to(t)
        rb.advance_to(t)
        return b if rb.num_ongoing < ra.num_ongoing else a


class LeastWorkRouter(Router):
    """Least predicted outstanding work: each replica's last report plus what was sent to it since."""

    name = "least-work"

    def __init__(self, replicas, seed: int = 0, report_interval_s: float = 1.0, hints: list[float] | None = None) -> None:
        super().__init__(replicas, seed)
        self.report_interval_s = report_interval_s
        self.next_report_s = -math.inf
        self.reported = [0.0] * len(replicas)
        self.sent_since = [0.0] * len(replicas)
        self.hint = hints or []

    def refresh_reports(self, t: float) -> None:
        """Every report_interval_s the replicas report their outstanding work (between reports the
        router adds what it sent since)."""
        if t >= self.next_report_s:
            for k, rep in enumerate(self.replicas):
                rep.advance_to(t)
                self.reported[k] = rep.outstanding_work()
                self.sent_since[k] = 0.0
            self.next_report_s = t + self.report_interval_s

    def choose(self, i: int, t: float) -> int:
        self.refresh_reports(t)
        best, best_work = 0, math.inf
        for k in range(len(self.replicas)):
            w = self.reported[k] + self.sent_since[k]
            if w < best_work:
                best, best_work = k, w
        self.sent_since[best] += self.hint[i]
        return best


class JSQRouter(Router):
    """Reference: join the shortest queue with perfect, free information. Every replica's ongoing
    requests at the instant of arrival, the fewest wins (ties: the lowest index); pow2 compares two."""

    name = "jsq"

    def choose(self, i: int, t: float) -> int:
        best, fewest = 0, math.inf
        for k, rep in enumerate(self.replicas):
            rep.advance_to(t)
            if rep.num_ongoing < fewest:
                best, fewest = k, rep.num_ongoing
        return best


class MinDelayRouter(Router):
    """Reference, clairvoyant: the replica where the request adds the least delay, knowing every
    length exactly. A continuously batched replica shares its steps among its sequences like a
    processor-sharing server: a new request with x tokens of work and an unfinished one with r left
    slow each other down for min(x, r) steps. The delay added is then about x + 2 * sum(min(x, r_i))
    step-shares over the replica's unfinished requests, and the router takes the least
    sum(min(x, r_i)), with x the request's true work and r_i the others' true work left, read live."""

    name = "min-delay"

    def __init__(self, replicas, seed: int = 0, true_work: list[float] | None = None) -> None:
        super().__init__(replicas, seed)
        self.true_work = true_work or []

    def choose(self, i: int, t: float) -> int:
        x = self.true_work[i]
        best, least = 0, math.inf
        for k, rep in enumerate(self.replicas):
            rep.advance_to(t)
            delay = sum(r if r < x else x for r in rep.true_remaining_work())
            if delay < least:
                best, least = k, delay
        return best


class _HistoryMixin:
    """A router's approximate view of each replica's prefix cache: the blocks of the requests it
    sent there (SGLang's approximate tree), LRU over the replica's KV capacity."""

    def init_history(self, capacity_blocks: float) -> None:
        self.history = [PrefixIndex(capacity_blocks) for _ in self.replicas]

    def history_cached(self, i: int) -> list[int]:
        r = self.replicas[0].requests
        ids = r.block_ids[i] if r.block_ids is not None else None
        if not ids:
            return [0] * len(self.replicas)
        cap = int(r.prompt_tokens[i]) - 1
        return [min(h.match(ids) * r.block_tokens, cap) for h in self.history]

    def remember(self, k: int, i: int) -> None:
        r = self.replicas[0].requests
        ids = r.block_ids[i] if r.block_ids is not None else None
        if ids:
            self.history[k].insert(ids)


def _history_capacity(replicas: list[ReplicaSim]) -> float:
    rep = replicas[0]
    if rep.cache is None:
        return math.inf
    return max(rep.kv_tokens / rep.requests.block_tokens, 1)  # the whole KV, as a replica reports it


class CacheAwareRouter(_HistoryMixin, LeastWorkRouter):
    """`cache-aware` (lenserve.scheduler.routing.cache_aware_rank): prefill tokens left after the
    longest prefix in the router's history of each replica, plus the replica's predicted work
    (its last report and what was sent since, as least-work counts it), under the imbalance guard
    on ongoing requests."""

    name = "cache-aware"

    def __init__(self, replicas, seed: int = 0, report_interval_s: float = 1.0, hints: list[float] | None = None,
                 policy: CacheAwarePolicy | None = None) -> None:
        super().__init__(replicas, seed, report_interval_s, hints)
        self.policy = policy or CacheAwarePolicy(prompt_weight=replicas[0].config.prompt_weight)
        self.init_history(_history_capacity(replicas))

    def choose(self, i: int, t: float) -> int:
        self.refresh_reports(t)
        ongoing = []
        for rep in self.replicas:  # a router's own count of requests in flight on each replica
            rep.advance_to(t)
            ongoing.append(rep.num_ongoing)
        cached = self.history_cached(i)
        prompt = int(self.replicas[0].requests.prompt_tokens[i])
        # the request's own prefill is in the cost's first term: the work known so far excludes it
        work = [self.reported[k] + self.sent_since[k] for k in range(len(self.replicas))]
        best = cache_aware_rank(prompt, cached, work, ongoing, self.policy, self.rng.random(len(ongoing)).tolist())[0]
        self.remember(best, i)
        self.sent_since[best] += max(self.hint[i] - self.policy.prompt_weight * cached[best], 0.0)
        return best


class CacheOracleRouter(Router):
    """Reference: cache-aware on what no router sees: every replica's true prefix cache and the
    true work left of its requests, live at each arrival."""

    name = "cache-oracle"

    def __init__(self, replicas, seed: int = 0, true_work: list[float] | None = None) -> None:
        super().__init__(replicas, seed)
        self.true_work = true_work or []
        self.policy = CacheAwarePolicy(prompt_weight=replicas[0].config.prompt_weight)

    def choose(self, i: int, t: float) -> int:
        cached, work, ongoing = [], [], []
        for rep in self.replicas:
            rep.advance_to(t)
            cached.append(rep.cached_tokens(i))
            work.append(sum(rep.true_remaining_work()))
            ongoing.append(rep.num_ongoing)
        prompt = int(self.replicas[0].requests.prompt_tokens[i])
        return cache_aware_rank(prompt, cached, work, ongoing, self.policy, self.rng.random(len(ongoing)).tolist())[0]


class SessionAffinityRouter(PowerOfTwoRouter):
    """`affinity`: a session stays on the replica of its first request; the rest is pow2."""

    name = "affinity"

    def __init__(self, replicas, seed: int = 0) -> None:
        super().__init__(replicas, seed)
        self.sessions: dict[str, int] = {}
        self.session_ids = replicas[0].requests.session_ids if replicas else None

    def choose(self, i: int, t: float) -> int:
        key = self.session_ids[i] if self.session_ids is not None else None
        if key is not None and key in self.sessions:
            return self.sessions[key]
        k = super().choose(i, t)
        if key is not None:
            self.sessions[key] = k
        return k


class PrefixAffinityRouter(_HistoryMixin, PowerOfTwoRouter):
    """`prefix-affinity`: the longest prefix in the router's history wins, load unseen; pow2 on ties."""

    name = "prefix-affinity"

    def __init__(self, replicas, seed: int = 0) -> None:
        super().__init__(replicas, seed)
        self.init_history(_history_capacity(replicas))

    def choose(self, i: int, t: float) -> int:
        cached = self.history_cached(i)
        best = max(cached)
        tied = [k for k, c in enumerate(cached) if c == best]
        k = tied[0] if len(tied) == 1 else self._pow2_among(tied, t)
        self.remember(k, i)
        return k

    def _pow2_among(self, ks: list[int], t: float) -> int:
        if len(ks) == len(self.replicas):
            return PowerOfTwoRouter.choose(self, -1, t)
        a, b = self.rng.choice(ks, 2, replace=False).tolist()
        ra, rb = self.replicas[a], self.replicas[b]
        ra.advance_to(t)
        rb.advance_to(t)
        return b if rb.num_ongoing < ra.num_ongoing else a


class RayPrefixRouter(PrefixAffinityRouter):
    """`ray-prefix`, a labelled baseline: the rule of Ray Serve's PrefixCacheAffinityRouter
    (lenserve.scheduler.routing.ray_prefix_candidates with its defaults: no imbalance threshold,
    10% match rate), its prefix tree as the router's history without eviction (its default), then
    power of two choices among the candidates. The live router is Ray's own class."""

    name = "ray-prefix"

    def __init__(self, replicas, seed: int = 0) -> None:
        super().__init__(replicas, seed)
        self.init_history(math.inf)

    def choose(self, i: int, t: float) -> int:
        cached = self.history_cached(i)
        prompt = max(int(self.replicas[0].requests.prompt_tokens[i]), 1)
        ongoing = [rep.num_ongoing for rep in self.replicas]  # Ray's cached queue lengths (not advanced)
        ks = ray_prefix_candidates([c / prompt for c in cached], [len(h) for h in self.history], ongoing)
        k = ks[0] if len(ks) == 1 else self._pow2_among(ks, t)
        self.remember(k, i)
        return k


def work_hints(requests: SimRequests, predictions: Predictions | None, prompt_weight: float) -> list[float]:
    """What a router knows of each request before sending it: its prompt and predicted length,
    as predicted work in response tokens."""
    if predictions is not None:
        out = np.minimum(predictions.mean, requests.max_tokens)
    else:
        out = requests.max_tokens.astype(np.float64)
    return (np.maximum(out, 1.0) + prompt_weight * requests.prompt_tokens).tolist()


def make_router(name: str, replicas: list[ReplicaSim], *, seed: int = 0, hints: list[float] | None = None,
                report_interval_s: float = 1.0, true_work: list[float] | None = None,
                policy: CacheAwarePolicy | None = None) -> Router:
    if name == "least-work":
        return LeastWorkRouter(replicas, seed, report_interval_s, hints)
    if name == "pow2":
        return PowerOfTwoRouter(replicas, seed)
    if name == "round-robin":
        return RoundRobinRouter(replicas, seed)
    if name == "jsq":
        return JSQRouter(replicas, seed)
    if name == "min-delay":
        return MinDelayRouter(replicas, seed, true_work)
    if name == "cache-aware":
        return CacheAwareRouter(replicas, seed, report_interval_s, hints, policy)
    if name == "cache-aware-nolength":
        base = policy or CacheAwarePolicy(prompt_weight=replicas[0].config.prompt_weight)
        return CacheAwareRouter(replicas, seed, report_interval_s, hints, dataclasses.replace(base, length_weight=0.0))
    if name == "cache-oracle":
        return CacheOracleRouter(replicas, seed, true_work)
    if name == "affinity":
        return SessionAffinityRouter(replicas, seed)
    if name == "prefix-affinity":
        return PrefixAffinityRouter(replicas, seed)
    if name == "ray-prefix":
        return RayPrefixRouter(replicas, seed)
    raise ValueError(f"router must be one of {', '.join(ROUTERS + ABLATION_ROUTERS + REFERENCE_ROUTERS)}, got {name!r}")


# ---- the cluster simulation ---------------------------------------------------------------------------
@dataclass
class ClusterResult:
    router: str
    num_replicas: int
    e2e_s: np.ndarray  # per request, in arrival order
    ttft_s: np.ndarray
    output_tokens: np.ndarray
    replica: np.ndarray  # int [n], where each request went
    makespan_s: float
    per_replica: list[dict]
    wall_s: float
    extra: dict = field(default_factory=dict)
    cached_tokens: np.ndarray | None = None  # int [n], prompt tokens each request found cached when it (last) started

    @property
    def tpot_s(self) -> np.ndarray:
        """Time per output token after the first, for requests with more than one token."""
        many = self.output_tokens > 1
        return (self.e2e_s[many] - self.ttft_s[many]) / (self.output_tokens[many] - 1)

    def summary(self) -> dict:
        n = len(self.e2e_s)

        def pct(x: np.ndarray, q: float) -> float:
            return float(np.percentile(x, q)) if len(x) else float("nan")

        tpot = self.tpot_s
        counts = np.bincount(self.replica, minlength=self.num_replicas) if n else np.zeros(self.num_replicas)
        return {
            "router": self.router,
            "num_replicas": self.num_replicas,
            "num_requests": n,
            "mean_e2e_s": float(self.e2e_s.mean()) if n else float("nan"),
            "p50_e2e_s": pct(self.e2e_s, 50),
            "p99_e2e_s": pct(self.e2e_s, 99),
            "mean_ttft_s": float(self.ttft_s.mean()) if n else float("nan"),
            "p50_ttft_s": pct(self.ttft_s, 50),
            "p90_ttft_s": pct(self.ttft_s, 90),
            "p99_ttft_s": pct(self.ttft_s, 99),
            "mean_tpot_s": float(tpot.mean()) if len(tpot) else float("nan"),
            "p90_tpot_s": pct(tpot, 90),
            "p99_tpot_s": pct(tpot, 99),
            "throughput_tok_s": float(self.output_tokens.sum() / self.makespan_s) if self.makespan_s > 0 else 0.0,
            "makespan_s": self.makespan_s,
            "requests_per_replica_min": int(counts.min()) if n else 0,
            "requests_per_replica_max": int(counts.max()) if n else 0,
            "preemptions": sum(r["preemptions"] for r in self.per_replica),
            "sim_wall_s": self.wall_s,
            "sim_requests_per_s": n / self.wall_s if self.wall_s > 0 else float("inf"),
            **self.extra,
        }


def simulate_cluster(
    requests: SimRequests,
    num_replicas: int,
    router: str,
    config: SchedulerConfig,
    cost: CostModel,
    predictions: Predictions | None = None,
    *,
    seed: int = 0,
    report_interval_s: float = 1.0,
    num_kv_blocks: int | None = None,
    block_size: int | None = None,
    policy: CacheAwarePolicy | None = None,
) -> ClusterResult:
    """Every request of the trace, routed to one of `num_replicas` simulated engines at its arrival."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    wall0 = time.perf_counter()
    n = len(requests)
    e2e = np.full(n, np.nan)
    ttft = np.full(n, np.nan)
    generated = np.zeros(n, np.int64)
    where = np.zeros(n, np.int64)
    cached = np.zeros(n, np.int64)

    def on_finish(seq) -> None:
        i = seq.index
        e2e[i] = seq.finished_time - seq.arrival_time
        ttft[i] = seq.first_token_time - seq.arrival_time
        generated[i] = seq.num_output_tokens
        cached[i] = seq.num_cached_tokens

    replicas = [ReplicaSim(requests, config, cost, predictions, on_finish, num_kv_blocks=num_kv_blocks, block_size=block_size)
                for _ in range(num_replicas)]
    hints = work_hints(requests, predictions, config.prompt_weight) if n else []
    true_work = None
    if router == "min-delay" and n:  # the hints an exact predictor would give
        true_work = work_hints(requests, oracle_predictions(requests.output_tokens), config.prompt_weight)
    chooser = make_router(router, replicas, seed=seed, hints=hints, report_interval_s=report_interval_s, true_work=true_work,
                          policy=policy)
    arrival = requests.arrival_s.tolist()
    for i in range(n):
        t = arrival[i]
        k = chooser.choose(i, t)
        rep = replicas[k]
        rep.advance_to(t)
        rep.add(i, hints[i])
        where[i] = k
    for rep in replicas:
        rep.drain()
    end = max((rep.now for rep in replicas), default=0.0)
    makespan = end - arrival[0] if n else 0.0
    per_replica = [{
        "num_requests": rep.num_assigned,
        "busy_frac": rep.busy_s / makespan if makespan > 0 else 0.0,
        "max_concurrent": rep.max_concurrent,
        "preemptions": rep.sched.num_preemptions_total,
        "num_steps": rep.num_steps,
        "prefix_hit_rate": rep.num_cached_tokens / rep.num_prompt_tokens if rep.num_prompt_tokens else 0.0,
    } for rep in replicas]
    extra = {}
    if requests.block_ids is not None:
        prompt = sum(rep.num_prompt_tokens for rep in replicas)
        extra["prefix_hit_rate"] = sum(rep.num_cached_tokens for rep in replicas) / prompt if prompt else 0.0
        extra["busy_frac_mean"] = float(np.mean([p["busy_frac"] for p in per_replica]))
    return ClusterResult(router, num_replicas, e2e, ttft, generated, where, makespan, per_replica, time.perf_counter() - wall0, extra,
                         cached)


def simulate_routers(requests: SimRequests, num_replicas: int, routers: Iterable[str], config: SchedulerConfig, cost: CostModel,
                     predictions: Predictions | None = None, **kwargs) -> dict[str, dict]:
    """One cluster simulation per router on the same requests and predictions: {router: summary}."""
    out = {}
    for router in routers:
        s = simulate_cluster(requests, num_replicas, router, config, cost, predictions, **kwargs).summary()
        if predictions is not None:
            s["predictions"] = predictions.source
        out[router] = s
    return out


# ---- capacity planning ----------------------------------------------------------------------------
@dataclass
class SLO:
    ttft_s: float
    tpot_s: float
    quantile: float = 0.99  # the share of requests that must meet each objective

    def met(self, r: ClusterResult) -> bool:
        return self.ttft_at(r) <= self.ttft_s and self.tpot_at(r) <= self.tpot_s

    def ttft_at(self, r: ClusterResult) -> float:
        return float(np.quantile(r.ttft_s, self.quantile)) if len(r.ttft_s) else 0.0

    def tpot_at(self, r: ClusterResult) -> float:
        tpot = r.tpot_s
        return float(np.quantile(tpot, self.quantile)) if len(tpot) else 0.0


def plan_capacity(
    requests: SimRequests,
    routers: Iterable[str],
    slo: SLO,
    config: SchedulerConfig,
    cost: CostModel,
    predictions: Predictions | None = None,
    *,
    max_replicas: int = 64,
    log: Callable[..., None] | None = None,
    **kwargs,
) -> dict:
    """The fewest replicas meeting `slo`, per router. Each router's search doubles the replica count
    until the objectives hold, then bisects; every count simulated becomes a row of the table.
    Returns {"slo": ..., "rows": [...], "min_replicas": {router: N or None}}."""
    rows: list[dict] = []
    best: dict[str, int | None] = {}
    for router in routers:
        cache: dict[int, bool] = {}

        def ok(n: int) -> bool:
            if n not in cache:
                r = simulate_cluster(requests, n, router, config, cost, predictions, **kwargs)
                s = r.summary()
                row = {"router": router, "num_replicas": n, f"ttft_q{slo.quantile:g}_s": slo.ttft_at(r),
                       f"tpot_q{slo.quantile:g}_s": slo.tpot_at(r), "meets_slo": slo.met(r),
                       **{k: s[k] for k in ("mean_e2e_s", "p99_e2e_s", "mean_ttft_s", "mean_tpot_s", "throughput_tok_s", "sim_wall_s")}}
                rows.append(row)
                cache[n] = row["meets_slo"]
                if log:
                    log(f"capacity {router} x{n}: ttft {row[f'ttft_q{slo.quantile:g}_s']:.2f}s tpot {row[f'tpot_q{slo.quantile:g}_s']:.3f}s "
                        f"{'meets' if cache[n] else 'misses'} the SLO ({r.wall_s:.0f}s)")
            return cache[n]

        lo, hi = 0, 1  # lo: known to miss (0: trivially), hi: candidate
        while hi <= max_replicas and not ok(hi):
            lo, hi = hi, hi * 2
        if hi > max_replicas:
            hi = max_replicas
            if not ok(hi):
                best[router] = None
                continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        best[router] = hi
    rows.sort(key=lambda r: (r["router"], r["num_replicas"]))
    return {"slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "quantile": slo.quantile}, "rows": rows, "min_replicas": best}


def plot_capacity(plan: dict, path: str, title: str = "") -> None:
    """p-quantile TTFT and TPOT against the replica count, one line per router, SLOs dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = plan["slo"]["quantile"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, limit, label in ((axes[0], f"ttft_q{q:g}_s", plan["slo"]["ttft_s"], "TTFT"),
                                  (axes[1], f"tpot_q{q:g}_s", plan["slo"]["tpot_s"], "TPOT")):
        for router in sorted({r["router"] for r in plan["rows"]}):
            rows = [r for r in plan["rows"] if r["router"] == router]
            best = plan["min_replicas"].get(router)
            ax.plot([r["num_replicas"] for r in rows], [max(r[key], 1e-4) for r in rows], "o-",
                    label=f"{router} (fewest: {best if best is not None else '-'})")
        ax.axhline(limit, ls="--", color="gray", label=f"SLO {limit:g}s")
        ax.set_yscale("log")
        ax.set_xlabel("replicas")
        ax.set_ylabel(f"{label} q{q:g}, s")
        ax.set_title(f"{label} (quantile {q:g}) by replica count")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
