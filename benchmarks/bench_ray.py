"""Scale-out overhead on one machine: throughput of `lenserve serve` (one engine, every core) against
`lenserve serve --replicas N` on Ray Serve (N engines, cores/N torch threads each).

The same closed-loop load runs against each: C clients, each sending non-streaming completions
(fixed prompt, fixed `max_tokens`, ignore_eos) until R requests have been answered. Configurations:

- `single`: the plain server, --num-threads = cores;
- `ray_1`: Ray Serve, 1 replica with every core (the cost of Ray's proxy, ingress and handle);
- `ray_N`: Ray Serve, N replicas with cores/N threads each.

The criterion is ray_N output tokens/s >= 0.9x single, at saturation: with few sequences per
step, CPU decode is bound by reading the weights, and N replicas read them N times per step for
the same tokens (at 16 clients 2 replicas kept 0.63x); at 64 clients the steps are compute-bound
and replicas lose only Ray's own overhead. Writes benchmarks/results/ray_scaleout_cpu.json.

    python benchmarks/bench_ray.py [--replicas 2] [--requests 256] [--concurrency 64] [--max-tokens 48] [--router least-work]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_result  # noqa: E402

from lenserve.server.process import ServerProcess, free_port  # noqa: E402


@contextlib.contextmanager
def server(args: list[str], log_path: str):
    """A `lenserve serve` on a free port (its Ray's leftovers are swept when it stops)."""
    port = free_port()
    cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--port", str(port), "--predictor", "none", *args]
    with ServerProcess(cmd, log_path, f"http://127.0.0.1:{port}", stop_timeout_s=90,
                       env={"RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}) as proc:
        proc.wait_healthy(300)
        yield proc.url


async def load(url: str, num_requests: int, concurrency: int, max_tokens: int) -> dict:
    body = {"prompt": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    latencies: list[float] = []
    replicas: Counter = Counter()
    tokens = 0
    errors = 0
    todo = iter(range(num_requests))

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        # Warm-up: every replica's first steps allocate and pick kernels.
        await asyncio.gather(*[client.post("/v1/completions", json={**body, "max_tokens": 4}) for _ in range(2 * concurrency)])

        async def worker() -> None:
            nonlocal tokens, errors
            for _ in todo:
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]
                replicas[r.headers.get("x-lenserve-replica", "single")] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "wall_s": round(wall, 2),
        "output_tok_s": round(tokens / wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "mean_latency_s": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "errors": errors,
        "requests_per_replica": dict(replicas),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--configs", default="single,ray_1,ray_N")
    p.add_argument("--router", default="least-work", choices=["least-work", "pow2", "round-robin"])
    p.add_argument("--rounds", type=int, default=2, help="each config this many times, interleaved (best and median kept)")
    p.add_argument("--out", default="ray_scaleout_cpu.json")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    n = args.replicas
    engine = ["--kv-cache-memory-gb", "0.5", "--max-model-len", "512", "--max-num-seqs", str(args.concurrency), "--max-queue", "10000"]
    configs = {
        "single": ["--num-threads", str(cores)],
        "ray_1": ["--replicas", "1", "--num-threads", str(cores)],
        "ray_N": ["--replicas", str(n), "--num-threads", str(max(1, cores // n)), "--router", args.router],
    }
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_no in range(args.rounds):  # interleaved, so that a noisy minute does not hit one config only
        for name in names:
            log_path = f"/tmp/bench_ray_{name}.log"
            print(f"round {round_no + 1}/{args.rounds} {name}: lenserve serve {' '.join(configs[name] + engine)}",
                  file=sys.stderr, flush=True)
            with server(configs[name] + engine, log_path) as url:
                runs[name].append(asyncio.run(load(url, args.requests, args.concurrency, args.max_tokens)))
            print(name, runs[name][-1], file=sys.stderr, flush=True)
    results = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["output_tok_s"])
        results[name] = {"args": configs[name] + engine, "best_output_tok_s": best["output_tok_s"],
                         "median_output_tok_s": statistics.median(r["output_tok_s"] for r in rs), "runs": rs}
    out = {
        "benchmark": "bench_ray: closed-loop completions, single server vs Ray Serve replicas",
        "machine": machine(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": "python benchmarks/bench_ray.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "replicas": n,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "router": args.router,
        "results": results,
    }

    def ratio(a: str, b: str, key: str) -> float:
        return round(results[a][key] / results[b][key], 3)

    if "single" in results and "ray_N" in results:
        out["ray_N_over_single_tok_s"] = {"best": ratio("ray_N", "single", "best_output_tok_s"),
                                          "median": ratio("ray_N", "single", "median_output_tok_s")}
        out["criteria"] = {f"ray_{n}_replicas_ge_0.9x_single": out["ray_N_over_single_tok_s"]["best"] >= 0.9}
    if "ray_1" in results and "single" in results:
        out["ray_1_over_single_tok_s"] = {"best": ratio("ray_1", "single", "best_output_tok_s"),
                                          "median": ratio("ray_1", "single", "median_output_tok_s")}
    path = write_result(args.out, out)
    import json

    print(json.dumps(out, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
