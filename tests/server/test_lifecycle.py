"""API keys, queue limits, request timeouts and graceful shutdown, each on its own server."""
import asyncio
import json
import signal
import threading
import time

import httpx

from .conftest import start_server


def test_api_key_required_except_health_and_metrics(tmp_path_factory):
    with start_server(tmp_path_factory, "--predictor", "none", api_key="s3cret-key") as s:
        for path, method in (("/v1/models", "GET"), ("/version", "GET"), ("/v1/completions", "POST"), ("/tokenize", "POST")):
            r = httpx.request(method, s.url + path, json={"prompt": "hi"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
            r = httpx.request(method, s.url + path, json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200
        with s.client() as c:
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        assert "s3cret-key" not in s.log()


def test_queue_full_gets_429_with_retry_after(tmp_path_factory):
    with start_server(tmp_path_factory, "--predictor", "none", "--max-queue", "2", "--max-num-seqs", "2") as s:
        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                body = {"prompt": "Tell a story.", "max_tokens": 40, "ignore_eos": True}
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(16)))

        results = asyncio.run(run())
        codes = [r.status_code for r in results]
        assert codes.count(429) >= 1 and codes.count(200) >= 2 and set(codes) <= {200, 429}
        rejected = next(r for r in results if r.status_code == 429)
        assert int(rejected.headers["Retry-After"]) >= 1 and rejected.json()["error"]["type"] == "rate_limit_error"


def test_request_timeout_aborts(tmp_path_factory):
    with start_server(tmp_path_factory, "--predictor", "none", "--request-timeout-s", "1.0") as s:
        with s.client() as c:
            r = c.post("/v1/completions", json={"prompt": "Go on forever.", "max_tokens": 1500, "ignore_eos": True})
            assert r.status_code == 200
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "abort" and 0 < r.json()["usage"]["completion_tokens"] < 1500
            deadline = time.monotonic() + 10
            while s.metric("lenserve:num_requests_running") > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert s.metric("lenserve:kv_cache_free_blocks") == s.metric("lenserve:kv_cache_total_blocks")


def test_sigterm_drains_in_flight_then_exits_zero(tmp_path_factory):
    with start_server(tmp_path_factory, "--predictor", "none", "--shutdown-grace-s", "60") as s:
        result = {}

        def long_request():
            with httpx.Client(base_url=s.url, timeout=120) as c:
                # long enough to be running well after the late request below (60 tokens took
                # ~0.3 s on native weights, and the server had drained and exited before it)
                with c.stream("POST", "/v1/completions", json={"prompt": "A story:", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
                    chunks = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
            result["finish"] = chunks[-1]["choices"][0]["finish_reason"]
            result["text"] = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 30
        while s.metric("lenserve:num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(s.url + "/health").status_code == 503
        t.join(120)
        assert result["finish"] == "length" and result["text"]
        assert s.proc.wait(60) == 0


def test_loaded_objects_are_frozen_while_serving_and_released_at_shutdown():
    """The lifespan moves what loading left alive out of the cyclic collector's reach (a full
    collection of it paused every stream ~100 ms), only for an engine it built itself, and gives
    them back at shutdown: an in-process server leaves the collector as it found it."""
    import asyncio
    import gc

    from lenserve.config import EngineConfig
    from lenserve.engine.loader_gguf import find_embedded_gguf
    from lenserve.server.app import ServerConfig, build_app

    config = ServerConfig(engine=EngineConfig(model=find_embedded_gguf(), kv_cache_memory_gb=0.05), predictor=None, length_probe=None)
    app = build_app(config)
    seen = {}

    async def serve_once():
        async with app.router.lifespan_context(app):
            seen["frozen"] = gc.get_freeze_count()

    assert gc.get_freeze_count() == 0
    asyncio.run(serve_once())
    assert seen["frozen"] > 10_000  # torch's modules and the model's objects
    assert gc.get_freeze_count() == 0
