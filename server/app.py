"""The FastAPI application: engine created in the lifespan and kept on app.state; thin routes."""
from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lenserve import __version__
from lenserve.config import EngineConfig
from lenserve.engine.cpu_threads import run_in_fresh_thread
from lenserve.server.errors import (
    APIError,
    api_error_handler,
    error_body,
    http_error_handler,
    unhandled_error_handler,
    validation_error_handler,
)
from lenserve.server.metrics import CONTENT_TYPE, Metrics
from lenserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

logger = logging.getLogger("lenserve")

OPEN_PATHS = frozenset({"/health", "/metrics"})


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int | None = 256
    served_model_name: str | None = None
    request_timeout_s: float | None = None
    max_request_body_bytes: int = 4 * 2**20
    shutdown_grace_s: float = 30.0
    predictor: str | None = "default"  # "default", a directory, or None/"none"
    # the served model's own length reading at the end of each prefill (predictor/probe.py):
    # "default" (the shipped probe, when it was fitted on the served model and a predictor is on),
    # a directory, or None/"none"
    length_probe: str | None = "default"
    log_requests: bool = False


class GuardMiddleware:
    """Pure ASGI: counts in-flight requests (until their body is sent), refuses new work while
    draining (503), checks the API key (401) and bounds the request body (413)."""

    def __init__(self, app, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if logger.isEnabledFor(logging.DEBUG):
            send = self._access_logged(scope, send)
        path = scope.get("path", "")
        cfg: ServerConfig = self.state.config
        if path not in OPEN_PATHS:
            if cfg.api_key is not None and not self._authorized(scope, cfg.api_key):
                return await self._reject(send, 401, "invalid or missing API key (Authorization: Bearer <key>)", "invalid_api_key")
            if self.state.draining:
                return await self._reject(send, 503, "the server is shutting down", "shutting_down")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        limit = cfg.max_request_body_bytes
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await self._reject(send, 400, "bad Content-Length header", "bad_request")
            if too_big:
                return await self._reject(send, 413, f"request body exceeds {limit} bytes", "body_too_large")
        received = 0
        overflow = False

        async def limited_receive():
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise APIError(413, f"request body exceeds {limit} bytes", code="body_too_large")
            return message

        self.state.inflight += 1
        try:
            await self.app(scope, limited_receive if path not in OPEN_PATHS else receive, send)
        except APIError as e:
            if not overflow:
                raise
            await self._reject(send, e.status, e.message, e.code)
        finally:
            self.state.inflight -= 1

    @staticmethod
    def _access_logged(scope, send):
        """An access log line at DEBUG per response: method, path, status, time. Headers and
        bodies are never logged (the Authorization header carries the API key)."""
        t0 = time.monotonic()

        async def logged_send(message):
            if message["type"] == "http.response.start":
                logger.debug("%s %s -> %d (%.1f ms to headers)", scope.get("method"), scope.get("path"),
                             message["status"], 1e3 * (time.monotonic() - t0))
            await send(message)

        return logged_send

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                got = value.decode("latin-1")
                scheme, _, token = got.partition(" ")
                # constant-time comparison; the key is never logged
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
        return False

    @staticmethod
    async def _reject(send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _load_predictor(spec: str | None):
    if spec in (None, "none"):
        return None
    from lenserve.predictor import load_default_predictor, load_predictor

    t0 = time.monotonic()
    try:
        predictor = load_default_predictor() if spec == "default" else load_predictor(spec)
    except (OSError, ValueError) as e:
        if spec != "default":
            raise
        logger.warning("the default length predictor could not be loaded (%s); scheduling without predictions", e)
        return None
    logger.info("length predictor %s loaded in %.2fs", spec, time.monotonic() - t0)
    return predictor


def _attach_probe(spec: str | None, engine, with_predictor: bool) -> None:
    """Gives the engine its length probe. The shipped one only reads the model it was fitted on:
    another served model runs without it (a named directory that does not fit is an error)."""
    if spec in (None, "none") or (spec == "default" and not with_predictor):
        return
    from lenserve.predictor.model import DEFAULT_DIR
    from lenserve.predictor.probe import HiddenStateProbe

    path = os.path.join(DEFAULT_DIR, "probe") if spec == "default" else spec
    try:
        probe = HiddenStateProbe.load(path)
        engine.set_length_probe(probe)
    except (OSError, ValueError) as e:
        if spec != "default":
            raise
        logger.info("no length probe for %s (%s)", engine.model_name, e)
        return
    logger.info("length probe: layers %s of %s refine predictions at the end of each prefill",
                ",".join(map(str, probe.layers)), probe.model)


def load_length_models(config: ServerConfig, engine):
    """The length predictor the server asks at arrival (None: off), after giving the engine its
    length probe; before the engine loop starts."""
    predictor = _load_predictor(config.predictor)
    _attach_probe(config.length_probe, engine, predictor is not None)
    return predictor


def file_fault_hook(path: str):
    """Fault injection for resilience tests (LENSERVE_FAULT_FILE=path): while the file holds a
    positive integer N, the next engine step raises and N is decremented."""

    def hook() -> None:
        try:
            with open(path) as f:
                remaining = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return
        if remaining > 0:
            with open(path, "w") as f:
                f.write(str(remaining - 1))
            raise RuntimeError("injected fault (LENSERVE_FAULT_FILE)")

    return hook


def guarded_app(title: str, config: ServerConfig, lifespan=None) -> FastAPI:
    """A FastAPI app with the guard (auth, limits, draining, access log) and the OpenAI error
    handlers: the single server's and the Ray Serve ingress's."""
    app = FastAPI(title=title, version=__version__, lifespan=lifespan)
    app.state.config = config
    app.state.draining = False
    app.state.inflight = 0
    app.add_middleware(GuardMiddleware, state=app.state)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
    return app


def _freeze_loaded_objects() -> None:
    """Moves every object alive once the server has loaded (torch's and the libraries' modules, the
    model, ~200k objects) out of the cyclic garbage collector's reach (gc.freeze): a full collection
    traversed them all, ~100 ms on the 2-core EPYC (SmolLM2 loaded), during which no stream got a
    token; frozen, it takes microseconds. Undone at shutdown (gc.unfreeze), so an in-process server
    leaves the collector as it found it."""
    gc.collect()
    gc.freeze()


def build_app(config: ServerConfig, engine=None) -> FastAPI:
    """`engine`: an already loaded LLMEngine to serve (tests); by default one is built in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from lenserve.engine.async_engine import AsyncEngine
        from lenserve.engine.llm_engine import LLMEngine
        from lenserve.server.serving import OpenAIServing

        eng = engine or await asyncio.to_thread(LLMEngine, config.engine)
        names = [config.served_model_name or eng.model_name]
        if config.served_model_name and eng.model_name not in names:
            names.append(eng.model_name)
        metrics = Metrics(names[0])
        async_engine = AsyncEngine(eng, max_queue=config.max_queue)
        async_engine.stats_listeners.append(metrics.record_iteration)
        if os.environ.get("LENSERVE_FAULT_FILE"):
            logger.warning("fault injection enabled through LENSERVE_FAULT_FILE")
            async_engine.fault_hook = file_fault_hook(os.environ["LENSERVE_FAULT_FILE"])
        # in a thread that exits: the predictor's loading runs OpenMP work (LightGBM), and a second
        # long-lived OpenMP team slows every parallel region of the engine's steps (cpu_threads.py)
        predictor = run_in_fresh_thread(load_length_models, config, eng)
        frozen = engine is None  # only what this lifespan loaded itself
        if frozen:
            _freeze_loaded_objects()
        async_engine.start(asyncio.get_running_loop())
        app.state.engine = async_engine
        app.state.metrics = metrics
        app.state.model_names = names
        app.state.serving = OpenAIServing(async_engine, names, metrics, predictor, config.request_timeout_s)
        app.state.started = time.time()
        logger.info("serving %s on http://%s:%d", names[0], config.host, config.port)
        try:
            yield
        finally:
            async_engine.shutdown()
            if frozen:
                gc.unfreeze()

    app = guarded_app("lenserve", config, lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await request.app.state.serving.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await request.app.state.serving.chat(req, request)

    @app.get("/v1/models")
    async def models(request: Request):
        st = request.app.state
        created = int(st.started)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "lenserve", "max_model_len": st.engine.engine.max_model_len}
            for n in st.model_names
        ]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request):
        return request.app.state.serving.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request):
        return request.app.state.serving.detokenize(req)

    @app.get("/health")
    async def health(request: Request):
        st = request.app.state
        eng = getattr(st, "engine", None)
        if eng is None or not eng.healthy:
            reason = eng.dead_reason if eng is not None else "starting"
            return JSONResponse(error_body(503, f"engine unhealthy: {reason}", code="engine_unhealthy"), status_code=503)
        if st.draining:
            return JSONResponse(error_body(503, "the server is shutting down", code="shutting_down"), status_code=503)
        return {"status": "ok", "running": eng.num_running, "waiting": eng.num_waiting}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    return app
