"""Many concurrent streams, clients that disconnect, and the KV blocks they leave behind."""
import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import load_test_prompts
from tests.engine.helpers import check_logprobs_close


class _LP:
    def __init__(self, top):
        self.top = list(top.items())


async def _stream_completion(client, prompt, max_tokens, **extra):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logprobs": 5, **extra}
    text, tokens, lps, finish = "", [], [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                text += c["text"]
                finish = c["finish_reason"] or finish
                if c["logprobs"]:
                    tokens += c["logprobs"]["tokens"]
                    lps += [_LP(t) for t in c["logprobs"]["top_logprobs"]]
    assert finish in ("stop", "length")
    return text, tokens, lps


def test_32_concurrent_streams_equal_offline(server):
    prompts = [p[:400] for p in load_test_prompts(32)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
            return await asyncio.gather(*(_stream_completion(c, p, 24) for p in prompts))

    served = asyncio.run(run())
    assert len(served) == 32

    from lenserve import LLM, SamplingParams

    llm = LLM(max_model_len=2048)
    offline = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, logprobs=5))
    tok = llm.tokenizer
    diverged = 0
    for (text, pieces, lps), off in zip(served, offline):
        if text == off.text:
            continue
        # Only a near tie may separate them (batch composition changes fp32 rounding).
        off_pieces = [tok.id_to_piece(t) for t in off.token_ids]
        off_lps = [_LP({tok.id_to_piece(t): v for t, v in lp.top}) for lp in off.outputs[0].logprobs]
        assert check_logprobs_close(off_pieces, off_lps, pieces, lps, "offline", "served") is not None
        diverged += 1
    assert diverged <= 2


def test_disconnected_streams_free_their_blocks(server):
    total = server.metric("lenserve:kv_cache_total_blocks")

    async def cut(c, i):
        body = {"prompt": f"Write a long story about dragon number {i}.", "max_tokens": 300, "ignore_eos": True, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                if n >= 3 + i % 5:
                    break  # leaving the block closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            await asyncio.gather(*(cut(c, i) for i in range(20)))

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.metric("lenserve:num_requests_running") == 0 and server.metric("lenserve:kv_cache_free_blocks") == total:
            break
        time.sleep(0.2)
    assert server.metric("lenserve:num_requests_running") == 0
    assert server.metric("lenserve:kv_cache_free_blocks") == total > 0
    assert server.metric("lenserve:request_success_total") >= 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_non_streaming_disconnect_aborts(server):
    before = server.metric("lenserve:request_success_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "Tell me everything.", "max_tokens": 1500, "ignore_eos": True}, timeout=1.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric("lenserve:num_requests_running") > 0:
        time.sleep(0.2)
    assert server.metric("lenserve:num_requests_running") == 0
    after = server.metric('lenserve:request_success_total')
    assert after >= before
