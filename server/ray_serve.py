"""Scale-out on Ray Serve: `lenserve serve --replicas N` runs N engine replicas as one Ray Serve
deployment behind one OpenAI-compatible ingress.

    HTTP ─> Ray Serve proxy ─> LenserveIngress (FastAPI: auth, body limit, validation, /metrics)
                                 └ DeploymentHandle + request router (least-work | pow2 | round-robin | cache-aware | ray-prefix)
                                     └ EngineReplica x N (AsyncEngine + OpenAIServing, as the single server)

The ingress validates each request with the single server's pydantic models (same 400s), then
forwards the raw JSON body to a replica, which answers exactly as `lenserve serve` would (its
OpenAIServing does the work). The replica's answer comes back as a stream: first a head (status,
headers, which replica), then the body (one JSON document, or SSE chunks). A replica that dies
mid-request ends that request with an OpenAI error body (503 `replica_died`, or an SSE error event
when streaming had begun); the router then sends new requests to the replicas left.

Metrics: each replica labels its `lenserve:*` metrics with `replica` and pushes them every second
to a small named actor (MetricsHub); the ingress's /metrics serves them all, with its own
`lenserve:ingress_*` books (accepted = completed + errored + aborted).

Ray is imported only here, and this module only when --replicas or --ray-address is given.
"""
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, replace

import ray
from ray import serve

from lenserve.server.app import ServerConfig

logger = logging.getLogger("lenserve")

APP_NAME = "lenserve"
NAMESPACE = "lenserve"
HUB_NAME = "lenserve-metrics-hub"
METRICS_PUSH_S = 1.0
STALE_REPLICA_S = 30.0  # a replica that has not pushed metrics for this long is left out of /metrics

# The ingress replica's deployment handle and metrics hub. A module global reached through a
# module-level function, not app.state: Serve ships the FastAPI app to the ingress actor apart from
# the deployment class, and cloudpickle copies the globals of nested functions (not this function's).
_INGRESS: dict = {}


def ingress_state() -> dict:
    return _INGRESS


@dataclass
class ScaleOutConfig:
    server: ServerConfig
    num_replicas: int = 2
    min_replicas: int | None = None  # with max_replicas: autoscale on ongoing requests between the two
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    router: str = "least-work"
    session_affinity: bool = False
    ray_address: str | None = None  # None: a local Ray; "auto" or HOST:PORT: join that cluster
    replica_num_cpus: float | None = None  # Ray CPUs per replica (default: the engine's threads)
    routing_stats_period_s: float = 0.5
    max_ongoing_requests: int = 1000  # per replica; the engine's --max-queue answers 429 before this
    max_replicas_per_node: int | None = None  # 1: one replica per Ray node (spread over machines)

    def __post_init__(self) -> None:
        from lenserve.server.ray_router import ROUTER_CLASSES

        if self.router not in ROUTER_CLASSES:
            raise ValueError(f"--router must be one of {', '.join(ROUTER_CLASSES)}, got {self.router!r}")
        if self.num_replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.num_replicas}")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise ValueError(f"--max-replicas-per-node must be >= 1, got {self.max_replicas_per_node}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together")
        if self.min_replicas is not None:
            if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
                raise ValueError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                                 f"{self.min_replicas} and {self.max_replicas}")
            if not self.min_replicas <= self.num_replicas <= self.max_replicas:
                raise ValueError(f"--replicas {self.num_replicas} must lie within --min-replicas {self.min_replicas} "
                                 f"and --max-replicas {self.max_replicas}")


# ---- metrics hub ------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class MetricsHub:
    """Latest metric families of each replica: {replica: (families, unix time)}."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[list, float]] = {}

    def push(self, replica: str, families: list) -> None:
        self.latest[replica] = (families, time.time())

    def forget(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def collect(self) -> dict[str, tuple[list, float]]:
        return self.latest


# The ingress, its HTTP proxy and the metrics hub stay on the head node: a worker node (and the
# engine replicas on it) can then go away without taking the way in with it.
HEAD_NODE = {"node:__internal_head__": 0.001}


def get_hub():
    return MetricsHub.options(name=HUB_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                              resources=HEAD_NODE).remote()


# ---- the engine replica ---------------------------------------------------------------------------------
class _NoDisconnect:
    """The `request` OpenAIServing watches for a disconnect: here cancellation (from the ingress)
    plays that part, so receive() never returns."""

    async def receive(self):
        await asyncio.Event().wait()


class EngineReplica:
    """One engine, serving requests forwarded by the ingress exactly as the single server would."""

    async def __init__(self, config: ServerConfig, prefix_digest: bool = False) -> None:
        from lenserve.engine.async_engine import AsyncEngine
        from lenserve.engine.llm_engine import LLMEngine
        from lenserve.engine.cpu_threads import run_in_fresh_thread
        from lenserve.server.app import file_fault_hook, load_length_models
        from lenserve.server.metrics import Metrics
        from lenserve.server.prefix_digest import PrefixDigest
        from lenserve.server.serving import OpenAIServing

        self.replica = serve.get_replica_context().replica_id.unique_id
        eng = await asyncio.to_thread(LLMEngine, config.engine)
        names = [config.served_model_name or eng.model_name]
        if config.served_model_name and eng.model_name not in names:
            names.append(eng.model_name)
        self.model_names = names
        self.metrics = Metrics(names[0], extra_labels={"replica": self.replica})
        self.engine = AsyncEngine(eng, max_queue=config.max_queue)
        self.engine.stats_listeners.append(self.metrics.record_iteration)
        self.engine.stats_listeners.append(self._record_work)
        if os.environ.get("LENSERVE_FAULT_FILE"):
            self.engine.fault_hook = file_fault_hook(os.environ["LENSERVE_FAULT_FILE"])
        self._work = (0.0, time.time(), 0)  # (predicted outstanding work, when, unfinished requests)
        self._last_arrival = 0.0  # when the last request came in (handle)
        self._num_handling = 0  # requests in handle(): come and not yet answered
        self._mean_request_work: float | None = None
        bm = eng.block_manager
        self._prefix: dict = {"kv_tokens": bm.num_blocks * bm.block_size}  # and the prefix cache's counters, after each step
        # which of the cache-aware router's text block ids the prefix cache holds (only that router reads it)
        self.prefix_digest = PrefixDigest(bm) if prefix_digest else None
        # in a thread that exits: the predictor's loading runs OpenMP work (LightGBM), and a second
        # long-lived OpenMP team slows every parallel region of the engine's steps (cpu_threads.py)
        predictor = run_in_fresh_thread(load_length_models, config, eng)
        self.engine.start(asyncio.get_running_loop())
        self.serving = OpenAIServing(self.engine, names, self.metrics, predictor, config.request_timeout_s)
        if self.prefix_digest is not None:
            self.serving.prompt_listener = self.prefix_digest.record
        self.started = time.time()
        self._hub = get_hub()
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        logger.info("replica %s serving %s", self.replica, names[0])

    # ---- what the router sees (core thread, after each step) ----------------------------------------
    def _record_work(self, stats) -> None:
        from lenserve.scheduler.policies import predicted_work

        sched = self.engine.engine.scheduler
        weight = sched.config.prompt_weight
        seqs = list(sched.requests.values())
        work = sum(predicted_work(s, weight) for s in seqs)
        self._work = (work, time.time(), len(seqs))
        s = stats.scheduler
        bm = self.engine.engine.block_manager
        self._prefix = {"kv_tokens": bm.num_blocks * bm.block_size, "prefix_cache_queries": s.prefix_cache_queries_total,
                        "prefix_cache_hits": s.prefix_cache_hits_total, "prefix_cache_blocks": s.num_cached_blocks}
        fresh = [predicted_work(s, weight) for s in seqs if s.num_computed_tokens == 0]
        if fresh:
            mean = sum(fresh) / len(fresh)
            old = self._mean_request_work
            self._mean_request_work = mean if old is None else 0.8 * old + 0.2 * mean

    def record_routing_stats(self) -> dict:
        work, at, unfinished = self._work
        if self._num_handling == 0:
            # idle: nothing left, as of the last request that came in (every request sent before it
            # has come and gone). The report of the step the replica went idle at would count a
            # request sent since as unseen until the next step, forever if the router never heard
            # of its completion.
            work, at, unfinished = 0.0, max(at, self._last_arrival), 0
        stats = {"work": work, "time": at, "unfinished": unfinished, "mean_request_work": self._mean_request_work, **self._prefix}
        if self.prefix_digest is not None:
            stats.update(self.prefix_digest.report())
        return stats

    async def _push_metrics(self) -> None:
        while True:
            try:
                self._hub.push.remote(self.replica, list(self.metrics.registry.collect()))
            except Exception:  # the hub restarting: try again next time
                logger.debug("metrics push failed", exc_info=True)
            await asyncio.sleep(METRICS_PUSH_S)

    def check_health(self) -> None:
        """Ray Serve's health check: a dead engine core makes the controller replace this replica."""
        if not self.engine.healthy:
            raise RuntimeError(f"engine unhealthy: {self.engine.dead_reason}")

    # ---- requests -----------------------------------------------------------------------------------
    async def info(self) -> dict:
        eng = self.engine
        return {"model_names": self.model_names, "max_model_len": eng.engine.max_model_len, "started": self.started,
                "replica": self.replica, "healthy": eng.healthy, "running": eng.num_running, "waiting": eng.num_waiting}

    async def handle(self, route: str, body: dict):
        """Yields a head {"status", "headers", "stream", "replica"} then the body: bytes of one JSON
        document, or SSE text chunks."""
        self._last_arrival = time.time()
        self._num_handling += 1
        try:
            async with contextlib.aclosing(self._handle(route, body)) as items:  # closed with this one
                async for item in items:
                    yield item
        finally:
            self._num_handling -= 1

    async def _handle(self, route: str, body: dict):
        from fastapi.responses import StreamingResponse
        from pydantic import ValidationError

        from lenserve.server.errors import APIError, error_body
        from lenserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

        head = {"status": 200, "headers": {}, "stream": False, "replica": self.replica}
        try:
            if route == "completions":
                resp = await self.serving.completions(CompletionRequest.model_validate(body), _NoDisconnect())
            elif route == "chat":
                resp = await self.serving.chat(ChatCompletionRequest.model_validate(body), _NoDisconnect())
            elif route == "tokenize":
                resp = self.serving.tokenize(TokenizeRequest.model_validate(body))
            elif route == "detokenize":
                resp = self.serving.detokenize(DetokenizeRequest.model_validate(body))
            else:
                raise APIError(404, f"no route {route!r}")
        except APIError as e:
            if e.status == 499:  # the ingress cancelled (its client left): nobody to answer
                raise asyncio.CancelledError() from None
            yield {**head, "status": e.status, "headers": dict(e.headers or {})}
            yield json.dumps(error_body(e.status, e.message, e.param, e.code)).encode()
            return
        except ValidationError as e:
            yield {**head, "status": 400}
            yield json.dumps(error_body(400, str(e).splitlines()[0])).encode()
            return
        if isinstance(resp, StreamingResponse):
            yield {**head, "stream": True}
            async for chunk in resp.body_iterator:
                yield chunk
        elif isinstance(resp, dict):
            yield head
            yield json.dumps(resp).encode()
        else:
            yield {**head, "status": resp.status_code}
            yield bytes(resp.body)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=2.0)


# ---- the ingress --------------------------------------------------------------------------------------
def _dead_replica_error(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def build_ingress_app(config: ServerConfig):
    """The FastAPI app of the ingress: the single server's middleware, errors and routes, each
    forwarded to an engine replica through the deployment handle in `ingress_state()`."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from lenserve import __version__
    from lenserve.server.app import guarded_app
    from lenserve.server.errors import APIError, error_body
    from lenserve.server.metrics import CONTENT_TYPE
    from lenserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

    app = guarded_app("lenserve (Ray Serve ingress)", config)

    registry = CollectorRegistry()
    accepted = Counter("lenserve:ingress_requests_accepted_total", "Requests forwarded to a replica", ["route"], registry=registry)
    outcomes = Counter("lenserve:ingress_requests_total", "Forwarded requests by outcome (completed, errored, aborted)",
                       ["route", "outcome"], registry=registry)
    routed = Counter("lenserve:ingress_routed_total", "Requests answered by each replica", ["replica"], registry=registry)
    app.state.registry = registry

    def books() -> dict:
        def total(counter, **match) -> float:
            return sum(s.value for m in counter.collect() for s in m.samples
                       if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in match.items()))

        return {"accepted": total(accepted), **{o: total(outcomes, outcome=o) for o in ("completed", "errored", "aborted")}}

    app.state.books = books

    async def forward(route: str, request: Request, streaming: bool):
        body = await request.json()
        handle = ingress_state()["handle"]
        accepted.labels(route).inc()
        outcome = "errored"
        gen = handle.options(stream=True).handle.remote(route, body)
        watcher = asyncio.ensure_future(_wait_disconnect(request)) if not streaming else None
        try:
            head, first = await _next_two(gen, watcher)
        except _ClientLeft:
            gen.cancel()
            outcomes.labels(route, "aborted").inc()
            raise APIError(499, "client disconnected") from None
        except Exception as e:
            gen.cancel()
            outcomes.labels(route, "errored").inc()
            return _replica_failure(e)
        finally:
            if watcher is not None:
                watcher.cancel()
        routed.labels(head["replica"]).inc()
        headers = {**head.get("headers", {}), "x-lenserve-replica": head["replica"]}
        if not head["stream"]:
            outcomes.labels(route, "completed" if head["status"] < 400 else "errored").inc()
            return Response(first, status_code=head["status"], headers=headers, media_type="application/json")

        async def relay():
            nonlocal outcome
            outcome = "aborted"  # until the stream ends
            try:
                yield first
                failed = '"error"' in first[:20] if isinstance(first, str) else False
                async for chunk in gen:
                    if isinstance(chunk, str) and chunk.startswith('data: {"error"'):
                        failed = True
                    yield chunk
                outcome = "errored" if failed else "completed"
            except Exception as e:  # the replica died mid-stream: say so, then end the stream
                outcome = "errored"
                status, message, code = _failure_of(e)
                yield f"data: {json.dumps(error_body(status, message, code=code))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if outcome == "aborted":
                    # the client left (the task cancelled, or the generator closed): the replica's
                    # generation is cancelled too, which aborts the request in its engine
                    gen.cancel()
                outcomes.labels(route, outcome).inc()

        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await forward("completions", request, bool(req.stream))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await forward("chat", request, bool(req.stream))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request):
        return await forward("tokenize", request, False)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request):
        return await forward("detokenize", request, False)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            info = await ingress_state()["handle"].info.remote()
        except Exception as e:
            return _replica_failure(e)
        created = int(info["started"])
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "lenserve", "max_model_len": info["max_model_len"]}
            for n in info["model_names"]
        ]}

    @app.get("/health")
    async def health(request: Request):
        try:
            info = await asyncio.wait_for(ingress_state()["handle"].info.remote(), timeout=10)
        except Exception as e:
            return JSONResponse(error_body(503, f"no engine replica answered: {type(e).__name__}", code="engine_unhealthy"), status_code=503)
        if not info["healthy"]:
            return JSONResponse(error_body(503, "engine unhealthy", code="engine_unhealthy"), status_code=503)
        return {"status": "ok", "replica": info["replica"], "running": info["running"], "waiting": info["waiting"]}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/books")
    async def books_route():
        """The ingress's request books (also in /metrics): accepted = completed + errored + aborted."""
        return books()

    @app.get("/metrics")
    async def metrics(request: Request):
        families = []
        try:
            latest = await ingress_state()["hub"].collect.remote()
        except Exception:
            latest = {}
        now = time.time()
        for _, (fams, at) in sorted(latest.items()):
            if now - at <= STALE_REPLICA_S:
                families.extend(fams)
        merged = CollectorRegistry()
        merged.register(_Merged(families))
        from lenserve.server.router_metrics import REGISTRY as ROUTER_REGISTRY

        text = generate_latest(merged) + generate_latest(registry) + generate_latest(ROUTER_REGISTRY)
        return Response(text, media_type=CONTENT_TYPE)

    return app


class _ClientLeft(Exception):
    pass


async def _wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_two(gen, watcher):
    """The replica's head and first body item; raises _ClientLeft if the client goes first."""

    async def two():
        head = await gen.__anext__()
        first = await gen.__anext__()
        return head, first

    task = asyncio.ensure_future(two())
    if watcher is None:
        return await task
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    raise _ClientLeft()


def _failure_of(exc: BaseException) -> tuple[int, str, str]:
    if _dead_replica_error(exc):
        return 503, f"the engine replica serving this request died ({type(exc).__name__}); retry the request", "replica_died"
    return 503, f"the engine replica failed: {type(exc).__name__}: {exc}"[:500], "replica_error"


def _replica_failure(exc: BaseException):
    from lenserve.server.errors import error_response

    status, message, code = _failure_of(exc)
    logger.warning("request failed on a replica: %s", message)
    return error_response(status, message, code=code)


class _Merged:
    """A prometheus collector over metric families gathered from replicas: one family per name,
    with every replica's samples (each carries its `replica` label)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        from prometheus_client.metrics_core import Metric

        by_name: dict[str, Metric] = {}
        for fam in self.families:
            out = by_name.get(fam.name)
            if out is None:
                out = by_name[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples.extend(fam.samples)
        return list(by_name.values())


# ---- building and running the Serve application ---------------------------------------------------------------
def default_threads(num_replicas: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(num_replicas, 1))


def router_kwargs(cfg: ScaleOutConfig, server: ServerConfig) -> dict:
    """The request router's initialize_state kwargs (Ray's own prefix-aware router takes its defaults)."""
    if cfg.router == "ray-prefix":
        return {}
    kwargs = {"session_affinity": cfg.session_affinity}
    if cfg.router == "cache-aware":
        kwargs["prompt_weight"] = server.engine.scheduler.prompt_weight
    return kwargs


def build_application(cfg: ScaleOutConfig):
    """The Serve application: the ingress bound to the engine deployment."""
    from fastapi import FastAPI
    from ray.serve.config import RequestRouterConfig

    from lenserve.server.ray_router import ROUTER_CLASSES

    server = cfg.server
    if server.engine.num_threads is None:
        # N replicas on one machine must not each take every core
        server = replace(server, engine=replace(server.engine, num_threads=default_threads(cfg.max_replicas or cfg.num_replicas)))
    num_cpus = cfg.replica_num_cpus if cfg.replica_num_cpus is not None else float(server.engine.num_threads)
    options = dict(
        name="EngineReplica",
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        health_check_period_s=5,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=max(server.shutdown_grace_s, 1.0),
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASSES[cfg.router],
            request_router_kwargs=router_kwargs(cfg, server),
            request_routing_stats_period_s=cfg.routing_stats_period_s,
            request_routing_stats_timeout_s=max(cfg.routing_stats_period_s * 4, 5.0),
        ),
    )
    if cfg.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = cfg.max_replicas_per_node
    if cfg.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas, "initial_replicas": cfg.num_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests, "upscale_delay_s": 5, "downscale_delay_s": 60,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    engine_deployment = serve.deployment(**options)(EngineReplica)

    fastapi_app: FastAPI = build_ingress_app(server)

    @serve.deployment(name="LenserveIngress", num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": HEAD_NODE},
                      max_ongoing_requests=100_000)
    @serve.ingress(fastapi_app)
    class LenserveIngress:
        def __init__(self, engine_handle) -> None:
            ingress_state()["handle"] = engine_handle
            ingress_state()["hub"] = get_hub()
            # What start-up allocated (Ray, FastAPI, the app) is kept for good: moved out of the
            # collector's generations, so that a full collection does not walk it in the middle of
            # a routing decision (a few ms of a request's latency); vLLM freezes its heap alike.
            gc.freeze()

    return LenserveIngress.bind(engine_deployment.bind(server, prefix_digest=cfg.router == "cache-aware"))


def app_builder(args: dict):
    """Ray Serve application builder, for `serve run` / `serve deploy` config files and KubeRay's
    RayService (import_path `lenserve.server.ray_serve:app_builder`). `args` holds `lenserve serve`
    flags without their dashes, e.g. {"replicas": 4, "router": "least-work", "max_model_len": 2048};
    true booleans are plain flags."""
    from lenserve.cli import _load_extra_commands, build_parser
    from lenserve.server.cli import scale_out_config_from_args, server_config_from_args

    argv = ["serve"]
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    _load_extra_commands()
    ns = build_parser().parse_args(argv)
    if ns.replicas is None and ns.min_replicas is None:
        ns.replicas = 1
    return build_application(scale_out_config_from_args(ns, server_config_from_args(ns)))


def start(cfg: ScaleOutConfig, *, blocking: bool = True) -> None:
    """Starts (or joins) Ray, runs the application on cfg.server.host:port; with `blocking`, serves
    until SIGTERM/SIGINT, then shuts the application down (and a Ray it started)."""
    own_ray = cfg.ray_address is None
    if not ray.is_initialized():
        if own_ray:
            # address="local": a new Ray of our own, never one that happens to run on this machine
            # (ray.init would otherwise join the latest one it finds under /tmp/ray)
            ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, cfg.max_replicas or cfg.num_replicas))
        else:
            ray.init(address=cfg.ray_address, namespace=NAMESPACE, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.server.host, "port": cfg.server.port}, detached=not own_ray)
    serve.run(build_application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("serving on http://%s:%d with %d replicas (router %s)", cfg.server.host, cfg.server.port, cfg.num_replicas, cfg.router)
    if not blocking:
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        shutdown(own_ray, timeout_s=cfg.server.shutdown_grace_s + 30)


def shutdown(own_ray: bool = True, timeout_s: float = 60.0) -> None:
    """Deletes the application (replicas drain for their graceful_shutdown_timeout_s) and, when
    this process started Ray, stops it. Bounded: a Ray already half gone (a signal sent to the
    whole process group also reaches the raylet) cannot hang the exit."""

    def graceful() -> None:
        try:
            serve.delete(APP_NAME)
        except Exception:
            logger.debug("serve.delete failed", exc_info=True)
        try:
            ray.kill(ray.get_actor(HUB_NAME, namespace=NAMESPACE))
        except Exception:
            pass
        if own_ray:
            try:
                serve.shutdown()
            except Exception:
                logger.debug("serve.shutdown failed", exc_info=True)

    logger.info("shutting down the Serve application")
    worker = threading.Thread(target=graceful, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        logger.warning("Serve did not shut down within %.0fs; stopping Ray anyway", timeout_s)
    if own_ray:
        ray.shutdown()
