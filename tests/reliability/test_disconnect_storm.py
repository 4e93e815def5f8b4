"""100 streaming requests cut at seeded random points (while sending, right after the headers, or
after some chunks): no KV block leaks, every admitted request is accounted for, and the server
keeps serving."""
import asyncio
import random

import httpx
import pytest

from tests.server.conftest import start_server

from .helpers import assert_books_balance, wait_idle

NUM_STREAMS = 100


async def _cut_stream(client: httpx.AsyncClient, i: int, rng: random.Random) -> str:
    await asyncio.sleep(rng.uniform(0, 2.0))  # staggered arrivals
    if rng.random() < 0.5:
        path, body = "/v1/completions", {"prompt": f"Story {i}: once upon a time", "n": rng.choice((1, 1, 2))}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell tale number {i}."}]}
    body.update(max_tokens=200, ignore_eos=True, stream=True)
    where = rng.choices(("in_flight", "headers", "chunks"), weights=(2, 2, 6))[0]
    num_chunks = rng.randint(1, 12)

    async def read() -> None:
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            if where == "headers":
                return  # leaving the block closes the connection with the body unread
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= num_chunks:
                    return
            raise AssertionError(f"stream {i} ended before it was cut")

    if where == "in_flight":
        try:
            await asyncio.wait_for(read(), timeout=rng.uniform(0.0, 0.5))
        except asyncio.TimeoutError:
            pass
    else:
        await read()
    return where


@pytest.mark.slow
def test_disconnect_storm_leaks_nothing(tmp_path_factory):
    args = ("--predictor", "none", "--max-model-len", "512", "--max-num-seqs", "32")
    with start_server(tmp_path_factory, *args) as server:
        async def storm() -> list[str]:
            limits = httpx.Limits(max_connections=NUM_STREAMS, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
                return await asyncio.gather(*(_cut_stream(client, i, random.Random(1000 + i)) for i in range(NUM_STREAMS)))

        cuts = asyncio.run(storm())
        assert len(cuts) == NUM_STREAMS and {"in_flight", "headers", "chunks"} <= set(cuts)

        wait_idle(server, timeout_s=120)  # every KV block free again, nothing running or waiting
        books = assert_books_balance(server)
        print(f"cuts: { {w: cuts.count(w) for w in set(cuts)} }, books: {books}")
        assert books["admitted"] >= cuts.count("headers") + cuts.count("chunks"), books
        assert books["error"] == 0, books
        assert server.proc.poll() is None

        with server.client() as c:
            r = c.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
            assert c.get("/health").json()["status"] == "ok"
        wait_idle(server)
