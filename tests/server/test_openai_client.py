"""The real `openai` client works unchanged against the server."""
import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_completion(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.choices[0].text.strip().startswith("Paris")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6 and r.usage.total_tokens == 11


def test_completion_stream_with_usage(client):
    full = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_chat_stream(client):
    msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n_seed_stop_logprobs(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Count: 1, 2, 3,", max_tokens=10, temperature=0.8, n=3, seed=11, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Count: 1, 2, 3,", max_tokens=10, temperature=0.8, n=3, seed=11, logprobs=2)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 10
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    s = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"])
    assert s.choices[0].finish_reason == "stop" and " 6" not in s.choices[0].text


def test_vllm_extras_and_echo(client):
    r = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=8, temperature=0, echo=True,
        extra_body={"ignore_eos": True, "min_tokens": 8, "top_k": 5, "repetition_penalty": 1.1, "priority": 1},
    )
    assert r.choices[0].text.startswith("Hello") and r.usage.completion_tokens == 8


def test_token_id_prompts_and_batch(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=[[504, 3575, 282, 4649, 314], [504, 3575, 282]], max_tokens=3, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].text.strip().startswith("Paris")
    assert r.usage.prompt_tokens == 5 + 3
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=["The capital of France is", "Two plus two is"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3] and r.choices[0].text.strip().startswith("Paris")
