"""10x capacity offered open-loop: the bounded queue sheds load with 429 + Retry-After, every
accepted request completes in full, and the server's books agree with the client's."""
import asyncio
import json
import random

import httpx
import pytest

from tests.server.conftest import start_server

from .helpers import assert_books_balance, assert_openai_error, sse_events, wait_idle

MAX_NUM_SEQS = 2
MAX_QUEUE = 4
NUM_REQUESTS = 10 * (MAX_NUM_SEQS + MAX_QUEUE)
MEAN_GAP_S = 0.05  # ~20 requests/s offered; the server finishes ~1-2/s here


async def _one(client: httpx.AsyncClient, i: int, rng: random.Random) -> dict:
    max_tokens = rng.randint(30, 60)
    stream = i % 2 == 1
    body = {"prompt": f"Request {i}: list some colours.", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    result = {"i": i, "max_tokens": max_tokens, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        result["status"], result["response"] = r.status_code, r
        if r.status_code == 200:
            result["finish_reason"] = r.json()["choices"][0]["finish_reason"]
            result["tokens"] = r.json()["usage"]["completion_tokens"]
        return result
    async with client.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
        result["status"], result["response"] = r.status_code, r
        if r.status_code != 200:
            await r.aread()
            return result
        events = sse_events([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]", events[-3:]
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    result["finish_reason"] = finishes[-1] if finishes else None
    result["tokens"] = events[-2]["usage"]["completion_tokens"]
    return result


@pytest.mark.slow
def test_open_loop_overload_sheds_with_429_and_books_balance(tmp_path_factory):
    args = ("--predictor", "none", "--max-model-len", "256", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE))
    with start_server(tmp_path_factory, *args) as server:
        rng = random.Random(9)

        async def offer() -> list[dict]:
            limits = httpx.Limits(max_connections=2 * NUM_REQUESTS, max_keepalive_connections=2 * NUM_REQUESTS)
            async with httpx.AsyncClient(base_url=server.url, timeout=180, limits=limits) as client:
                tasks, t = [], 0.0
                loop = asyncio.get_running_loop()
                start = loop.time()
                for i in range(NUM_REQUESTS):
                    # open loop: send times are fixed in advance, whatever the responses do
                    t += rng.expovariate(1 / MEAN_GAP_S)
                    await asyncio.sleep(max(0.0, start + t - loop.time()))
                    tasks.append(asyncio.create_task(_one(client, i, random.Random(i))))
                return await asyncio.gather(*tasks)

        results = asyncio.run(offer())
        statuses = [r["status"] for r in results]
        assert set(statuses) <= {200, 429}, statuses
        ok = [r for r in results if r["status"] == 200]
        shed = [r for r in results if r["status"] == 429]
        print(f"offered {NUM_REQUESTS}: {len(ok)} served, {len(shed)} shed with 429")
        assert len(ok) >= MAX_QUEUE and len(shed) >= NUM_REQUESTS // 3, statuses
        for r in shed:
            err = assert_openai_error(r["response"], 429)
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full", err
            assert int(r["response"].headers["Retry-After"]) >= 1
        for r in ok:  # accepted means answered in full
            assert r["finish_reason"] == "length" and r["tokens"] == r["max_tokens"], r

        assert server.proc.poll() is None
        wait_idle(server)
        books = assert_books_balance(server)
        assert books["admitted"] == len(ok) and books["length"] == len(ok), (books, len(ok))
        assert books["abort"] == books["error"] == books["stop"] == 0, books
        assert server.metric("lenserve:request_rejected_total") == len(shed)
        with server.client() as c:
            assert c.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}
            r = c.post("/v1/completions", json={"prompt": "After the storm", "max_tokens": 4})
            assert r.status_code == 200 and json.loads(r.text)["choices"][0]["finish_reason"] in ("stop", "length")
