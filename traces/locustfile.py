"""Locust load test that replays a trace: requests sized from the trace, sent at its (scaled) times.

    LENSERVE_TRACE=traces/data/burstgpt_synthetic_sample.csv LENSERVE_TIME_SCALE=2 \
        locust -f traces/locustfile.py --headless --host http://127.0.0.1:8000 --csv out/locust

Each request of the trace is handed to a free user at its scheduled time (trace seconds since
the window start / LENSERVE_TIME_SCALE); the user POSTs /v1/completions with a prompt of about
the trace's request tokens (one real word per token: locust has no tokenizer, so this is
approximate, use `lenserve replay --mode exact` for exact counts), max_tokens = response tokens
and ignore_eos. `TraceShape` sizes the user pool from the trace's arrival rate in the coming
seconds (LENSERVE_USERS_PER_RPS users per request/s, i.e. the latency in seconds a user may
spend per request); the pool only grows, so no user is stopped with a request in flight. The
test ends when every request has been sent and answered (or LENSERVE_DRAIN_S after the last send).

Environment: LENSERVE_TRACE (required), LENSERVE_TRACE_FORMAT, LENSERVE_TIME_SCALE (1),
LENSERVE_START, LENSERVE_DURATION, LENSERVE_MAX_REQUESTS, LENSERVE_MODEL (default: the first
of GET /v1/models), LENSERVE_API_KEY, LENSERVE_USERS_PER_RPS (4), LENSERVE_MAX_USERS (512),
LENSERVE_DRAIN_S (60), LENSERVE_SEED (0).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import urllib.request

import gevent
from locust import FastHttpUser, LoadTestShape, events, task

from lenserve.traces.loaders import load_trace
from lenserve.traces.prompts import DEFAULT_PROMPTS, load_prompts


def _env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


class Schedule:
    """The trace's requests in send order, handed out one at a time to whichever user asks."""

    def __init__(self) -> None:
        path = os.environ.get("LENSERVE_TRACE")
        if not path:
            raise RuntimeError("set LENSERVE_TRACE to the trace file to replay")
        max_requests = os.environ.get("LENSERVE_MAX_REQUESTS")
        self.trace = load_trace(
            path,
            os.environ.get("LENSERVE_TRACE_FORMAT") or None,
            start_s=_env_float("LENSERVE_START", None),
            duration_s=_env_float("LENSERVE_DURATION", None),
            max_requests=int(max_requests) if max_requests else None,
        )
        if not len(self.trace):
            raise RuntimeError(f"{path}: no requests in the selected window")
        self.time_scale = _env_float("LENSERVE_TIME_SCALE", 1.0)
        self.send_s = self.trace.send_times_s(self.time_scale)
        columns = self.trace.columns
        self.prompt_tokens = columns.prompt_tokens.tolist()
        self.output_tokens = columns.output_tokens.tolist()
        self.next_index = 0
        self.num_in_flight = 0
        self.started_at: float | None = None
        self.words = [w for p in load_prompts(DEFAULT_PROMPTS, source="dolly")[:200] for w in p.split()]
        self.seed = int(os.environ.get("LENSERVE_SEED", "0"))

    def elapsed_s(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def take(self) -> int | None:
        if self.next_index >= len(self.send_s):
            return None
        index = self.next_index
        self.next_index += 1
        return index

    def rate_ahead(self, t_s: float, window_s: float = 5.0) -> float:
        """Requests per second scheduled in [t, t + window)."""
        lo, hi = self.send_s.searchsorted([t_s, t_s + window_s])
        return (hi - lo) / window_s

    def prompt(self, index: int) -> str:
        rng = random.Random(f"{self.seed}:{index}")
        start = rng.randrange(len(self.words))
        n = max(1, self.prompt_tokens[index])
        words = (self.words[start:] + self.words[:start]) * (n // len(self.words) + 1)
        return " ".join(words[:n])

    @property
    def done(self) -> bool:
        return self.next_index >= len(self.send_s) and self.num_in_flight == 0


SCHEDULE = Schedule()
MODEL: list[str] = []


def _api_headers() -> dict[str, str]:
    key = os.environ.get("LENSERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    name = os.environ.get("LENSERVE_MODEL")
    if not name:
        request = urllib.request.Request(f"{environment.host.rstrip('/')}/v1/models", headers=_api_headers())
        with urllib.request.urlopen(request, timeout=30) as resp:
            name = json.load(resp)["data"][0]["id"]
    MODEL[:] = [name]
    SCHEDULE.started_at = time.monotonic()


class TraceUser(FastHttpUser):
    """Takes the next request of the trace, waits for its send time, sends it."""

    def on_start(self) -> None:
        self.headers = _api_headers()

    def wait_time(self) -> float:
        return 0.0

    @task
    def send_next(self) -> None:
        index = SCHEDULE.take()
        if index is None:
            gevent.sleep(0.5)
            return
        SCHEDULE.num_in_flight += 1
        try:
            delay = SCHEDULE.send_s[index] - SCHEDULE.elapsed_s()
            if delay > 0:
                gevent.sleep(delay)
            body = {
                "model": MODEL[0],
                "prompt": SCHEDULE.prompt(index),
                "max_tokens": max(1, SCHEDULE.output_tokens[index]),
                "ignore_eos": True,
            }
            with self.client.post("/v1/completions", json=body, headers=self.headers, name="/v1/completions", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                elif not (resp.json().get("choices") or [{}])[0].get("text") and body["max_tokens"] > 0:
                    resp.failure("no text in the completion")
        finally:
            SCHEDULE.num_in_flight -= 1


class TraceShape(LoadTestShape):
    """User count from the trace's arrival rate over the next seconds; stops when the trace is done."""

    users_per_rps = _env_float("LENSERVE_USERS_PER_RPS", 4.0)
    max_users = int(_env_float("LENSERVE_MAX_USERS", 512))
    drain_s = _env_float("LENSERVE_DRAIN_S", 60.0)
    num_users = 0

    def tick(self):
        t = self.get_run_time()
        last_send = float(SCHEDULE.send_s[-1])
        if SCHEDULE.done or t > last_send + self.drain_s:
            return None
        needed = math.ceil(SCHEDULE.rate_ahead(t) * self.users_per_rps) + 1
        self.num_users = min(self.max_users, max(self.num_users, needed))
        return self.num_users, self.num_users
