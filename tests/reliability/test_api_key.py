"""The API key: 401 on every route but /health and /metrics, whatever the Authorization header
looks like; the key is compared in constant time and never logged, even at DEBUG."""
import ast
import base64
import hmac
import inspect
import json
import socket
import textwrap

import httpx
import pytest
from lenserve.server.app import GuardMiddleware

from .conftest import API_KEY as KEY
from .helpers import assert_openai_error

OPEN = {"/health", "/metrics"}


@pytest.fixture
def server(guarded_server):
    return guarded_server


def _routes(server) -> list[tuple[str, str]]:
    """Every operation in /openapi.json, plus FastAPI's own pages and paths that do not exist."""
    spec = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    routes = [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]
    assert len(routes) >= 8, routes
    return routes + [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/no/such/path"),
                     ("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("OPTIONS", "/v1/chat/completions"),
                     ("HEAD", "/v1/models"), ("POST", "/health/../v1/completions")]


def test_every_route_but_health_and_metrics_needs_the_key(server):
    routes = _routes(server)
    body = {"prompt": "hi", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "tokens": [1]}
    for method, path in routes:
        r = httpx.request(method, server.url + path, json=body if method == "POST" else None)
        if path in OPEN:
            assert r.status_code == 200, (method, path, r.status_code)
            continue
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        if method != "HEAD":
            err = assert_openai_error(r, 401)
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key", err
    with server.client() as c:  # and with the key every protected route answers for real
        for method, path in (("GET", "/v1/models"), ("GET", "/version"), ("GET", "/openapi.json"), ("POST", "/tokenize")):
            assert c.request(method, path, json={"prompt": "hi"} if method == "POST" else None).status_code == 200, path


MALFORMED = [
    "", "Bearer", "Bearer ", "Bearer    ", KEY, f"Token {KEY}", f"Basic {base64.b64encode(f'user:{KEY}'.encode()).decode()}",
    f"Bearer {KEY}x", f"Bearer x{KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY} {KEY}", f"Bearer {KEY.upper()}",
    f"Bearer\t{KEY}", f"Bearer{KEY}", f"Bearer {'A' * 8000}", f"Bearer {KEY}\u00e9",
]


def _raw_post(server, auth: bytes) -> tuple[int, bytes]:
    """POST /v1/completions with the Authorization header sent byte for byte (httpx refuses some)."""
    body = b'{"prompt": "hi", "max_tokens": 1}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\nAuthorization: " + auth
               + b"\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


@pytest.mark.parametrize("value", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_authorization_is_401(server, value):
    status, payload = _raw_post(server, value.encode("utf-8"))
    assert status == 401, (status, payload[:200])
    err = json.loads(payload)["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert KEY.encode() not in payload and (len(value) < 20 or value[-20:].encode() not in payload), "no echo of the token"


def test_key_elsewhere_than_bearer_is_401(server):
    url = server.url + "/v1/models"
    for kw in ({"params": {"api_key": KEY}}, {"headers": {"X-API-Key": KEY}}, {"headers": {"api-key": KEY}},
               {"cookies": {"Authorization": f"Bearer {KEY}"}}, {"headers": {"Proxy-Authorization": f"Bearer {KEY}"}}):
        assert_openai_error(httpx.get(url, **kw), 401)
    for raw in (b"Bearer \xff\xfe", b"Bearer " + KEY.encode() + b"\xff", b"Bearer " + KEY.encode() + b"\x00"):
        status, _ = _raw_post(server, raw)
        assert status in (400, 401), raw  # 400: refused by the HTTP layer before the app


def test_scheme_is_case_insensitive(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.post(server.url + "/tokenize", json={"prompt": "hi"}, headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, scheme


def test_key_never_logged_even_at_debug(server):
    with server.client() as c:
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
    log = server.log()
    assert " DEBUG " in log, "the server did not log at DEBUG"
    assert KEY not in log and KEY[4:] not in log and base64.b64encode(KEY.encode()).decode() not in log


def test_key_compared_in_constant_time(monkeypatch):
    source = textwrap.dedent(inspect.getsource(GuardMiddleware._authorized))
    assert "hmac.compare_digest(" in source
    # no ==/!= on anything that could be the key or the token
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"key", "token", "got", "value"}, ast.unparse(node)

    calls = []
    compare_digest = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr("lenserve.server.app.hmac.compare_digest", spy)
    scope = {"headers": [(b"authorization", f"Bearer {KEY}".encode())]}
    assert GuardMiddleware._authorized(scope, KEY) is True
    assert GuardMiddleware._authorized({"headers": [(b"authorization", b"Bearer nope")]}, KEY) is False
    assert calls == [(KEY.encode(), KEY.encode()), (b"nope", KEY.encode())]
