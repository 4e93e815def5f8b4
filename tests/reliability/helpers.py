"""Shared checks for the reliability tests: OpenAI error bodies, SSE parsing, the server's books."""
import json
import time

import httpx

FINISH_REASONS = ("stop", "length", "abort", "error")


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """The response is `status` with exactly {"error": {"message", "type", "param", "code"}}."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), body
    assert isinstance(err["message"], str) and err["message"] and err["type"], body
    if param is not None:
        assert err["param"] == param, body
    return err


def sse_events(lines) -> list:
    """The `data:` payloads of an SSE body: dicts, and the string "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def finished_by_reason(server) -> dict[str, float]:
    """lenserve:request_success_total split by finished_reason."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = dict.fromkeys(FINISH_REASONS, 0.0)
    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == "lenserve:request_success_total":
                counts[s.labels["finished_reason"]] = counts.get(s.labels["finished_reason"], 0.0) + s.value
    return counts


def wait_idle(server, timeout_s: float = 60.0) -> None:
    """Until nothing runs or waits and every KV block is free again; fails with the gauges if not."""

    def idle() -> bool:
        return (
            server.metric("lenserve:num_requests_running") == 0
            and server.metric("lenserve:num_requests_waiting") == 0
            and server.metric("lenserve:kv_cache_free_blocks") == server.metric("lenserve:kv_cache_total_blocks")
        )

    ok = wait_until(idle, timeout_s, 0.2)
    gauges = {
        name: server.metric(f"lenserve:{name}")
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_free_blocks", "kv_cache_total_blocks")
    }
    assert ok, f"server did not go idle: {gauges}"
    assert gauges["kv_cache_total_blocks"] > 0, gauges


def assert_books_balance(server, timeout_s: float = 30.0) -> dict[str, float]:
    """Every admitted request has ended exactly once: admitted = stop + length + abort + error."""
    admitted = 0.0
    finished: dict[str, float] = {}

    def balanced() -> bool:
        nonlocal admitted, finished
        admitted = server.metric("lenserve:request_admitted_total")
        finished = finished_by_reason(server)
        return admitted == sum(finished.values())

    assert wait_until(balanced, timeout_s, 0.2), f"admitted {admitted} != finished {finished}"
    return {"admitted": admitted, **finished}
