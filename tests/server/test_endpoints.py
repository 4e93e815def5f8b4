"""Tokenize, detokenize, health, version, metrics, and OpenAI error bodies for bad input."""
import json

import pytest


def test_tokenize_detokenize(server):
    with server.client() as c:
        r = c.post("/tokenize", json={"prompt": "The capital of France is"}).json()
        assert r["tokens"] == [504, 3575, 282, 4649, 314] and r["count"] == 5
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "The capital of France is"
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert chat["tokens"][0] == 1
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/version").json()["version"]


def _is_openai_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 1000}, "n"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "stop": ["a"] * 40}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**7]}, None),
        ({"prompt": 12}, "prompt"),
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "stop_token_ids": [10**8]}, "stop_token_ids"),
        ({"prompt": "x " * 3000, "max_tokens": 5}, None),
    ],
)
def test_completion_bad_input(server, body, param):
    with server.client() as c:
        err = _is_openai_error(c.post("/v1/completions", json=body), 400)
    if param:
        assert err["param"] == param, err


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user"}], "max_tokens": 0},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    ],
)
def test_chat_bad_input(server, body):
    with server.client() as c:
        _is_openai_error(c.post("/v1/chat/completions", json=body), 400)


def test_malformed_and_invalid_utf8(server):
    with server.client() as c:
        err = _is_openai_error(c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        assert "JSON" in err["message"]
        _is_openai_error(c.post("/v1/completions", content=b'{"prompt": "\xff\xfe bad"}', headers={"content-type": "application/json"}), 400)
        _is_openai_error(c.post("/v1/completions", content=b"", headers={"content-type": "application/json"}), 400)


def test_unknown_model_is_404(server):
    with server.client() as c:
        err = _is_openai_error(c.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
        assert err["code"] == "model_not_found"
        _is_openai_error(c.get("/v1/nothing-here"), 404)


def test_prompt_beyond_context_names_limit(server):
    with server.client() as c:
        err = _is_openai_error(c.post("/v1/completions", json={"prompt": [5] * 2040, "max_tokens": 100}), 400)
        assert "2048" in err["message"]


def test_body_too_large_is_413(server):
    with server.client() as c:
        big = json.dumps({"prompt": "x" * (5 * 2**20)})
        _is_openai_error(c.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)


def test_prefix_cache_counters_on_metrics(server):
    """lenserve:prefix_cache_queries_total / hits_total count prompt tokens (vLLM's semantics):
    the same prompt twice is looked up twice, and the second finds its whole blocks cached."""
    prompt = " ".join(f"word{i}" for i in range(120))
    with server.client() as c:
        q0, h0 = server.metric("lenserve:prefix_cache_queries_total"), server.metric("lenserve:prefix_cache_hits_total")
        first = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
        # streamed with usage: the second's prompt_tokens_details.cached_tokens (OpenAI's field) is its hit
        with c.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        q1, h1 = server.metric("lenserve:prefix_cache_queries_total"), server.metric("lenserve:prefix_cache_hits_total")
    assert q1 - q0 == 2 * first
    assert (first - 1) // 16 * 16 <= h1 - h0 <= first - 1  # every whole block but the one holding the last token
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": h1 - h0}
    assert server.metric("lenserve:prefix_cache_blocks") >= first // 16


def test_metrics_report_the_step_cost_model_and_its_scatter(server):
    """Every step's measured over predicted time lands in lenserve:step_time_over_predicted, and
    served_cost_model (what `lenserve simulate --from-server` reads) gets the fit and the scatter."""
    import httpx

    from lenserve.server.metrics import served_cost_model

    before = server.metric("lenserve:step_time_over_predicted_count")
    with server.client() as c:
        for i in range(3):
            c.post("/v1/completions", json={"prompt": f"step scatter {i}", "max_tokens": 24, "ignore_eos": True})
    steps = server.metric("lenserve:step_time_over_predicted_count") - before
    assert steps >= 3 * 24  # a prefill and at least 23 decode steps each (none share a step here)
    served = served_cost_model(httpx.get(server.url + "/metrics", timeout=10).text)
    cost, noise, lifetime, lifetime_noise = served
    assert cost is not None and cost.step_base_s + cost.token_s > 0  # refitted by now
    assert lifetime is not None and lifetime.step_time(1, 1, 0, 50) > 0
    # the lifetime fit's own scatter, at 50 quantiles: what a simulation of the lifetime fit draws
    assert len(lifetime_noise) == 50 and (lifetime_noise[1:] >= lifetime_noise[:-1]).all()
    assert 0.5 < float(lifetime_noise[25]) < 2.0
    model, scatter = served.for_simulation()
    assert model is lifetime and scatter is lifetime_noise
    assert len(noise) == server.metric("lenserve:step_time_over_predicted_count")
    assert 0.25 <= float(noise.min()) and float(noise.max()) <= 4.0
