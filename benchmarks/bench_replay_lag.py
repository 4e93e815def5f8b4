"""Send lag of the open-loop replay client at a given request rate, against a minimal local endpoint.

The endpoint is lenserve.traces.fake_server in its own process (fake tokens, no model), so
what is measured is the client: how late each request leaves relative to its scheduled time
while earlier responses are still streaming in. Prints one JSON object.

    python benchmarks/bench_replay_lag.py [--rate 200] [--duration-s 10] [--out benchmarks/results/replay_lag.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

import httpx
import numpy as np

from lenserve.traces.compare import free_port
from lenserve.traces.replay import ReplayConfig, Replayer
from lenserve.traces.report import build_report
from lenserve.traces.synth import LengthDist, SynthConfig, synthesize


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "num_cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def wait_healthy(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_once(args: argparse.Namespace, seed: int) -> dict:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lenserve.traces.fake_server", "--port", str(port), "--itl-s", str(args.itl_s), "--ttft-s", "0.01"],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        trace = synthesize(
            SynthConfig(
                num_requests=None,
                duration_s=args.duration_s,
                gamma_shape=1.0,  # Poisson arrivals
                gamma_scale=1.0 / args.rate,
                prompt=LengthDist("lognormal", mu=5.0, sigma=0.5, max_tokens=1024),
                output=LengthDist("lognormal", mu=float(np.log(args.output_tokens)), sigma=0.0, max_tokens=args.output_tokens),
                seed=seed,
            )
        )
        config = ReplayConfig(url=url, mode="exact", show_progress=False, metrics_interval_s=1.0)
        load_before = os.getloadavg()[0]
        replayer = Replayer(trace, config)
        asyncio.run(replayer.run())
        load_after = os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait(10)
    records = [vars(r) for r in replayer.records]
    report = build_report(records, config.slo_ttft_s, config.slo_tpot_s)
    lag_ms = np.asarray([r["send_lag_s"] for r in records]) * 1000
    return {
        "load_avg_1m_before_after": [round(load_before, 2), round(load_after, 2)],
        "offered_rate_req_s": round((len(trace) - 1) / trace.duration_s, 1),
        "num_requests": len(trace),
        "num_completed": report["num_completed"],
        "send_lag_ms": {q: round(float(np.percentile(lag_ms, int(q[1:]))), 3) for q in ("p50", "p90", "p99")} | {"max": round(float(lag_ms.max()), 3)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="mean arrival rate, req/s (Poisson)")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--output-tokens", type=int, default=16, help="tokens per response (exact mode, ignore_eos)")
    p.add_argument("--itl-s", type=float, default=0.002, help="the fake server's time between tokens")
    p.add_argument("--repeat", type=int, default=1, help="independent runs (each with a fresh server and trace seed)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()

    runs = [run_once(args, seed) for seed in range(args.repeat)]
    p99 = [r["send_lag_ms"]["p99"] for r in runs]
    result = {
        "benchmark": "replay_send_lag",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "setup": {
            "rate_req_s": args.rate,
            "duration_s": args.duration_s,
            "output_tokens_per_request": args.output_tokens,
            "endpoint": "lenserve.traces.fake_server in its own process, one token per stream every "
            f"{args.itl_s * 1000:g} ms, exact-mode prompts (/tokenize calibrated), /metrics scraped every 1 s",
        },
        "runs": runs,
        "send_lag_p99_ms_median": float(np.median(p99)),
        "goal": "send lag p99 <= 20 ms at 200 req/s",
        "meets_goal": bool(np.median(p99) <= 20.0),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
