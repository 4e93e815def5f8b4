"""Request routers' own metrics, in the process that routes (the ingress), served on its /metrics.

A module apart from lenserve.server.ray_router on purpose: Ray Serve ships a router class to the
routing process by value (cloudpickle, with its module's globals), and a Prometheus metric holds
locks that cannot be pickled; a module imported by name travels by reference."""
import json
import os
import threading

from prometheus_client import CollectorRegistry, Histogram

REGISTRY = CollectorRegistry()
_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
DECISION_SECONDS = Histogram("lenserve:router_decision_seconds", "Time a request router takes to rank the replicas for one request",
                             ["router"], registry=REGISTRY, buckets=_BUCKETS)
# The same decisions in the routing thread's CPU time: the router's own work, without the time the
# OS gave the machine's other processes meanwhile (the engines, on a machine they share).
DECISION_CPU_SECONDS = Histogram("lenserve:router_decision_cpu_seconds", "CPU time of the routing thread for one ranking",
                                 ["router"], registry=REGISTRY, buckets=_BUCKETS)


def observe_decision(router: str, seconds: float, cpu_seconds: float | None = None) -> None:
    DECISION_SECONDS.labels(router).observe(seconds)
    if cpu_seconds is not None:
        DECISION_CPU_SECONDS.labels(router).observe(cpu_seconds)


# LENSERVE_ROUTER_LOG=PATH: every cache-aware decision as one JSON line (the router's view of each
# replica and its choice), to compare a live router with the simulator's, decision by decision.
_LOG_PATH = os.environ.get("LENSERVE_ROUTER_LOG")
LOGGING = bool(_LOG_PATH)
_log_lock = threading.Lock()


def log_decision(record: dict) -> None:
    if not _LOG_PATH:
        return
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with _log_lock, open(_LOG_PATH, "a") as f:
        f.write(line)
