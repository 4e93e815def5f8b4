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

All three keep a session (`session_id`, else `user`, in the request body) on the replica that took
its first request when `session_affinity` is set in the router kwargs, as long as that replica lives.
The simulator's routers (lenserve.scheduler.cluster) are the same policies.
"""
from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict, deque
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

DEFAULT_REQUEST_WORK = 256.0  # predicted work of one request (response tokens) before any replica has reported
MAX_SESSIONS = 100_000
MAX_COMPLETIONS = 10_000  # completions remembered to discount stale reports
COMPLETIONS_KEPT_S = 60.0  # a report older than this is long stale (they come every 0.5 s)
PROVISIONAL_KEPT_S = 30.0  # a choice not routed by then was cancelled


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

    def work_of(self, replica: RunningReplica) -> float:
        """The replica's last report, less the share of it whose requests this router has seen
        complete since (reports come every `request_routing_stats_period_s`, and a stale one would
        keep steering requests away from a replica that has since drained), plus a typical
        request's work for each request sent after the report and not completed."""
        stats = replica.routing_stats or {}
        reported = float(stats.get("work", 0.0))
        at = float(stats.get("time", 0.0))
        per_request = float(stats.get("mean_request_work") or DEFAULT_REQUEST_WORK)
        rid = replica.replica_id
        unseen = sum(1 for r, t in self._inflight.values() if r == rid and t > at)
        unseen += sum(1 for r, _ in self._provisional.values() if r == rid)
        reported_count = int(stats.get("unfinished") or 0)
        if reported_count and reported:
            done = sum(1 for r, sent, finished in self._completed if r == rid and sent <= at < finished)
            reported *= max(reported_count - done, 0) / reported_count
        return reported + unseen * per_request

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
}
