"""HTTP serving throughput and TTFT against the embedded model, beside the same prompts offline.

Starts `lenserve serve` on 127.0.0.1, streams completions at 1, 8 and 32 concurrent clients
(greedy, fixed lengths), then runs the same prompts in-process with LLM.generate. Prints JSON
with throughput, TTFT p50/p99 and the HTTP overhead (1 - served / offline throughput).

    python benchmarks/bench_server.py [--new-tokens 128] [--out FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, stream_completion, write_result  # noqa: E402

from lenserve.server.process import ServerProcess, free_port  # noqa: E402


def _prompts(n: int) -> list[list[int]]:
    return [[1] + [100 + (i * 37 + j) % 4000 for j in range(63)] for i in range(n)]


async def _served(url, concurrency, rounds, new_tokens):
    prompts = _prompts(concurrency * rounds)
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        results = []
        for r in range(rounds):
            batch = prompts[r * concurrency : (r + 1) * concurrency]
            results += await asyncio.gather(*(stream_completion(c, p, new_tokens) for p in batch))
        dt = time.perf_counter() - t0
    ttfts = [t for t, _, _ in results]
    return {"throughput_tok_s": round(concurrency * rounds * new_tokens / dt, 1),
            "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 3), "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 3)}


def _offline(concurrency, rounds, new_tokens):
    from lenserve import LLM, SamplingParams

    llm = _offline.llm = getattr(_offline, "llm", None) or LLM(max_num_seqs=64)
    p = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompts = _prompts(concurrency * rounds)
    t0 = time.perf_counter()
    for r in range(rounds):
        llm.generate(prompts[r * concurrency : (r + 1) * concurrency], p)
    return {"throughput_tok_s": round(concurrency * rounds * new_tokens / (time.perf_counter() - t0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--out", default="bench_server_cpu.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--port", str(port), "--predictor", "none", "--max-num-seqs", "64"]
    with tempfile.TemporaryDirectory() as log_dir, ServerProcess(cmd, os.path.join(log_dir, "server.log"), f"http://127.0.0.1:{port}") as server:
        server.wait_healthy(300)
        asyncio.run(_served(server.url, 1, 1, 8))  # warm-up
        served = {c: asyncio.run(_served(server.url, c, 2 if c == 1 else 1, args.new_tokens)) for c in levels}
    offline = {c: _offline(c, 2 if c == 1 else 1, args.new_tokens) for c in levels}
    rows = []
    for c in levels:
        overhead = 1 - served[c]["throughput_tok_s"] / offline[c]["throughput_tok_s"]
        rows.append({"concurrency": c, "served": served[c], "offline": offline[c], "http_overhead": round(overhead, 3)})
    result = {"machine": machine(), "new_tokens": args.new_tokens, "rows": rows,
              "target_http_overhead_at_32<0.10": next((r["http_overhead"] < 0.10 for r in rows if r["concurrency"] == 32), None)}
    print(json.dumps(result, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
