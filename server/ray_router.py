"""Ray Serve request routers for `lenserve serve --replicas N --router ...` (imported by Ray Serve
in the process that holds the deployment handle, the ingress; never by the single server).

- `LeastWorkRouter`: the replica with the least predicted outstanding work. Each engine replica
  reports, through Ray Serve's routing stats (`record_routing_stats`), the predicted work left in
  its scheduler (predicted remaining output tokens plus prompt tokens still to prefill, weighted as
  the scheduler weighs them), how many requests that covers and when it measured it; the router
  scales the report down by the share of those requests it has seen complete since, and adds a
  typical request's work for every request it has sent that replica since that report and that has
  not completed, and for every request it has chosen that replica for and not yet routed (Ray
  Serve routes several pending requests at once; without this they would all herd onto one).
- `RoundRobinRouter`: in turn.
- `AffinePowerOfTwoRouter`: Ray Serve's default (power of two choices on queue length) with
  session affinity.
- `CacheAwareRouter` (`cache-aware`): least-work's view of each replica's predicted work, plus the
  prefix of the prompt that replica most likely holds in its prefix cache:
  lenserve.scheduler.routing.cache_aware_rank ranks them, the same function the simulator routes
  with. Prompts are indexed by 64-character chunks of their text (a router sees text, not tokens;
  `text_block_ids`, the same in every process); tokens are estimated from characters at the ratio the
  replicas measure on the prompts they serve (4 characters a token before their first report). What a
  replica holds is its periodic prefix digest (the text ids of served completion prompts whose KV
  blocks it still caches, lenserve.server.prefix_digest) plus the prompts this router sent it since
  the digest was taken. For prompts no digest covers (chat, see `digest_prompt`), and before a
  replica's first digest, an approximate index of the prompts this router sent it (SGLang's
  approximate tree; LRU as large as the KV capacity the replica reports).
- `PrefixAwareRouter` (`ray-prefix`): Ray Serve's own PrefixCacheAffinityRouter (ray.llm, no vLLM
  needed), reading the prompt from the body the ingress forwards; a baseline.

All three keep a session (`session_id`, else `user`, in the request body) on the replica that took
its first request when `session_affinity` is set in the router kwargs, as long as that replica lives.
The simulator's routers (lenserve.scheduler.cluster) are the same policies.
"""
from __future__ import annotations

import functools
import itertools
import math
import random
import time
from collections import OrderedDict, deque
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from lenserve.scheduler.routing import TEXT_CHUNK_CHARS, CacheAwarePolicy, PrefixIndex, cache_aware_rank, text_block_ids
from lenserve.server import router_metrics  # by reference: see its docstring

DEFAULT_REQUEST_WORK = 256.0  # predicted work of one request (response tokens) before any replica has reported
MAX_SESSIONS = 100_000
MAX_COMPLETIONS = 10_000  # completions remembered to discount stale reports
COMPLETIONS_KEPT_S = 60.0  # a report older than this is long stale (they come every 0.5 s)
PROVISIONAL_KEPT_S = 30.0  # a choice not routed by then was cancelled
CHUNK_CHARS = TEXT_CHUNK_CHARS  # prefix index granularity of the cache-aware router (64 characters)
CHARS_PER_TOKEN = 4.0  # its estimate of a prompt's tokens from its text
DEFAULT_KV_TOKENS = 65536  # a replica's KV capacity before its first report
MAX_SENT_KEPT = 10_000  # prompts remembered per replica until a digest covers them


def prompt_text(body: dict) -> str:
    """The text a prompt's prefix is indexed by: a completion's prompt, or a chat's message contents."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "".join(p for p in prompt if isinstance(p, str))
    parts = []
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict) and isinstance(c.get("text"), str))
    return "".join(parts)


def digest_prompt(body: dict) -> str | None:
    """The prompt text a replica's prefix digest covers (lenserve.server.prefix_digest): a
    completion's one text prompt. Not several prompts (their joined text, which the router indexes,
    is never tokenized as one), token ids, or a chat (its template puts text of its own between the
    message contents the router indexes)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


def request_body(pending: PendingRequest | None) -> dict:
    """The JSON body the ingress forwards (EngineReplica.handle(route, body))."""
    if pending is None:
        return {}
    args = pending.args
    if len(args) >= 2 and isinstance(args[1], dict):
        return args[1]
    body = pending.kwargs.get("body")
    return body if isinstance(body, dict) else {}


def session_key(body: dict) -> str | None:
    key = body.get("session_id") or body.get("user")
    return str(key) if key else None


class SessionAffinityMixin:
    """Keeps each session on one replica (least recently used sessions are forgotten first)."""

    def initialize_state(self, session_affinity: bool = False, **kwargs: Any) -> None:
        self.session_affinity = session_affinity
        self._sessions: OrderedDict[str, ReplicaID] = OrderedDict()

    def affine_replica(self, candidates: list[RunningReplica], pending: PendingRequest | None) -> RunningReplica | None:
        if not getattr(self, "session_affinity", False):
            return None
        key = session_key(request_body(pending))
        rid = self._sessions.get(key) if key else None
        if rid is None:
            return None
        for r in candidates:
            if r.replica_id == rid:
                self._sessions.move_to_end(key)
                return r
        return None

    def remember_session(self, pending: PendingRequest, replica_id: ReplicaID) -> None:
        if not getattr(self, "session_affinity", False):
            return
        key = session_key(request_body(pending))
        if key:
            self._sessions[key] = replica_id
            self._sessions.move_to_end(key)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def with_affinity(self, ranks: list[list[RunningReplica]], candidates, pending) -> list[list[RunningReplica]]:
        first = self.affine_replica(candidates, pending)
        if first is None:
            return ranks
        return [[first]] + [[r for r in rank if r.replica_id != first.replica_id] for rank in ranks]


class LeastWorkRouter(SessionAffinityMixin, FIFOMixin, RequestRouter):
    def initialize_state(self, session_affinity: bool = False, **kwargs: Any) -> None:
        super().initialize_state(session_affinity=session_affinity)
        # requests sent and not completed: internal id -> (replica, time sent)
        self._inflight: dict[str, tuple[ReplicaID, float]] = {}
        # chosen but not yet routed: internal id -> (replica ranked first, time chosen)
        self._provisional: dict[str, tuple[ReplicaID, float]] = {}
        # recent completions: (replica, time sent, time completed), oldest first
        self._completed: deque[tuple[ReplicaID, float, float]] = deque(maxlen=MAX_COMPLETIONS)

    def _since_report(self, replica: RunningReplica) -> tuple[int, int, int]:
        """(requests the replica's last report counted, how many of those this router has seen
        complete since, requests sent or chosen for it after the report and not completed)."""
        stats = replica.routing_stats or {}
        at = float(stats.get("time", 0.0))
        rid = replica.replica_id
        unseen = sum(1 for r, t in self._inflight.values() if r == rid and t > at)
        unseen += sum(1 for r, _ in self._provisional.values() if r == rid)
        reported_count = int(stats.get("unfinished") or 0)
        done = sum(1 for r, sent, finished in self._completed if r == rid and sent <= at < finished) if reported_count else 0
        return reported_count, min(done, reported_count), unseen

    def load_of(self, replica: RunningReplica) -> tuple[float, int]:
        """(predicted work, ongoing requests) of the replica, from one pass over this router's books.

        Work: the replica's last report, less the share of it whose requests this router has seen
        complete since (reports come every `request_routing_stats_period_s`, and a stale one would
        keep steering requests away from a replica that has since drained), plus a typical
        request's work for each request sent after the report and not completed.
        Ongoing: the report's requests, less those seen complete since, plus those sent or chosen
        for it after the report (so a request whose completion this router never hears of counts
        only until the next report)."""
        stats = replica.routing_stats or {}
        reported = float(stats.get("work", 0.0))
        per_request = float(stats.get("mean_request_work") or DEFAULT_REQUEST_WORK)
        reported_count, done, unseen = self._since_report(replica)
        if reported_count and reported:
            reported *= (reported_count - done) / reported_count
        return reported + unseen * per_request, reported_count - done + unseen

    def work_of(self, replica: RunningReplica) -> float:
        return self.load_of(replica)[0]

    def ongoing(self, replica: RunningReplica) -> int:
        return self.load_of(replica)[1]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None):
        now = time.time()
        if self._provisional:  # choices whose request never got routed (cancelled meanwhile)
            self._provisional = {k: v for k, v in self._provisional.items() if v[1] > now - PROVISIONAL_KEPT_S}
        # ties (idle replicas) are broken at random, so they do not all land on the first replica
        ranked = sorted(candidate_replicas, key=lambda r: (self.work_of(r), random.random()))
        ranks = self.with_affinity([[r] for r in ranked], candidate_replicas, pending_request)
        if ranks and pending_request is not None:
            # Ray Serve routes several requests at once: until this one is routed, count it on the
            # replica it will most likely get, so that concurrent choices do not all herd there
            self._provisional[pending_request.metadata.internal_request_id] = (ranks[0][0].replica_id, now)
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        rid = pending_request.metadata.internal_request_id
        self._provisional.pop(rid, None)
        self._inflight[rid] = (replica_id, time.time())
        self.remember_session(pending_request, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if router_metrics.LOGGING:
            router_metrics.log_decision({"t": time.time(), "completed": internal_request_id, "replica": replica_id.unique_id})
        sent = self._inflight.pop(internal_request_id, None)
        if sent is not None:
            now = time.time()
            self._completed.append((replica_id, sent[1], now))
            while self._completed and self._completed[0][2] < now - COMPLETIONS_KEPT_S:
                self._completed.popleft()

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self._inflight = {k: v for k, v in self._inflight.items() if v[0] != replica_id}
        self._provisional = {k: v for k, v in self._provisional.items() if v[0] != replica_id}
        self._completed = deque((c for c in self._completed if c[0] != replica_id), maxlen=MAX_COMPLETIONS)


class DigestIndex:
    """What a replica's prefix cache holds by its last digest (the text ids it reported,
    lenserve.server.prefix_digest), plus the prompts this router sent it after the digest was taken."""

    def __init__(self) -> None:
        self.time = -math.inf
        self.ids: frozenset[int] = frozenset()
        self.sent: deque[tuple[float, tuple[int, ...]]] = deque()  # (time sent, the prompt's ids), oldest first
        self.recent: set[int] = set()  # the ids in `sent`, once a digest has come

    def update(self, digest, at: float) -> None:
        """Takes a digest (once per report; a replica reports a frozenset, taken as it is); the
        sends it covers are dropped."""
        if at == self.time:
            return
        self.time = at
        self.ids = frozenset(digest)
        sent = self.sent
        while sent and sent[0][0] <= at:
            sent.popleft()
        self.recent = {b for _, ids in sent for b in ids}

    def add(self, at: float, ids: tuple[int, ...]) -> None:
        """Notes a prompt sent at `at`; counted until a digest taken after it comes."""
        sent = self.sent
        sent.append((at, ids))
        if len(sent) > MAX_SENT_KEPT:  # no digest for a long while: the older half goes
            for _ in range(len(sent) // 2):
                sent.popleft()
            self.recent = {b for _, ids in sent for b in ids} if self.time > -math.inf else set()
        elif self.time > -math.inf:  # before a first digest nothing is matched here
            self.recent.update(ids)

    def match(self, ids: tuple[int, ...]) -> int:
        """How many leading ids of `ids` are held."""
        digest, recent = self.ids, self.recent
        n = 0
        for b in ids:
            if b not in digest and b not in recent:
                break
            n += 1
        return n


class CacheAwareRouter(LeastWorkRouter):
    def initialize_state(self, session_affinity: bool = False, prompt_weight: float = 0.3, length_weight: float = 0.1,
                         balance_abs: float = 16.0, balance_rel: float = 1.5, **kwargs: Any) -> None:
        super().initialize_state(session_affinity=session_affinity)
        self.policy = CacheAwarePolicy(prompt_weight=prompt_weight, length_weight=length_weight,
                                       balance_abs=balance_abs, balance_rel=balance_rel)
        self._history: dict[str, PrefixIndex] = {}  # by replica unique_id
        self._pending_ids: dict[str, tuple[int, ...]] = {}  # internal id -> the prompt's chunk ids, until routed
        self._digests: dict[str, DigestIndex] = {}  # by replica unique_id

    @staticmethod
    def chars_per_token(replicas: list[RunningReplica]) -> float:
        """Characters per prompt token, as the replicas measured on the prompts they served (the
        mean of their reports; CHARS_PER_TOKEN before any): a prompt's tokens and its cached tokens
        are estimated from its text with it, the same for every replica."""
        reports = [float(v) for r in replicas if (v := (r.routing_stats or {}).get("chars_per_token"))]
        return sum(reports) / len(reports) if reports else CHARS_PER_TOKEN

    def history_of(self, replica: RunningReplica) -> PrefixIndex:
        kv_tokens = float((replica.routing_stats or {}).get("kv_tokens") or DEFAULT_KV_TOKENS)
        index = self._history.get(replica.replica_id.unique_id)
        if index is None:
            index = self._history[replica.replica_id.unique_id] = PrefixIndex()
        index.capacity_blocks = max(kv_tokens * self.chars_per_token([replica]) / CHUNK_CHARS, 1)
        return index

    def index_of(self, replica: RunningReplica, in_digest: bool = True) -> DigestIndex | PrefixIndex:
        """For a prompt a digest covers (`in_digest`), the replica's reported prefix digest with this
        router's sends since, once it reports one; else this router's history of what it sent there."""
        stats = replica.routing_stats or {}
        at = stats.get("prefix_digest_time")
        if at is None or not in_digest:
            return self.history_of(replica)
        index = self._digest_of(replica.replica_id.unique_id)
        index.update(stats.get("prefix_digest") or (), float(at))
        return index

    def _digest_of(self, unique_id: str) -> DigestIndex:
        index = self._digests.get(unique_id)
        if index is None:
            index = self._digests[unique_id] = DigestIndex()
        return index

    async def choose_replicas(self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None):
        t0, cpu0 = time.perf_counter(), time.thread_time()
        now = time.time()
        if self._provisional:
            self._provisional = {k: v for k, v in self._provisional.items() if v[1] > now - PROVISIONAL_KEPT_S}
        body = request_body(pending_request)
        text = prompt_text(body)
        ids = text_block_ids(text, CHUNK_CHARS)
        chars_per_token = self.chars_per_token(candidate_replicas)
        num_prompt = max(int(len(text) / chars_per_token), 1)
        in_digest = digest_prompt(body) is not None
        cached = [min(int(self.index_of(r, in_digest).match(ids) * CHUNK_CHARS / chars_per_token), num_prompt - 1)
                  for r in candidate_replicas]
        loads = [self.load_of(r) for r in candidate_replicas]
        work, ongoing = [w for w, _ in loads], [n for _, n in loads]
        order = cache_aware_rank(num_prompt, cached, work, ongoing, self.policy, [random.random() for _ in candidate_replicas])
        ranks = self.with_affinity([[candidate_replicas[k]] for k in order], candidate_replicas, pending_request)
        if ranks and pending_request is not None:
            rid = pending_request.metadata.internal_request_id
            self._provisional[rid] = (ranks[0][0].replica_id, now)
            self._pending_ids[rid] = ids
            if len(self._pending_ids) > MAX_COMPLETIONS:  # choices never routed (cancelled)
                self._pending_ids.pop(next(iter(self._pending_ids)))
        router_metrics.observe_decision("cache-aware", time.perf_counter() - t0, time.thread_time() - cpu0)
        if router_metrics.LOGGING:  # after the timing: the log's file write is not the router's work
            router_metrics.log_decision({
                "t": now, "prompt_tokens": num_prompt, "session": session_key(body), "digest": in_digest,
                "replicas": [r.replica_id.unique_id for r in candidate_replicas], "cached": cached, "work": work, "ongoing": ongoing,
                "chosen": ranks[0][0].replica_id.unique_id if ranks else None,
                "request": pending_request.metadata.internal_request_id if pending_request is not None else None})
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        if router_metrics.LOGGING:
            router_metrics.log_decision({"t": time.time(), "routed": pending_request.metadata.internal_request_id,
                                         "replica": replica_id.unique_id})
        ids = self._pending_ids.pop(pending_request.metadata.internal_request_id, None)
        if ids:
            index = self._history.get(replica_id.unique_id)
            if index is None:
                index = self._history[replica_id.unique_id] = PrefixIndex()
            index.insert(ids)
            self._digest_of(replica_id.unique_id).add(time.time(), ids)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self._history.pop(replica_id.unique_id, None)
        self._digests.pop(replica_id.unique_id, None)


@functools.cache
def _prefix_aware_router_class():
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

    class PrefixAwareRouter(PrefixCacheAffinityRouter):
        """Ray Serve's prefix-aware router, reading the prompt from the body the ingress forwards
        (it looks for a `prompt` or `messages` attribute on the request's arguments)."""

        def _extract_text_from_request(self, pending_request: PendingRequest) -> str:
            return prompt_text(request_body(pending_request))

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            t0 = time.perf_counter()
            try:
                return await super().choose_replicas(candidate_replicas, pending_request)
            finally:
                router_metrics.observe_decision("ray-prefix", time.perf_counter() - t0)

    return PrefixAwareRouter


def __getattr__(name: str):
    # Ray Serve imports the router class by path; ray.llm is loaded only when it is chosen
    if name == "PrefixAwareRouter":
        return _prefix_aware_router_class()
    raise AttributeError(name)


class RoundRobinRouter(SessionAffinityMixin, FIFOMixin, RequestRouter):
    def initialize_state(self, session_affinity: bool = False, **kwargs: Any) -> None:
        super().initialize_state(session_affinity=session_affinity)
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None):
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        k = next(self._turn) % len(ordered)
        ranks = [[r] for r in ordered[k:] + ordered[:k]]
        return self.with_affinity(ranks, candidate_replicas, pending_request)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        self.remember_session(pending_request, replica_id)


class AffinePowerOfTwoRouter(SessionAffinityMixin, PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None):
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        return self.with_affinity(ranks, candidate_replicas, pending_request)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        self.remember_session(pending_request, replica_id)


ROUTER_CLASSES = {
    "least-work": "lenserve.server.ray_router.LeastWorkRouter",
    "pow2": "lenserve.server.ray_router.AffinePowerOfTwoRouter",
    "round-robin": "lenserve.server.ray_router.RoundRobinRouter",
    "cache-aware": "lenserve.server.ray_router.CacheAwareRouter",
    "ray-prefix": "lenserve.server.ray_router.PrefixAwareRouter",
}
