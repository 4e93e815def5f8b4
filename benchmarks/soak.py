"""Soak test: N minutes of mixed traffic against `lenserve serve`, watching memory and latency.

Starts the server on 127.0.0.1 (or attaches to one with --url and --pid), then keeps
--concurrency closed-loop clients busy with a seeded mix: completions and chat, streaming or not,
random prompt and response lengths, streams cut part-way (client disconnects) and bad requests.
Every --window-s it records the server's RSS (/proc/PID/status), request latencies and outcomes.

Reported (JSON, also written to benchmarks/results/soak_cpu.json):
  - RSS growth after warm-up: mean RSS of the last window over the first post-warm-up window
    (target <= 5%), and the largest RSS seen;
  - per window: e2e p50/p99, TTFT p99, time per output token p99, requests by outcome, load average;
  - drift: median p99 (and p50) of the last three windows over that of the first three after
    warm-up (flat is ~1; the machine's own load moves it too, hence the load average beside it);
  - at the end: zero 5xx, the server idle with every KV block free, admitted = finished.

    python benchmarks/soak.py                       # 10 minutes, 2 of them warm-up
    python benchmarks/soak.py --minutes 2 --warmup-minutes 0.5 --out soak_cpu_2min.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, machine, write_result  # noqa: E402

from lenserve.server.process import ServerProcess, free_port  # noqa: E402

KINDS = {  # kind: weight
    "completion": 20, "completion_stream": 22, "chat": 16, "chat_stream": 22, "disconnect": 10, "bad_request": 10,
}
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "x", "n": 99}),
    ("/v1/completions", {"prompt": [10**9]}),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 40}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**7}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}),
    ("/v1/completions", "{not json"),
]


@dataclass
class Sample:
    t: float  # seconds since the start of the run, at the end of the request
    kind: str
    outcome: str  # ok | client_error | rejected | server_error | disconnected | transport_error
    e2e_s: float | None = None
    ttft_s: float | None = None
    num_tokens: int = 0


@dataclass
class Window:
    index: int
    rss_mb: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    healthy: bool | None = None
    load_avg_1m: float | None = None


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


class Traffic:
    def __init__(self, url: str, prompts: list[str], max_tokens: int, t0: float, seed: int) -> None:
        self.url = url
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.t0 = t0
        self.seed = seed
        self.kinds = list(KINDS)
        self.weights = [KINDS[k] for k in self.kinds]

    def _body(self, rng: random.Random, chat: bool) -> dict:
        prompt = rng.choice(self.prompts)[: rng.choice((80, 200, 600, 1500))]
        # mostly short answers, some long: the lengths a chat service sees
        max_tokens = min(self.max_tokens, int(rng.paretovariate(1.2) * 8))
        body = {"max_tokens": max_tokens, "temperature": rng.choice((0.0, 0.7, 1.0)), "seed": rng.randrange(2**31)}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> Sample:
        kind = rng.choices(self.kinds, self.weights)[0]
        start = time.monotonic()

        def done(outcome: str, **kw) -> Sample:
            return Sample(time.monotonic() - self.t0, kind, outcome, **kw)

        try:
            if kind == "bad_request":
                path, body = rng.choice(BAD_REQUESTS)
                r = await (client.post(path, content=body, headers={"content-type": "application/json"})
                           if isinstance(body, str) else client.post(path, json=body))
                return done("client_error" if 400 <= r.status_code < 500 and "error" in r.json() else _outcome(r.status_code))
            chat = kind.startswith("chat") or (kind == "disconnect" and rng.random() < 0.5)
            body = self._body(rng, chat)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            if kind in ("completion", "chat"):
                r = await client.post(path, json=body)
                if r.status_code != 200:
                    return done(_outcome(r.status_code))
                return done("ok", e2e_s=time.monotonic() - start, num_tokens=r.json()["usage"]["completion_tokens"])
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            if kind == "disconnect":
                body |= {"max_tokens": self.max_tokens, "ignore_eos": True}
                cut_after = rng.randint(1, 20)
            ttft, tokens, seen = None, 0, 0
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return done(_outcome(r.status_code))
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    seen += 1
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return done("server_error")
                    if chunk["choices"] and ttft is None:
                        ttft = time.monotonic() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if kind == "disconnect" and seen >= cut_after:
                        return done("disconnected")
            return done("ok", e2e_s=time.monotonic() - start, ttft_s=ttft, num_tokens=tokens)
        except httpx.HTTPError:
            return done("transport_error")

    async def client_loop(self, i: int, client: httpx.AsyncClient, until: float, out: list[Sample]) -> None:
        rng = random.Random(self.seed * 1000 + i)
        while time.monotonic() < until:
            out.append(await self.one(client, rng))
            await asyncio.sleep(rng.expovariate(1 / 0.2))  # think time


def _outcome(status: int) -> str:
    if status == 200:
        return "ok"
    if status in (429, 503):
        return "rejected"
    return "client_error" if status < 500 else "server_error"


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            key = s.name.removeprefix("lenserve:")
            if "finished_reason" in s.labels:
                key += ":" + s.labels["finished_reason"]
            out[key] = out.get(key, 0.0) + s.value
    return out


async def soak(url: str, pid: int, args) -> dict:
    from lenserve.traces.prompts import load_prompts

    prompts = load_prompts()
    duration_s = args.minutes * 60
    t0 = time.monotonic()
    until = t0 + duration_s
    windows: list[Window] = []
    samples: list[Sample] = []
    traffic = Traffic(url, prompts, args.max_tokens, t0, args.seed)

    async def sampler() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            while (now := time.monotonic()) < until:
                index = int((now - t0) // args.window_s)
                while len(windows) <= index:
                    windows.append(Window(len(windows)))
                w = windows[index]
                w.rss_mb.append(rss_mb(pid))
                try:
                    ok = (await c.get("/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                w.healthy = ok if w.healthy is None else (w.healthy and ok)
                w.load_avg_1m = os.getloadavg()[0]
                await asyncio.sleep(args.rss_every_s)

    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s + 60, limits=limits) as client:
        await asyncio.gather(sampler(), *(traffic.client_loop(i, client, until, samples) for i in range(args.concurrency)))

    for s in samples:
        index = min(int(s.t // args.window_s), len(windows) - 1)
        windows[index].samples.append(s)
    return report(windows, samples, args)


def _window_summary(w: Window, window_s: float) -> dict:
    ok = [s for s in w.samples if s.outcome == "ok"]
    e2e = [s.e2e_s for s in ok]
    tpot = [s.e2e_s / s.num_tokens for s in ok if s.num_tokens]
    outcomes: dict[str, int] = {}
    for s in w.samples:
        outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1

    def rnd(v: float | None, n: int = 3) -> float | None:
        return None if v is None else round(v, n)

    return {
        "window": w.index, "start_s": w.index * window_s,
        "rss_mb_mean": rnd(statistics.fmean(w.rss_mb), 1) if w.rss_mb else None,
        "rss_mb_max": rnd(max(w.rss_mb), 1) if w.rss_mb else None,
        "requests": len(w.samples), "outcomes": outcomes,
        "e2e_p50_s": rnd(_percentile(e2e, 50)), "e2e_p99_s": rnd(_percentile(e2e, 99)),
        "ttft_p99_s": rnd(_percentile([s.ttft_s for s in ok if s.ttft_s is not None], 99)),
        "tpot_p99_s": rnd(_percentile(tpot, 99), 4),
        "output_tokens": sum(s.num_tokens for s in ok),
        "healthy": w.healthy, "load_avg_1m": rnd(w.load_avg_1m, 2),
    }


def report(windows: list[Window], samples: list[Sample], args) -> dict:
    per_window = [_window_summary(w, args.window_s) for w in windows]
    warm = round(args.warmup_minutes * 60 / args.window_s)
    steady = [w for w in per_window[warm:] if w["rss_mb_mean"] is not None and w["requests"]]
    # the last window may be a sliver of a window: judge on full ones
    if len(steady) > 1 and steady[-1]["start_s"] + args.window_s > args.minutes * 60 + 1:
        steady = steady[:-1]
    growth = None
    if len(steady) >= 2:
        growth = (steady[-1]["rss_mb_mean"] / steady[0]["rss_mb_mean"] - 1) * 100

    def drift(key: str) -> float | None:
        values = [w[key] for w in steady if w[key] is not None]
        if len(values) < 2:
            return None
        k = min(3, len(values) // 2)
        return round(statistics.median(values[-k:]) / statistics.median(values[:k]), 3)

    outcomes: dict[str, int] = {}
    for s in samples:
        outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1
    return {
        "rss_growth_after_warmup_pct": None if growth is None else round(growth, 2),
        "rss_growth_target_pct": 5.0,
        "rss_mb_max": max((w["rss_mb_max"] for w in per_window if w["rss_mb_max"]), default=None),
        "e2e_p99_drift": drift("e2e_p99_s"),
        "e2e_p50_drift": drift("e2e_p50_s"),
        "tpot_p99_drift": drift("tpot_p99_s"),
        "e2e_p99_by_window_s": [w["e2e_p99_s"] for w in per_window],
        "requests": len(samples), "outcomes": outcomes,
        "windows": per_window,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0)
    p.add_argument("--window-s", type=float, default=60.0, help="latencies and RSS are reported per window")
    p.add_argument("--rss-every-s", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=6, help="closed-loop clients")
    p.add_argument("--max-tokens", type=int, default=128, help="the largest response asked for")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="the server's --request-timeout-s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="soak a running server (give --pid too) instead of starting one")
    p.add_argument("--pid", type=int, default=None)
    # A small KV cache: on CPU its pages are touched only when first used, and the prefix cache hands
    # out least-recently-freed blocks, so traffic walks the whole cache before reusing pages; at the
    # 4 GiB default that walk outlasts any warm-up and reads as RSS growth. 0.25 GiB is walked in it.
    p.add_argument("--server-args", default="--predictor default --max-model-len 2048 --max-num-seqs 16 --kv-cache-memory-gb 0.25",
                   help="extra `lenserve serve` arguments")
    p.add_argument("--out", default="soak_cpu.json", help="file name under benchmarks/results ('' to skip)")
    args = p.parse_args()

    server = None
    log_dir = tempfile.TemporaryDirectory(prefix="lenserve-soak-")
    if args.url:
        if args.pid is None:
            p.error("--url needs --pid (the server's process, for its RSS)")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--request-timeout-s", str(args.request_timeout_s), *args.server_args.split()]
        server = ServerProcess(cmd, os.path.join(log_dir.name, "server.log"), f"http://127.0.0.1:{port}", cwd=ROOT,
                               stop_timeout_s=120).__enter__()
        url, pid = server.url, server.proc.pid
        try:
            server.wait_healthy(300)
        except RuntimeError as e:
            server.stop()
            sys.exit(str(e))

    try:
        result = asyncio.run(soak(url, pid, args))
        # after the traffic: the server must drain to idle with its books balanced
        deadline = time.monotonic() + 120
        while True:
            m = _metrics(url)
            idle = (m.get("num_requests_running", 1) == 0 and m.get("num_requests_waiting", 1) == 0
                    and m.get("kv_cache_free_blocks") == m.get("kv_cache_total_blocks"))
            finished = sum(v for k, v in m.items() if k.startswith("request_success_total:"))
            if (idle and finished == m.get("request_admitted_total")) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        result["after"] = {
            "idle": idle, "kv_cache_free_blocks": m.get("kv_cache_free_blocks"), "kv_cache_total_blocks": m.get("kv_cache_total_blocks"),
            "admitted": m.get("request_admitted_total"), "finished": finished,
            "finished_by_reason": {k.split(":", 1)[1]: v for k, v in m.items() if k.startswith("request_success_total:")},
            "healthy": httpx.get(url + "/health", timeout=10).status_code == 200,
        }
    finally:
        exit_code = server.stop() if server is not None else None
    if server is not None:
        result["after"]["exit_code"] = exit_code
        result["after"]["server_log_tracebacks"] = server.log().count("Traceback")
    log_dir.cleanup()
    after = result["after"]
    result["pass"] = {
        "rss_growth_le_5pct": result["rss_growth_after_warmup_pct"] is not None and result["rss_growth_after_warmup_pct"] <= 5.0,
        "no_5xx": result["outcomes"].get("server_error", 0) == 0 and result["outcomes"].get("transport_error", 0) == 0,
        "idle_and_books_balance": after["idle"] and after["admitted"] == after["finished"],
        "healthy_throughout": all(w["healthy"] for w in result["windows"]),
    }
    payload = {
        "benchmark": "soak", "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("url", "pid", "out")},
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        **result,
    }
    print(json.dumps(payload, indent=1))
    if args.out:
        print("wrote", write_result(args.out, payload), file=sys.stderr)
    return 0 if all(result["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
