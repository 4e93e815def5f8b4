"""SIGTERM under load: new work gets 503 at once, every request already accepted (running or still
queued, streaming or not) is answered in full, then the process exits 0. Past the grace period
what is left is answered with finish_reason "abort" and the process exits 0 all the same."""
import asyncio
import signal
import time

import httpx
import pytest

from tests.server.conftest import start_server

from .helpers import assert_openai_error, sse_events, wait_until

NUM_STREAMS = 4
NUM_PLAIN = 2
MAX_TOKENS = 24


async def _stream(client, i: int) -> dict:
    body = {"prompt": f"Stream {i}:", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events([line async for line in r.aiter_lines()])
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    return {"done": events[-1] == "[DONE]", "finish": finishes, "tokens": events[-2]["usage"]["completion_tokens"]}


async def _plain(client, i: int) -> dict:
    r = await client.post("/v1/completions", json={"prompt": f"Plain {i}:", "max_tokens": MAX_TOKENS, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    return {"done": True, "finish": [body["choices"][0]["finish_reason"]], "tokens": body["usage"]["completion_tokens"]}


@pytest.mark.slow
def test_sigterm_under_load_answers_everyone_then_exits_zero(tmp_path_factory):
    args = ("--predictor", "none", "--max-model-len", "256", "--max-num-seqs", "2", "--shutdown-grace-s", "120")
    with start_server(tmp_path_factory, *args) as server:

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=180) as c:
                inflight = [asyncio.create_task(_stream(c, i)) for i in range(NUM_STREAMS)]
                inflight += [asyncio.create_task(_plain(c, i)) for i in range(NUM_PLAIN)]
                # all accepted, two running and the rest queued, before the signal
                queued = await asyncio.to_thread(wait_until, lambda: (
                    server.metric("lenserve:request_admitted_total") == NUM_STREAMS + NUM_PLAIN
                    and server.metric("lenserve:num_requests_waiting") >= 1
                ), 60, 0.05)
                assert queued, "the requests were not all accepted with some still queued"
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)

                late = []  # requests that arrive during the drain: each must get a 503
                while not all(t.done() for t in inflight):
                    for path, body in (("/v1/completions", {"prompt": "late", "max_tokens": 2}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "late"}]}),
                                       ("/tokenize", {"prompt": "late"})):
                        late.append(await c.post(path, json=body))
                    late.append(await c.get("/health"))
                    await asyncio.sleep(0.2)
                return await asyncio.gather(*inflight), late

        answered, late = asyncio.run(run())
        for a in answered:
            assert a == {"done": True, "finish": ["length"], "tokens": MAX_TOKENS}, a
        assert len(late) >= 4
        for r in late:
            assert assert_openai_error(r, 503)["code"] == "shutting_down"
        assert server.proc.wait(60) == 0
        assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.slow
def test_past_the_grace_period_in_flight_requests_end_with_abort(tmp_path_factory):
    grace_s = 2.0
    args = ("--predictor", "none", "--max-model-len", "4096", "--shutdown-grace-s", str(grace_s))
    with start_server(tmp_path_factory, *args) as server:

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                body = {"prompt": "Never ending:", "max_tokens": 4000, "ignore_eos": True}
                plain = asyncio.create_task(c.post("/v1/completions", json=body))
                async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    lines = r.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: {"):
                            break
                    t0 = time.monotonic()
                    server.proc.send_signal(signal.SIGTERM)
                    events = sse_events([line async for line in lines])
                return events, await plain, time.monotonic() - t0

        events, plain, answered_after_s = asyncio.run(run())
        assert events[-1] == "[DONE]", events[-3:]
        assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] == ["abort"]
        assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] == "abort", plain.text
        assert plain.json()["usage"]["completion_tokens"] < 4000
        assert grace_s <= answered_after_s < grace_s + 10, answered_after_s
        assert server.proc.wait(60) == 0
