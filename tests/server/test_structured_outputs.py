"""Structured outputs and tools through the real `openai` client (and LangChain) on the embedded
model: every constrained answer validates, unconstrained neighbours are untouched, bad input is a
400 that names the field."""
import concurrent.futures as cf
import json
import random
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.engine.helpers import check_logprobs_close
from tests.schema_gen import root_schema

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


class Capital(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)
    founded_century: int = Field(ge=-30, le=21)


COUNTRIES = ["France", "Japan", "Italy", "Spain", "Germany", "Canada", "Brazil", "Egypt", "India", "Kenya",
             "Mexico", "Norway", "Peru", "Chile", "Greece", "Turkey", "Poland", "Ireland", "Cuba", "Vietnam"]


def test_parse_with_a_pydantic_model(client):
    def ask(country):
        return client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": f"What is the capital of {country}? Answer in JSON."}],
            response_format=Capital, max_tokens=60, temperature=0,
        )

    with cf.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(ask, COUNTRIES))
    for r in results:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Capital)
        Capital.model_validate_json(choice.message.content)


def test_fifty_random_strict_schemas_validate(client):
    rng = random.Random(24)
    schemas = [root_schema(rng) for _ in range(50)]

    def ask(i):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Fill in record number {i} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"record_{i}", "schema": schemas[i], "strict": True}},
            max_tokens=80, temperature=0.7, seed=i,
        )

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(50)))
    finished = 0
    for schema, r in zip(schemas, results):
        c = r.choices[0]
        if c.finish_reason == "length":
            continue
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)
        finished += 1
    assert finished >= 40, f"only {finished} of 50 finished within max_tokens"


def test_guided_choice_regex_and_json_object_on_both_endpoints(client):
    choices = ["positive", "negative", "neutral"]
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Sentiment of: I love this phone!"}],
            extra_body={"guided_choice": choices}, max_tokens=10, temperature=1.0, seed=seed,
        )
        assert r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop"
    pattern = r"[0-9]{3}-[0-9]{4}"
    c = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=0.8, n=3, seed=1,
                                  extra_body={"guided_regex": pattern})
    assert len(c.choices) == 3 and all(re.fullmatch(pattern, ch.text) for ch in c.choices)
    so = client.completions.create(model=MODEL, prompt="Pick a color:", max_tokens=10, temperature=0,
                                   extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert so.choices[0].text in ("red", "blue")
    g = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=10, temperature=0,
                                  extra_body={"guided_grammar": 'root ::= "yes" | "no" | "maybe " [0-9]'})
    assert re.fullmatch(r"yes|no|maybe [0-9]", g.choices[0].text)
    j = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a JSON object about a cat."}],
                                       response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    if j.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(j.choices[0].message.content), dict)
    else:
        assert j.choices[0].message.content.startswith("{")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_named_tool_call_plain_and_streamed(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=40, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and call.id and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                                 max_tokens=40, temperature=0, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 1 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_required_tool_calls_and_tool_history(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "14:05"},
    ]
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], tool_choice="required",
                                           max_tokens=60, temperature=0, stream=stream)
        if stream:
            chunks = list(r)
            calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
        else:
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert finish == "tool_calls" and calls
        tools = {"get_weather": WEATHER, "get_time": TIME}
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"])


def test_auto_parses_hermes_tool_calls(client):
    """With tool_choice auto the model's own `<tool_call>` block becomes tool_calls; a regex makes
    this small model write one, so the parser sees exactly what a tool-trained model writes."""
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    body = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=60, temperature=0,
                extra_body={"guided_regex": "Let me check\\. " + re.escape(block)})
    r = client.chat.completions.create(**body)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    assert c.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    chunks = list(client.chat.completions.create(**body, stream=True))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Let me check." and "<tool_call" not in content
    assert [tc.function.name for tc in calls] == ["get_weather"]
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0,
                                           extra_body={"guided_regex": "It is sunny\\."})
    assert plain.choices[0].message.content == "It is sunny." and not plain.choices[0].message.tool_calls


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=60)
    result = llm.with_structured_output(Capital).invoke("What is the capital of Italy? Answer in JSON.")
    assert isinstance(result, Capital)


class _LP:
    def __init__(self, top: dict):
        self.top = list(top.items())


def _near_tie_equal(alone: dict, mixed: dict) -> None:
    """Token for token equal, or equal up to a first divergence that is a near tie (DESIGN: batched
    fp32 matmuls are not bit-identical to one-row ones)."""
    check_logprobs_close(alone["tokens"], [_LP(t) for t in alone["top_logprobs"]],
                         mixed["tokens"], [_LP(t) for t in mixed["top_logprobs"]], "alone", "mixed")


def test_mixed_batch_of_32_streams(server, test_prompts):
    """16 constrained streams (each its own schema) beside 16 free ones: the free ones equal their
    runs alone, the constrained ones validate."""
    rng = random.Random(7)
    schemas = [root_schema(rng) for _ in range(16)]
    prompts = [p[:300] for p in test_prompts[40:56]]
    free_body = lambda p: {"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0, "logprobs": 5, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=300) as http:
        alone = [http.post("/v1/completions", json=free_body(p)).json()["choices"][0]["logprobs"] for p in prompts]

    def stream(body):
        text, logprobs = "", {"tokens": [], "top_logprobs": []}
        finish = None
        with httpx.Client(base_url=server.url, timeout=300) as http, http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])["choices"][0]
                text += ch["text"]
                finish = ch["finish_reason"] or finish
                if ch["logprobs"]:
                    logprobs["tokens"] += ch["logprobs"]["tokens"]
                    logprobs["top_logprobs"] += ch["logprobs"]["top_logprobs"]
        return text, finish, logprobs

    bodies = []
    for i in range(16):
        bodies.append(free_body(prompts[i]))
        bodies.append({"model": MODEL, "prompt": f"Record {i} as JSON:", "max_tokens": 60, "temperature": 0,
                       "response_format": {"type": "json_schema", "json_schema": {"name": f"r{i}", "schema": schemas[i], "strict": True}}})
    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, bodies))
    for i in range(16):
        _near_tie_equal(alone[i], results[2 * i][2])
        text, finish, _ = results[2 * i + 1]
        if finish == "stop":
            jsonschema.validate(json.loads(text), schemas[i])
        else:
            assert finish == "length"


def test_logit_bias_on_both_endpoints(client):
    token = 45  # "=" in SmolLM2's vocabulary
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(token): 100})
    assert c.choices[0].text == "==="
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100})
    assert r.choices[0].message.content == "==="


BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ("/v1/completions", {"guided_grammar": "root ::= (("}, "guided_grammar"),
    ("/v1/completions", {"guided_regex": "(?<=a)b"}, "guided_regex"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["b"]}, None),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}]},
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "not an object"}}]}, "tools.0.function.parameters"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ("/v1/chat/completions", {"tool_choice": "required"}, None),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"49152": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
]


@pytest.mark.parametrize("path,extra,param", BAD)
def test_bad_input_is_a_400_naming_the_field(server, path, extra, param):
    base = {"model": MODEL, "max_tokens": 4}
    base.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    with server.client() as http:
        r = http.post(path, json={**base, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        if param is not None:
            assert err["param"] == param, err
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("message,needs", [({"role": "tool", "content": "42"}, "tool_call_id"), ({"role": "tool", "tool_call_id": "c1"}, "content")])
def test_tool_message_needs_content_and_call_id(server, message, needs):
    with server.client() as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}, message]})
    assert r.status_code == 400 and needs in r.json()["error"]["message"]


def test_structured_output_metrics(server, client):
    client.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=4, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    client.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=4, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert server.metric("lenserve:structured_output_requests_total") >= 2
    assert server.metric("lenserve:grammar_compile_seconds_count") >= 1
    assert server.metric("lenserve:structured_output_bitmask_seconds_count") >= 1
    with httpx.Client() as http:
        text = http.get(server.url + "/metrics").text
    assert 'kind="choice"' in text and 'result="hit"' in text
