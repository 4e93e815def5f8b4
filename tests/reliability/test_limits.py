"""Every limit at its edge: the largest allowed value works, one past it is refused with an OpenAI
error naming the parameter; --request-timeout-s ends a request with finish_reason "abort" and
frees what it held. (tests/server checks grossly bad values; this checks the boundaries.) The
limits run on the key-protected server of conftest.py, the timeouts on a server of their own."""
import json

import httpx
import pytest
from lenserve.engine.sampling_params import MAX_N, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS
from lenserve.server.protocol import MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS

from tests.server.conftest import start_server

from .conftest import MAX_BODY, MAX_MODEL_LEN
from .helpers import assert_books_balance, assert_openai_error, sse_events, wait_idle

TIMEOUT_S = 1.0
CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def server(guarded_server):
    return guarded_server


@pytest.fixture(scope="module")
def timeout_server(tmp_path_factory):
    args = ("--predictor", "none", "--max-model-len", "2048", "--request-timeout-s", str(TIMEOUT_S))
    with start_server(tmp_path_factory, *args) as s:
        yield s


def _post(server, path, body, **kw):
    with server.client() as c:
        return c.post(path, json=body, **kw)


def _json_of_size(size: int) -> bytes:
    """A valid /tokenize body of exactly `size` bytes."""
    head = b'{"prompt": "'
    tail = b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions", "/v1/chat/completions", "/detokenize"])
def test_body_one_byte_over_the_limit_is_413(server, path):
    r = _post(server, path, None, content=_json_of_size(MAX_BODY + 1), headers={"content-type": "application/json"})
    assert assert_openai_error(r, 413)["code"] == "body_too_large"


def test_body_at_the_limit_is_accepted(server):
    r = _post(server, "/tokenize", None, content=_json_of_size(MAX_BODY), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_chunked_body_without_content_length_is_bounded(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(2 * MAX_BODY // 512):
            yield b"b" * 512
        yield b'"}'

    r = _post(server, "/v1/completions", None, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert assert_openai_error(r, 413)["code"] == "body_too_large"


def test_prompt_and_max_tokens_at_the_context_edge(server):
    prompt = [504] * (MAX_MODEL_LEN - 8)
    room = MAX_MODEL_LEN - len(prompt)
    assert _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": room, "temperature": 0}).status_code == 200
    err = assert_openai_error(_post(server, "/v1/completions", {"prompt": prompt, "max_tokens": room + 1}), 400, "max_tokens")
    assert str(MAX_MODEL_LEN) in err["message"] and str(room + 1) in err["message"]
    err = assert_openai_error(_post(server, "/v1/completions", {"prompt": [504] * MAX_MODEL_LEN}), 400, "prompt")
    assert str(MAX_MODEL_LEN) in err["message"]


def test_chat_beyond_context(server):
    long_chat = [{"role": "user", "content": "word " * MAX_MODEL_LEN}]
    err = assert_openai_error(_post(server, "/v1/chat/completions", {"messages": long_chat}), 400, "prompt")
    assert str(MAX_MODEL_LEN) in err["message"]
    err = assert_openai_error(_post(server, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": MAX_MODEL_LEN}), 400, "max_tokens")
    assert str(MAX_MODEL_LEN) in err["message"]


@pytest.mark.parametrize("path,base", [("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": CHAT})])
def test_n_bounds(server, path, base):
    r = _post(server, path, {**base, "n": MAX_N, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_N, r.text
    assert_openai_error(_post(server, path, {**base, "n": MAX_N + 1, "max_tokens": 1}), 400, "n")


def test_stop_bounds(server):
    ok = [f"#{i}#" for i in range(MAX_STOP_STRINGS)]
    assert _post(server, "/v1/completions", {"prompt": "Hi", "stop": ok, "max_tokens": 1}).status_code == 200
    assert _post(server, "/v1/completions", {"prompt": "Hi", "stop": ["x" * MAX_STOP_STRING_LEN], "max_tokens": 1}).status_code == 200
    for stop in (ok + ["one more"], ["x" * (MAX_STOP_STRING_LEN + 1)], [""], ["ok", ""]):
        err = assert_openai_error(_post(server, "/v1/completions", {"prompt": "Hi", "stop": stop, "max_tokens": 1}), 400, "stop")
        assert err["type"] == "invalid_request_error"
    assert_openai_error(_post(server, "/v1/chat/completions", {"messages": CHAT, "stop": ok + ["x"], "max_tokens": 1}), 400, "stop")


def test_logprobs_bounds(server):
    r = _post(server, "/v1/completions", {"prompt": "Hi", "logprobs": MAX_COMPLETION_LOGPROBS, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert all(len(top) == MAX_COMPLETION_LOGPROBS for top in r.json()["choices"][0]["logprobs"]["top_logprobs"])
    assert_openai_error(_post(server, "/v1/completions", {"prompt": "Hi", "logprobs": MAX_COMPLETION_LOGPROBS + 1}), 400, "logprobs")
    assert_openai_error(_post(server, "/v1/completions", {"prompt": "Hi", "logprobs": -1}), 400, "logprobs")

    body = {"messages": CHAT, "logprobs": True, "max_tokens": 2}
    r = _post(server, "/v1/chat/completions", {**body, "top_logprobs": MAX_TOP_LOGPROBS})
    assert r.status_code == 200, r.text
    assert all(len(t["top_logprobs"]) == MAX_TOP_LOGPROBS for t in r.json()["choices"][0]["logprobs"]["content"])
    assert_openai_error(_post(server, "/v1/chat/completions", {**body, "top_logprobs": MAX_TOP_LOGPROBS + 1}), 400, "top_logprobs")


@pytest.mark.parametrize("path,base", [
    ("/v1/completions", {"prompt": "Count to a thousand:"}),
    ("/v1/chat/completions", {"messages": CHAT}),
])
def test_timeout_ends_stream_with_abort_and_frees_blocks(timeout_server, path, base):
    server = timeout_server
    # even a GPU takes well over TIMEOUT_S for 1,900 tokens
    body = {**base, "max_tokens": 1900, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    before = assert_books_balance(server)
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and "error" not in events[-2], events[-3:]
    finishes = [ch["finish_reason"] for e in events[:-1] for ch in e["choices"] if ch["finish_reason"]]
    assert finishes == ["abort"], finishes
    assert events[-2]["usage"]["completion_tokens"] < 1900
    wait_idle(server)
    after = assert_books_balance(server)
    assert after["abort"] == before["abort"] + 1, (before, after)


def test_timeout_ends_every_choice_with_abort(timeout_server):
    server = timeout_server
    r = _post(server, "/v1/completions", {"prompt": "Go on:", "n": 2, "max_tokens": 1900, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["abort", "abort"], json.dumps(body)[:500]
    assert body["usage"]["completion_tokens"] < 2 * 1900
    wait_idle(server)
    assert_books_balance(server)
