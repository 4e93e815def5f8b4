"""Faults injected into engine steps (LENSERVE_FAULT_FILE): one fault fails only the requests in
the running batch, with a clear error, and the server keeps serving; consecutive faults mark the
engine dead, /health turns 503 and every open request still gets an answer. Tests run in order."""
import asyncio
import time

import httpx
import pytest

from tests.server.conftest import start_server

from .helpers import (
    assert_books_balance,
    assert_openai_error,
    sse_events,
    wait_idle,
    wait_until,
)

LONG = {"max_tokens": 300, "ignore_eos": True}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    fault_file = tmp_path_factory.mktemp("fault") / "faults"
    fault_file.write_text("0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSERVE_FAULT_FILE", str(fault_file))
        args = ("--predictor", "none", "--max-model-len", "512", "--max-num-seqs", "2")
        with start_server(tmp_path_factory, *args) as server:
            yield server, fault_file


async def _stream(client, prompt: str, started: asyncio.Event) -> list:
    body = {"prompt": prompt, **LONG, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if line.startswith("data: {"):
                started.set()
    return sse_events(lines)


async def _until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _inject(fault_file, n: int) -> None:
    fault_file.write_text(str(n))


def test_step_fault_fails_only_the_running_batch(faulty):
    server, fault_file = faulty
    before = assert_books_balance(server)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            started = [asyncio.Event(), asyncio.Event()]
            running = [asyncio.create_task(_stream(c, f"Stream {i} goes on and on:", started[i])) for i in range(2)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            # max-num-seqs 2: this one waits, so the fault must not touch it
            waiting = asyncio.create_task(c.post("/v1/completions", json={"prompt": "Wait your turn:", "max_tokens": 6, "ignore_eos": True}))
            await _until(lambda: server.metric("lenserve:num_requests_waiting") >= 1)
            _inject(fault_file, 1)
            return await asyncio.gather(*running), await waiting

    streams, survivor = asyncio.run(run())
    for events in streams:
        assert events[-1] == "[DONE]", events[-3:]
        err = events[-2]["error"]
        assert err["type"] == "internal_server_error" and err["code"] == "engine_error", err
        assert "engine failed" in err["message"] and "injected fault" in err["message"], err
        assert all("error" not in e for e in events[:-2])
        assert not any(c["finish_reason"] for e in events[:-2] for c in e["choices"])
    assert survivor.status_code == 200, survivor.text
    assert survivor.json()["choices"][0]["finish_reason"] == "length" and survivor.json()["usage"]["completion_tokens"] == 6

    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert c.get("/health").json()["status"] == "ok"
    wait_idle(server)
    after = assert_books_balance(server)
    assert after["error"] == before["error"] + 2, (before, after)


def test_step_fault_non_streaming_gets_500_openai_error(faulty):
    server, fault_file = faulty

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            victim = asyncio.create_task(c.post("/v1/completions", json={"prompt": "A long answer:", **LONG}))
            await _until(lambda: server.metric("lenserve:num_requests_running") >= 1)
            await asyncio.sleep(0.3)  # a few decode steps in
            _inject(fault_file, 1)
            return await victim

    r = asyncio.run(run())
    err = assert_openai_error(r, 500)
    assert err["type"] == "internal_server_error" and err["code"] == "engine_error", err
    assert "engine failed" in err["message"] and "RuntimeError" in err["message"], err
    with server.client() as c:
        assert c.post("/v1/completions", json={"prompt": "And now?", "max_tokens": 4}).status_code == 200
    wait_idle(server)
    assert_books_balance(server)


def test_consecutive_faults_make_health_fail_and_answer_everyone(faulty):
    server, fault_file = faulty

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            started = asyncio.Event()
            stream = asyncio.create_task(_stream(c, "Doomed stream:", started))
            await asyncio.wait_for(started.wait(), 120)  # the stream runs first, whatever the arrival order
            # with --max-num-seqs 2, one post runs beside the stream and the rest wait
            posts = [asyncio.create_task(c.post("/v1/completions", json={"prompt": f"Doomed {i}:", **LONG})) for i in range(5)]
            await _until(lambda: server.metric("lenserve:num_requests_waiting") >= 3)
            _inject(fault_file, 3)
            return await asyncio.wait_for(stream, 60), await asyncio.wait_for(asyncio.gather(*posts), 60)

    events, responses = asyncio.run(run())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error", events[-3:]
    for r in responses:  # failed in the batch (500) or ended by the dying engine (503): never left hanging
        assert r.status_code in (500, 503), r.text
        assert_openai_error(r, r.status_code)
    assert {r.status_code for r in responses} & {503}, [r.status_code for r in responses]

    assert wait_until(lambda: httpx.get(server.url + "/health").status_code == 503, 30)
    health = assert_openai_error(httpx.get(server.url + "/health"), 503)
    assert health["code"] == "engine_unhealthy" and "consecutive engine faults" in health["message"], health
    err = assert_openai_error(httpx.post(server.url + "/v1/completions", json={"prompt": "Anyone?", "max_tokens": 2}), 503)
    assert err["type"] == "service_unavailable" and err["code"] == "engine_dead", err
    assert fault_file.read_text() == "0"
    assert server.proc.poll() is None  # stays up to report itself unhealthy; the orchestrator restarts it
