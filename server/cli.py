"""`lenserve serve`: uvicorn with graceful shutdown (SIGTERM: 503 to new work, drain, exit 0)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

logger = logging.getLogger("lenserve")


def register(sub) -> None:
    from lenserve.cli import add_engine_args

    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LENSERVE_API_KEY"), help="require 'Authorization: Bearer KEY' (or set LENSERVE_API_KEY)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--request-timeout-s", type=float, default=None)
    p.add_argument("--max-request-body-bytes", type=int, default=4 * 2**20)
    p.add_argument("--shutdown-grace-s", type=float, default=30.0)
    p.add_argument("--predictor", default="default", help="'default', a predictor directory, or 'none'")
    p.add_argument("--length-probe", default="default",
                   help="refine predictions from the served model's own state after each prefill: 'default' (the "
                        "shipped probe, when it fits the served model and a predictor is on), a probe directory, or 'none'")
    # also accepted after the subcommand; SUPPRESS keeps `lenserve --log-level X serve` working
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING, ... (as `lenserve --log-level`)")
    r = p.add_argument_group("scale-out (Ray Serve; needs `pip install lenserve[ray]`)")
    r.add_argument("--replicas", type=int, default=None, help="run N engine replicas behind one ingress on Ray Serve")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto' or HOST:PORT) instead of starting a local Ray")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale on ongoing requests between --min-replicas and --max-replicas")
    r.add_argument("--max-replicas", type=int, default=None)
    r.add_argument("--target-ongoing-requests", type=float, default=8.0, help="autoscaling: ongoing requests per replica to aim for")
    r.add_argument("--router", default="least-work", choices=["least-work", "pow2", "round-robin", "cache-aware", "ray-prefix"],
                   help="least-work: least predicted outstanding work; pow2: Ray Serve's power of two choices on queue length; "
                        "cache-aware: prefill left after the prefix a replica likely caches + its predicted work, under an "
                        "imbalance guard; ray-prefix: Ray Serve's PrefixCacheAffinityRouter")
    r.add_argument("--session-affinity", action="store_true", help="keep requests of one session_id (else user) on one replica")
    r.add_argument("--max-replicas-per-node", type=int, default=None,
                   help="at most N engine replicas on one Ray node (1: spread the replicas over the cluster's machines)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def server_config_from_args(args: argparse.Namespace):
    from lenserve.cli import engine_config_from_args
    from lenserve.server.app import ServerConfig

    return ServerConfig(
        engine=engine_config_from_args(args),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_queue=args.max_queue,
        served_model_name=args.served_model_name,
        request_timeout_s=args.request_timeout_s,
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_grace_s=args.shutdown_grace_s,
        predictor=args.predictor,
        length_probe=args.length_probe,
    )


def scale_out_config_from_args(args: argparse.Namespace, config):
    """The Ray Serve settings of `lenserve serve --replicas ...` (lenserve.server.ray_serve imports Ray)."""
    from lenserve.server.ray_serve import ScaleOutConfig

    return ScaleOutConfig(
        server=config,
        num_replicas=args.replicas if args.replicas is not None else max(args.min_replicas or 1, 1),
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        router=args.router,
        session_affinity=args.session_affinity,
        ray_address=args.ray_address,
        max_replicas_per_node=args.max_replicas_per_node,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    config = server_config_from_args(args)
    if args.replicas is not None or args.ray_address is not None or args.min_replicas is not None:
        try:
            from lenserve.server.ray_serve import start
        except ImportError as e:
            if e.name is None or not e.name.startswith("ray"):
                raise
            raise ValueError("--replicas and --ray-address need Ray Serve: pip install 'lenserve[ray]'") from None
        start(scale_out_config_from_args(args, config))
        return 0
    run_server(config)
    return 0


def run_server(config, engine=None) -> None:
    import uvicorn

    from lenserve.server.app import build_app

    app = build_app(config, engine)

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: refuse new work with 503, wait for in-flight requests up to the
        grace period, then exit. A second signal exits at once."""

        def handle_exit(self, sig, frame):
            if app.state.draining:
                return super().handle_exit(sig, frame)
            app.state.draining = True
            logger.info("shutting down: draining %d in-flight requests (grace %.0fs)", app.state.inflight, config.shutdown_grace_s)
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self):
            deadline = loop_time() + config.shutdown_grace_s
            while app.state.inflight > 0 and loop_time() < deadline:
                await asyncio.sleep(0.05)
            engine = getattr(app.state, "engine", None)
            if app.state.inflight > 0 and engine is not None:
                # past the grace period: answer what is left (finish_reason "abort") instead of
                # cutting connections, then give the responses a moment to go out
                logger.warning("grace period over: ending %d in-flight requests with finish_reason 'abort'", app.state.inflight)
                engine.expire_all()
                flush_deadline = loop_time() + 5
                while app.state.inflight > 0 and loop_time() < flush_deadline:
                    await asyncio.sleep(0.05)
            self.should_exit = True

    def loop_time() -> float:
        return asyncio.get_event_loop().time()

    server = DrainingServer(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5,
        timeout_keep_alive=5, access_log=False,
    ))
    server.run()
